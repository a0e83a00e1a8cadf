"""The usage kept in the database: each API request a client's key made, by key, model and hour (service/store).

Counted: every request of a client key that the policy let through (its key known, under its limits and budget)
to one of the API's routes, whatever its answer (an error counts as a request and an error). Not counted: the
admin's (the admin routes, the page's playground), model listings (which no limit counts either), unknown routes,
and requests the policy refused (401, 429 for a limit or a budget, 403 for a model the key may not use): a refusal is no use of the model, and must not
eat a budget of requests.
"""
# Requests that are no use of the API: the probes', and those to no route at all.
NOT_COUNTED_RULES = frozenset(("/metrics", "/health", "/", "/openapi.json", "unmatched"))
# Refusals of the policy's own once the request was read: a model the key may not use.
REFUSED_ERRORS = frozenset(("model_not_allowed",))


def usage_key(record) -> str:
    """Whose usage a request is: its stored key's id, or "env:<client id>" for the environment's keys (and
    "env:anonymous" for every request of a gateway with no key)."""
    return record.key_id or f"env:{record.client_id}"


def counted(record, not_counted) -> bool:
    """Whether the request is a use of the API by a client; not_counted(rule) names the routes that never are."""
    return (record.client_id is not None and not record.rate_limited and record.route not in NOT_COUNTED_RULES
            and record.error not in REFUSED_ERRORS and not not_counted(record.route))


def usage_sink(usage, not_counted):
    """A request sink (app.extensions["request_sinks"]) that adds each counted request to usage (a UsageStore);
    not_counted(rule) says which routes are no use (the admin's, the model listings)."""
    def record_usage(entry, record):
        if not counted(record, not_counted):
            return
        usage.record(usage_key(record), entry.get("model"), record.prompt_tokens or 0,
                     record.completion_tokens or 0, error=(record.status or 500) >= 400 or "error" in entry,
                     queue_ms=record.queue_ms, upstream_ms=record.upstream_ms)
    return record_usage
