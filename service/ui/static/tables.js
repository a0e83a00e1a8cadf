// The models and clients tables, rebuilt from each state the gateway sends.
import { actionButton, el, longText, num, replaceRows, row, shown } from "./dom.js";
import { when } from "./time.js";

// Each status as a mark and a word, so that it reads without colour and without motion (no spinner): what the
// model is doing now, in words.
const STATUSES = {
  loaded: { mark: "✓" }, unloaded: { mark: "○" },
  failed: { mark: "✗", bad: true }, down: { mark: "✗", bad: true },
  loading: { mark: "↑", busy: "starting llama.cpp and reading the model" },
  unloading: { mark: "↓", busy: "letting its requests finish, then stopping llama.cpp" },
  draining: { mark: "↓", busy: "taking no new requests; those in flight finish" },
  restarting: { mark: "↻", busy: "llama.cpp exited; starting it again" },
};
// What the buttons can do in each status: a load of a model that is (being) loaded, an unload of one that is
// (being) unloaded, would do nothing.
const NO_LOAD = new Set(["loaded", "loading", "restarting"]);
const NO_UNLOAD = new Set(["unloaded", "unloading"]);

// The name people read for a model (the one llama-server of LLAMA_SERVER_URL takes any).
export function modelLabel(model) {
  return model.name === null ? "any model name" : model.name;
}

function statusCell(model) {
  const known = STATUSES[model.status] || { mark: "?" };
  const parts = [el("span", `status status-${model.status}`, `${known.mark} ${model.status}`)];
  if (known.busy) {
    const now = model.in_flight ? ` (${model.in_flight} in flight)` : "";
    parts.push(el("span", "reason busy", `${known.busy}${now}`));
  }
  if (model.health === "degraded" && model.status === "loaded") {
    parts.push(el("span", "reason", "busy: requests queued"));
  }
  if (model.failure) parts.push(el("span", "reason", shown(model.failure)));
  const life = model.life;
  if (life && life.restarts) {
    const exit = life.last_exit ? `; last exit: ${shown(life.last_exit)} at ${when(life.last_exit_at)}` : "";
    parts.push(el("span", "reason", `restarted ${life.restarts}×${exit}`));
  }
  return el("div", "stack", ...parts);
}

function replicaItem(replica) {
  const words = [replica.health || "unknown"];
  if (replica.latency_ms !== null && replica.latency_ms !== undefined) words.push(`${replica.latency_ms} ms`);
  words.push(`${replica.in_flight} in flight`);
  if (replica.slots) words.push(`${replica.slots} slots`);
  if (replica.ejected) words.push("out of rotation");
  const item = el("li", null, longText(replica.url, "url"), ` — ${words.join(", ")}`);
  if (replica.reason) item.append(el("span", "reason", shown(replica.reason)));
  return item;
}

function button(model, action, label, disabled) {
  const node = actionButton(label, action, model.name, modelLabel(model));
  node.dataset.model = model.name;
  node.disabled = disabled;
  return node;
}

function actions(model, pending) {
  if (!model.managed) return el("span", "note", "run elsewhere");
  const busy = pending.has(model.name);
  return el("div", "buttons",
    button(model, "load", "Load", busy || NO_LOAD.has(model.status)),
    button(model, "unload", "Unload", busy || NO_UNLOAD.has(model.status)),
    button(model, "log", "Log", false));
}

// The models table; pending: names of models with a load or unload under way (their buttons stay disabled).
export function renderModels(tbody, models, pending) {
  replaceRows(tbody, models.map((model) => {
    const known = STATUSES[model.status] || {};
    const tr = row([longText(modelLabel(model)), statusCell(model),
      el("ul", "replicas", ...model.replicas.map(replicaItem)), num(model.in_flight), num(model.queued),
      actions(model, pending)], known.bad ? "failed" : known.busy ? "working" : null);
    tr.dataset.model = model.name === null ? "" : model.name;
    return tr;
  }));
}

function usage(used, limit) {
  return limit ? `${num(used)} of ${num(limit)} (${num(Math.max(0, limit - used))} left)` : `${num(used)} (no limit)`;
}

// The clients table: the hour's requests, tokens and failures, and the limits' window.
export function renderClients(tbody, clients) {
  replaceRows(tbody, clients.map((client) => {
    const limits = client.limits;
    const tr = row([longText(client.id), num(client.requests), num(client.tokens), num(client.failures),
      limits ? usage(client.window_requests, limits.rpm) : `${num(client.window_requests)} (admin: no limits)`,
      limits ? usage(client.window_tokens, limits.tpm) : num(client.window_tokens), num(client.waiting)]);
    tr.dataset.client = client.id;
    return tr;
  }));
}
