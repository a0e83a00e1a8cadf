"""The requests llama.cpp is answering now, for the operators' page (and its Cancel): the disconnect watch's
upstream calls that carry their request's record. A request waiting for its model or a slot is not listed here:
it holds no llama.cpp slot yet (the models' "queued" counts it)."""
from ..errors import ApiError
from ..operations.request_log import shown_path


class NotInFlight(ApiError):
    """Cancel named a handle that no request llama.cpp is answering now has (it ended, or never was)."""

    status = 404
    code = "request_not_in_flight"

    def __init__(self, handle):
        shown = handle if len(handle) <= 128 and handle.isprintable() else \
            handle[:128].encode("unicode_escape").decode()
        super().__init__(f"No request in flight has the handle '{shown}'; GET /ui/api/inflight lists those that "
                         "are, each with its handle", type="invalid_request_error")


def in_flight(watch) -> list:
    """Each request being answered by llama.cpp now, oldest first: never its prompt or its answer."""
    shown = []
    for call in watch.calls():
        record = call.record
        replica = record.replica
        shown.append({"handle": call.handle, "request_id": record.request_id, "client_id": record.client_id,
                      "model": record.model or (replica.route.name if replica is not None else None),
                      "path": shown_path(record.path), "age_s": round(record.elapsed_ms() / 1000, 2),
                      "chunks_sent": record.chunks_sent, "stream": bool(call.stream)})
    return sorted(shown, key=lambda request: request["age_s"], reverse=True)


def cancel(watch, handle: str):
    """Cut the llama.cpp call with that handle (the gateway's, listed by in_flight: a request id is the client's
    and may be shared) as a client disconnect does; NotInFlight when there is none."""
    if not watch.cancel(handle):
        raise NotInFlight(handle)
