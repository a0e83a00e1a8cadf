"""A stored key as the gateway sees it (never its secret), and how it is read from and written to a row."""
import json
from dataclasses import dataclass

# Who may set what: every field but id, prefix and created_at (and the digests, which only rotate sets).
EDITABLE = ("name", "models", "rpm", "tpm", "concurrent", "weight", "budget_tokens", "budget_requests",
            "budget_per", "expires_at", "revoked_at")
BUDGET_PERIODS = ("day", "month")
# The largest number each numeric column holds (INTEGER, BIGINT): past it, SQLite raises OverflowError and
# PostgreSQL refuses the statement, so such a value is refused before it reaches either.
COLUMN_MAX = {"rpm": 2**31 - 1, "tpm": 2**31 - 1, "concurrent": 2**31 - 1, "weight": 2**31 - 1,
              "budget_tokens": 2**63 - 1, "budget_requests": 2**63 - 1}


@dataclass(frozen=True)
class StoredKey:
    """A key made at run time: its public id and name, its limits, budget and life."""

    id: str
    name: str
    prefix: str
    models: tuple = None
    rpm: int = None
    tpm: int = None
    concurrent: int = None
    weight: int = None
    budget_tokens: int = None
    budget_requests: int = None
    budget_per: str = None
    expires_at: float = None
    revoked_at: float = None
    created_at: float = 0.0

    def usable(self, now) -> bool:
        """Not revoked, not expired."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    @property
    def has_budget(self) -> bool:
        """Whether a budget of tokens or requests applies to it."""
        return bool(self.budget_per) and (self.budget_tokens is not None or self.budget_requests is not None)


def key_from_row(row) -> StoredKey:
    """The StoredKey of a row of the keys table."""
    models = json.loads(row.models) if row.models is not None else None
    return StoredKey(id=row.id, name=row.name, prefix=row.prefix, models=tuple(models) if models is not None else None,
                     rpm=row.rpm, tpm=row.tpm, concurrent=row.concurrent, weight=row.weight,
                     budget_tokens=row.budget_tokens, budget_requests=row.budget_requests, budget_per=row.budget_per,
                     expires_at=row.expires_at, revoked_at=row.revoked_at, created_at=row.created_at)


def column_values(fields: dict) -> dict:
    """The columns of the keys table that fields (EDITABLE names) set; TypeError/ValueError for bad ones."""
    unknown = set(fields) - set(EDITABLE)
    if unknown:
        raise TypeError(f"not a key field: {', '.join(sorted(unknown))}")
    if fields.get("budget_per") not in (None, *BUDGET_PERIODS):
        raise ValueError(f"budget_per must be one of {BUDGET_PERIODS}")
    if "name" in fields and not fields["name"]:
        raise ValueError("a key needs a name")
    for name, largest in COLUMN_MAX.items():
        if fields.get(name) is not None and not 0 <= fields[name] <= largest:
            raise ValueError(f"{name} must be from 0 to {largest}")
    values = dict(fields)
    if "models" in values and values["models"] is not None:
        values["models"] = json.dumps(list(values["models"]))
    return values
