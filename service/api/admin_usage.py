"""GET /admin/usage: the usage kept in the database, per key, model and hour, day or month; JSON, or CSV when asked
(format=csv or Accept: text/csv). For ADMIN_API_KEY alone; 404 store_off without a database, as /admin/keys."""
import csv
import io
import time

from flask import Blueprint, Response, current_app, jsonify, request

from ..errors import InvalidRequest
from ..schemas import first_error
from ..schemas.admin_keys import UsageQuerySchema, iso, key_reference
from .admin_keys import current_store, environment_clients

bp = Blueprint("admin_usage", __name__)
query_schema = UsageQuerySchema()
DEFAULT_SPAN_S = 86400  # no from: the last 24 hours
COLUMNS = ("period", "key", "name", "model", "requests", "prompt_tokens", "completion_tokens", "errors", "queue_ms",
           "upstream_ms")


def usage_query(args: dict, now: float) -> dict:
    """The query's values (from, to as epoch seconds), or a 400 naming the wrong parameter."""
    errors = query_schema.validate(args)
    if errors:
        param, message = first_error(errors)
        raise InvalidRequest(f"Invalid '{param}': {message}", param=param)
    query = query_schema.load(args)
    query.setdefault("end", now)
    query.setdefault("start", query["end"] - DEFAULT_SPAN_S)
    if query["start"] >= query["end"]:
        raise InvalidRequest("Invalid 'from': must be before 'to'", param="from")
    return query


def usage_rows(store, clients, query) -> list:
    """The usage rows the query asks for, each with its key's name (a stored key's, or the environment's client)."""
    key = query.get("key")
    if key is not None:
        key = key_reference(store.keys, clients, key)
    rows = store.usage.query(query["start"], query["end"], query["group_by"], key=key, model=query.get("model"))
    names = {stored.id: stored.name for stored in store.keys.list()}
    for row in rows:
        row["name"] = names.get(row["key"], row["key"][len("env:"):] if row["key"].startswith("env:") else None)
    return rows


def usage_csv(rows) -> str:
    """The rows as CSV with a header row."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _wants_csv(query) -> bool:
    if "format" in query:
        return query["format"] == "csv"
    return request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv"


@bp.get("/admin/usage")
def usage():
    """Usage summed per period, key and model between from and to (default the last 24 h)."""
    store = current_store()
    query = usage_query(request.args.to_dict(), time.time())
    rows = usage_rows(store, environment_clients(current_app.config), query)
    if _wants_csv(query):
        return Response(usage_csv(rows), mimetype="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="usage.csv"'})
    return jsonify({"object": "list", "from": iso(query["start"]), "to": iso(query["end"]),
                    "group_by": query["group_by"], "data": rows})
