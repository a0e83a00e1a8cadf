"""A stored key's budget: tokens and/or requests per UTC day or month, checked before each request it makes.

What is spent comes from the usage the gateway keeps (service/store: the same token counts as the token limit,
streams included, summed over every gateway on the database). A request is refused once the budget is used up;
one that starts under it runs to its end, so a budget is overshot by at most the requests in flight.
"""
import math

from ..errors import ApiError
from .stored_keys import iso_utc

# A budget with tokens or requests but no period: the period of LiteLLM's budgets' usual use.
DEFAULT_PER = "month"


class BudgetExceeded(ApiError):
    """A key used up its budget for the day or month; Retry-After says when it resets."""

    status = 429
    code = "budget_exceeded"

    def __init__(self, message, retry_after_s):
        # x-should-retry: the SDKs (openai, anthropic) retry a 429 at once, twice by default: in vain here.
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s))),
                                           "x-should-retry": "false"})


def check_budget(key, usage, now=None):
    """Raise BudgetExceeded when key (a StoredKey) has used up its tokens or requests for the current period;
    usage is the store's UsageStore."""
    if key.budget_tokens is None and key.budget_requests is None:
        return
    from ..store import period_end  # only a gateway with a store gets here

    per = key.budget_per or DEFAULT_PER
    now = usage.clock() if now is None else now  # the store's clock, which its periods run on
    tokens, requests = usage.spent(key.id, per, now)
    for budget, spent, unit in ((key.budget_tokens, tokens, "tokens"), (key.budget_requests, requests, "requests")):
        if budget is not None and spent >= budget:
            resets = period_end(per, now)
            raise BudgetExceeded(f"Budget exceeded for {key.name}: {spent} of its {budget} {unit} per {per} used; "
                                 f"it resets at {iso_utc(resets)}", resets - now)
