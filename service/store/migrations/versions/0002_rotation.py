"""Key rotation (the old digest and until when it works) and the index the key cache's refresh reads by."""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    """Add keys.old_digest and keys.old_digest_until; index keys.updated_at and keys.old_digest."""
    op.add_column("keys", sa.Column("old_digest", sa.String(64)))
    op.add_column("keys", sa.Column("old_digest_until", sa.Float))
    op.create_index("ix_keys_updated_at", "keys", ["updated_at"])
    op.create_index("ix_keys_old_digest", "keys", ["old_digest"])
