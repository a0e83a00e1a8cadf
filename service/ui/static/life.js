// Each model's life: its memory, context, slots, load time, last use and idle unload, restarts and last exit, warm
// conversations, and what a Load would unload now; one card per model, rebuilt from each state.
import { el, num, shown } from "./dom.js";
import { modelLabel } from "./tables.js";
import { span, when } from "./time.js";

function mib(value) {
  if (value === null || value === undefined) return "—";
  return value >= 1024 ? `${(value / 1024).toFixed(1)} GiB` : `${Math.round(value)} MiB`;
}

function ago(at, now) {
  return at === null || at === undefined ? "—" : `${when(at)} (${span(now - at)} ago)`;
}

function idleUnload(life, now) {
  if (life.pinned) return "never: pinned";
  if (life.idle_unload_at === null || life.idle_unload_at === undefined) return "—";
  return `${when(life.idle_unload_at)} (in ${span(life.idle_unload_at - now)})`;
}

function restarts(life) {
  if (!life.restarts) return "none";
  const exit = life.last_exit ? `; last exit: ${shown(life.last_exit)}, ${when(life.last_exit_at)}` : "";
  return `${num(life.restarts)}${exit}`;
}

function warm(kv) {
  if (!kv) return "—";
  return `${num(kv.states)} conversations, ${num(kv.tokens)} tokens, ${mib(kv.bytes / 1048576)}`;
}

function victims(life) {
  const names = life.load_unloads || [];
  return names.length ? names.map(shown).join(", ") : "nothing";
}

// The facts of one model's life, as a label and its text each; a table, not branches.
const FACTS = [
  ["Memory (estimate)", (life) => mib(life.memory_mib)],
  ["Context", (life) => (life.ctx ? `${num(life.ctx)} tokens` : "—")],
  ["Slots busy", (life) => (life.slots_total ? `${num(life.slots_busy)} of ${num(life.slots_total)}` : "—")],
  ["Last load took", (life) => (typeof life.load_s === "number" ? `${life.load_s.toFixed(1)} s` : "—")],
  ["Loaded at", (life, now) => ago(life.loaded_at, now)],
  ["Last used", (life, now) => ago(life.last_used, now)],
  ["Idle unload", idleUnload],
  ["Restarts", restarts],
  ["Warm conversations", (life) => warm(life.kv)],
  ["A Load now unloads", victims],
];

function card(model, now) {
  const facts = el("dl", "facts");
  for (const [label, text] of FACTS) facts.append(el("dt", null, label), el("dd", null, text(model.life, now)));
  const article = el("article", "life", el("h3", "wrap", shown(modelLabel(model))),
    el("p", `status status-${model.status}`, model.status), facts);
  article.dataset.model = model.name === null ? "" : model.name;
  return article;
}

// The cards of the models that have a life to tell (the gateway's own, managed ones); now: the gateway's clock.
export function renderLife(container, models, now) {
  const cards = models.filter((model) => model.life).map((model) => card(model, now));
  container.replaceChildren(...(cards.length ? cards : [el("p", "note", "No model is run by this gateway.")]));
}
