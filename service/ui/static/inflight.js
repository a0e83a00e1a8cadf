// In flight now: the requests llama.cpp is answering, each with a Cancel button (the gateway then aborts its
// upstream call as a client's disconnect does, llama.cpp frees the slot, and the client is told). Cancel names the
// gateway's handle of that call: a request id is the client's choice, and two requests may share one.
import { call, errorMessage } from "./api.js";
import { actionButton, el, longText, num, replaceRows, row, shown } from "./dom.js";
import { span } from "./time.js";

const INFLIGHT = "/ui/api/inflight";

function cancelButton(request) {
  const button = actionButton("Cancel", "cancel", request.handle, `request ${request.request_id}`);
  button.dataset.handle = request.handle;
  button.dataset.requestId = request.request_id;
  return button;
}

function idCell(id) {
  const code = el("code", "request-id", shown(String(id).slice(0, 8)));
  code.title = shown(id);
  return code;
}

// The table's rows from /ui/api/inflight's data; cancelling: handles whose cancel is under way.
export function renderInflight(tbody, requests, cancelling = new Set()) {
  replaceRows(tbody, requests.map((request) => {
    const button = cancelButton(request);
    button.disabled = cancelling.has(request.handle);
    const tr = row([idCell(request.request_id), longText(request.client_id ?? "—"), longText(request.model ?? "—"),
      longText(request.path ?? "—", "path"), span(request.age_s), num(request.chunks_sent),
      request.stream ? "stream" : "whole answer", button]);
    tr.dataset.requestId = request.request_id;
    tr.dataset.handle = request.handle;
    return tr;
  }));
  const empty = document.getElementById("inflight-empty");
  if (empty) empty.hidden = requests.length > 0;
}

// The requests in flight now, or null when the gateway did not say (the caller keeps the last ones).
export async function fetchInflight() {
  const response = await call(INFLIGHT);
  if (!response.ok) return null;
  const body = await response.json();
  return Array.isArray(body.data) ? body.data : [];
}

// Cancel the request in flight with that handle (id: its request id, for the words); resolves to the words for
// the page's notice.
export async function cancelRequest(handle, id) {
  try {
    const response = await call(`/ui/api/requests/${encodeURIComponent(handle)}/cancel`, { method: "POST" });
    if (response.ok) return `Cancelled request ${shown(id)}.`;
    if (response.status === 404) return `Request ${shown(id)} had already ended.`;
    return `Could not cancel request ${shown(id)}: ${shown(await errorMessage(response))}`;
  } catch (error) {
    return `Could not cancel request ${shown(id)}: the gateway cannot be reached`;
  }
}
