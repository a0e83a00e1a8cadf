"""The requests llama.cpp is answering now, for the operators' page (and its Cancel): the disconnect watch's
upstream calls that carry their request's record. A request waiting for its model or a slot is not listed here:
it holds no llama.cpp slot yet (the models' "queued" counts it)."""
from ..errors import ApiError
from ..operations.request_log import shown_path


class NotInFlight(ApiError):
    """Cancel named a request that llama.cpp is not answering now (it ended, or never was)."""

    status = 404
    code = "request_not_in_flight"

    def __init__(self, request_id):
        shown = request_id if len(request_id) <= 128 and request_id.isprintable() else \
            request_id[:128].encode("unicode_escape").decode()
        super().__init__(f"No request '{shown}' is in flight; GET /ui/api/inflight lists those that are",
                         type="invalid_request_error")


def in_flight(watch) -> list:
    """Each request being answered by llama.cpp now, oldest first: never its prompt or its answer."""
    shown = []
    for call in watch.calls():
        record = call.record
        replica = record.replica
        shown.append({"request_id": record.request_id, "client_id": record.client_id,
                      "model": record.model or (replica.route.name if replica is not None else None),
                      "path": shown_path(record.path), "age_s": round(record.elapsed_ms() / 1000, 2),
                      "chunks_sent": record.chunks_sent, "stream": bool(call.stream)})
    return sorted(shown, key=lambda request: request["age_s"], reverse=True)


def cancel(watch, request_id: str):
    """Cut the request's llama.cpp call as a client disconnect does; NotInFlight when there is none."""
    if not watch.cancel(request_id):
        raise NotInFlight(request_id)
