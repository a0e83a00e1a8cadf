"""The tables the code reads and writes (SQLAlchemy Core), as they are at the newest migration.

Times are epoch seconds (floats); a key's allowed models are a JSON list in text, so that one schema serves
SQLite and PostgreSQL alike. Secrets are never stored: only their sha256 digest and their first 8 characters.
"""
from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text

metadata = MetaData()

keys = Table(
    "keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("models", Text),
    Column("rpm", Integer), Column("tpm", Integer), Column("concurrent", Integer), Column("weight", Integer),
    Column("budget_tokens", BigInteger), Column("budget_requests", BigInteger), Column("budget_per", String(8)),
    Column("expires_at", Float), Column("revoked_at", Float),
    Column("created_at", Float, nullable=False),
    # Set from the database's own clock on every change: other gateways read the rows changed since they last
    # looked, whatever their own clocks say.
    Column("updated_at", Float, nullable=False, index=True),
    # Added by revision 0002: the digest a rotated key answered to before, and until when it still does.
    Column("old_digest", String(64), index=True),
    Column("old_digest_until", Float),
)

usage = Table(
    "usage", metadata,
    Column("key", String(200), primary_key=True),   # a stored key's id, or "env:<client id>"
    Column("model", String(200), primary_key=True),  # "" when the request named none that was known
    Column("hour", BigInteger, primary_key=True),    # epoch seconds of the hour's start (UTC)
    Column("requests", BigInteger, nullable=False, default=0),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    Column("errors", BigInteger, nullable=False, default=0),
    Column("queue_ms", Float, nullable=False, default=0.0),
    Column("upstream_ms", Float, nullable=False, default=0.0),
)

USAGE_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "errors", "queue_ms", "upstream_ms")
