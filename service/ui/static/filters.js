// Filters on the last requests (client, model, status class) and a CSV file of the filtered list, made in the page.
import { shown } from "./dom.js";
import { failed, renderRecent } from "./recent.js";

const ALL = "";
// Each status class: its label and which entries it keeps.
const CLASSES = {
  ok: ["succeeded", (entry) => !failed(entry)],
  failed: ["failed (any ✗)", failed],
  "4xx": ["4xx: refused", (entry) => entry.status >= 400 && entry.status < 500],
  "5xx": ["5xx: the gateway or llama.cpp failed", (entry) => entry.status >= 500],
  late: ["failed after its 200", (entry) => entry.status < 400 && entry.error !== undefined],
};
const COLUMNS = ["time_utc", "request_id", "client_id", "model", "method", "path", "status", "error", "duration_ms",
  "ttft_ms", "prompt_tokens", "completion_tokens", "kv_restored"];

let entries = [];

function option(value, label) {
  const node = document.createElement("option");
  node.value = value;
  node.textContent = label;
  return node;
}

// Offer the values seen (keeping the choice made, even when it has no entry now).
function offer(select, values, allLabel) {
  const chosen = select.value;
  const wanted = [...new Set([...values, ...(chosen ? [chosen] : [])])].sort();
  const now = [...select.options].slice(1).map((node) => node.value);
  if (wanted.length === now.length && wanted.every((value, i) => value === now[i])) return;
  select.replaceChildren(option(ALL, allLabel), ...wanted.map((value) => option(value, shown(value))));
  select.value = chosen;
}

function kept() {
  const client = document.getElementById("filter-client").value;
  const model = document.getElementById("filter-model").value;
  const status = document.getElementById("filter-status").value;
  return entries.filter((entry) => (client === ALL || entry.client_id === client)
    && (model === ALL || entry.model === model) && (status === ALL || CLASSES[status][1](entry)));
}

function draw() {
  renderRecent(document.getElementById("recent").tBodies[0], kept(), entries.length);
}

// Take the gateway's last requests (newest first) and show those the filters keep.
export function showRecent(latest) {
  entries = latest;
  offer(document.getElementById("filter-client"), entries.map((e) => e.client_id).filter((v) => v), "every client");
  offer(document.getElementById("filter-model"), entries.map((e) => e.model).filter((v) => v), "every model");
  draw();
}

// Forget every entry (signing out): the list and the filters' choices empty.
export function clearRecent() {
  for (const id of ["filter-client", "filter-model", "filter-status"]) document.getElementById(id).value = ALL;
  showRecent([]);
}

// One CSV field: quoted where needed; text a spreadsheet would run as a formula (=, +, -, @) starts with '.
function field(value) {
  if (value === undefined || value === null) return "";
  let text = String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// The filtered list as CSV text: a header row, then one row per request, times in UTC (ISO 8601).
export function csv(list = kept()) {
  const lines = [COLUMNS.join(",")];
  for (const entry of list) {
    const time = typeof entry.time === "number" ? new Date(entry.time * 1000).toISOString() : undefined;
    lines.push(COLUMNS.map((column) => field(column === "time_utc" ? time : entry[column])).join(","));
  }
  return `${lines.join("\r\n")}\r\n`;
}

function download() {
  const url = URL.createObjectURL(new Blob([csv()], { type: "text/csv;charset=utf-8" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = `requests-${new Date().toISOString().slice(0, 19).replace(/[-:]/g, "")}Z.csv`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);  // after the browser has taken the file
}

// Wire the filters and the download button.
export function filters() {
  const status = document.getElementById("filter-status");
  status.replaceChildren(option(ALL, "every status"),
    ...Object.entries(CLASSES).map(([value, [label]]) => option(value, label)));
  for (const id of ["filter-client", "filter-model", "filter-status"]) {
    document.getElementById(id).addEventListener("change", draw);
  }
  document.getElementById("recent-csv").addEventListener("click", download);
}
