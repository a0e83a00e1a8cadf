// The last requests: their table (newest first), with the request id (short, the whole of it in its title) and
// the time in the chosen zone; filtered by filters.js.
import { el, longText, num, replaceRows, row, shown } from "./dom.js";
import { when } from "./time.js";

const ID_SHOWN = 8;

// Whether a request failed: no answer, an error status, or an error after its 200 (a stream that broke).
export function failed(entry) {
  return entry.status === undefined || entry.status === null || entry.status >= 400 || entry.error !== undefined;
}

function statusText(entry) {
  const words = [failed(entry) ? "✗" : "✓", entry.status === undefined ? "no answer" : String(entry.status)];
  if (entry.error !== undefined) words.push(shown(entry.error));
  return words.join(" ");
}

function tokens(entry) {
  if (entry.prompt_tokens === undefined && entry.completion_tokens === undefined) return "—";
  const restored = entry.kv_restored ? ` (${num(entry.kv_restored)} restored)` : "";
  return `${num(entry.prompt_tokens || 0)} + ${num(entry.completion_tokens || 0)}${restored}`;
}

function requestId(id) {
  if (id === undefined || id === null) return "—";
  const code = el("code", "request-id", shown(String(id).slice(0, ID_SHOWN)));
  code.title = shown(id);
  return code;
}

const orDash = (value) => (value === undefined || value === null ? "—" : longText(value));

// The rows of the (filtered) entries; total: how many there are before the filter, for the count shown.
export function renderRecent(tbody, entries, total) {
  replaceRows(tbody, entries.map((entry) => {
    const tr = row([when(entry.time), requestId(entry.request_id), orDash(entry.client_id), orDash(entry.model),
      longText(`${entry.method} ${entry.path}`, "path"), el("span", "status", statusText(entry)),
      num(entry.duration_ms), num(entry.ttft_ms), tokens(entry)], failed(entry) ? "failed" : null);
    tr.dataset.requestId = entry.request_id;
    return tr;
  }));
  const count = document.getElementById("recent-count");
  if (count) count.textContent = entries.length === total ? `${total} requests` : `${entries.length} of ${total}`;
}
