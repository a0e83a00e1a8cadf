"""The first schema: keys (digest, prefix, limits, budget, expiry, revocation) and usage per key, model and hour."""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    """Create the keys and usage tables."""
    op.create_table(
        "keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("models", sa.Text),
        sa.Column("rpm", sa.Integer), sa.Column("tpm", sa.Integer), sa.Column("concurrent", sa.Integer),
        sa.Column("weight", sa.Integer),
        sa.Column("budget_tokens", sa.BigInteger), sa.Column("budget_requests", sa.BigInteger),
        sa.Column("budget_per", sa.String(8)),
        sa.Column("expires_at", sa.Float), sa.Column("revoked_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("queue_ms", sa.Float, nullable=False),
        sa.Column("upstream_ms", sa.Float, nullable=False),
    )
