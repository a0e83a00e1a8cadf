// The three tables: models, clients and the last requests, rebuilt from each state the gateway sends.
import { el, hidden, num, replaceRows, row } from "./dom.js";

// Each status as a mark and a word, so that it reads without colour.
const STATUS_MARKS = { loaded: "✓", loading: "…", unloaded: "○", failed: "✗", down: "✗" };

function modelLabel(model) {
  return model.name === null ? "any model name" : model.name;
}

function statusCell(model) {
  const cell = el("span", `status status-${model.status}`, `${STATUS_MARKS[model.status] || "?"} ${model.status}`);
  const parts = [cell];
  if (model.health === "degraded" && model.status === "loaded") parts.push(el("span", "reason", "busy: requests queued"));
  if (model.failure) parts.push(el("span", "reason", model.failure));
  return el("div", "stack", ...parts);
}

function replicaItem(replica) {
  const words = [replica.health || "unknown"];
  if (replica.latency_ms !== null && replica.latency_ms !== undefined) words.push(`${replica.latency_ms} ms`);
  words.push(`${replica.in_flight} in flight`);
  if (replica.slots) words.push(`${replica.slots} slots`);
  if (replica.ejected) words.push("out of rotation");
  const item = el("li", null, el("span", "url", replica.url), ` — ${words.join(", ")}`);
  if (replica.reason) item.append(el("span", "reason", replica.reason));
  return item;
}

function actionButton(model, action, label, disabled) {
  const button = el("button", null, label, hidden(` ${modelLabel(model)}`));
  button.type = "button";
  button.dataset.action = action;
  button.dataset.model = model.name;
  button.dataset.key = `${action}\u0000${model.name}`;
  button.disabled = disabled;
  return button;
}

function actions(model, pending) {
  if (!model.managed) return el("span", "note", "run elsewhere");
  const busy = pending.has(model.name);
  return el("div", "buttons",
    actionButton(model, "load", "Load", busy || model.status === "loaded" || model.status === "loading"),
    actionButton(model, "unload", "Unload", busy || model.status === "unloaded"));
}

// The models table; pending: names of models with a load or unload under way (their buttons stay disabled).
export function renderModels(tbody, models, pending) {
  replaceRows(tbody, models.map((model) => {
    const name = el("span", "name", modelLabel(model));
    const tr = row([name, statusCell(model), el("ul", "replicas", ...model.replicas.map(replicaItem)),
      num(model.in_flight), num(model.queued), actions(model, pending)],
    model.status === "failed" || model.status === "down" ? "failed" : null);
    tr.dataset.model = model.name === null ? "" : model.name;
    return tr;
  }));
}

function usage(used, limit) {
  return limit ? `${num(used)} of ${num(limit)} (${num(Math.max(0, limit - used))} left)` : `${num(used)} (no limit)`;
}

export function renderClients(tbody, clients) {
  replaceRows(tbody, clients.map((client) => {
    const limits = client.limits;
    const tr = row([el("span", "name", client.id), num(client.requests), num(client.tokens), num(client.failures),
      limits ? usage(client.window_requests, limits.rpm) : `${num(client.window_requests)} (admin: no limits)`,
      limits ? usage(client.window_tokens, limits.tpm) : num(client.window_tokens), num(client.waiting)]);
    tr.dataset.client = client.id;
    return tr;
  }));
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

function statusText(entry) {
  const failed = entry.status === undefined || entry.status >= 400 || entry.error !== undefined;
  const words = [failed ? "✗" : "✓", entry.status === undefined ? "no answer" : String(entry.status)];
  if (entry.error !== undefined) words.push(entry.error);
  return [failed, words.join(" ")];
}

function tokens(entry) {
  if (entry.prompt_tokens === undefined && entry.completion_tokens === undefined) return "—";
  return `${num(entry.prompt_tokens || 0)} + ${num(entry.completion_tokens || 0)}`;
}

export function renderRecent(tbody, entries) {
  replaceRows(tbody, entries.map((entry) => {
    const [failed, status] = statusText(entry);
    const tr = row([clock(entry.time), entry.client_id === undefined ? "—" : entry.client_id,
      entry.model === undefined ? "—" : entry.model, `${entry.method} ${entry.path}`, el("span", "status", status),
      num(entry.duration_ms), num(entry.ttft_ms), tokens(entry)], failed ? "failed" : null);
    tr.dataset.requestId = entry.request_id;
    return tr;
  }));
}
