// The keys: those made at run time (kept in the database) and the environment's (OPENAI_API_KEYS, read-only), each
// with its status, models, limits and budget as a bar, and a chart of their tokens per hour over the last 24 hours.
// Read from the admin routes /admin/keys and /admin/usage every 10 s: they change slowly, and a usage query reads
// the database (the page's 2 s refresh asks; this reads only when 10 s have passed).
import { call, savedKey } from "./api.js";
import { el, longText, num, replaceRows, row, shown } from "./dom.js";
import { clearUsage, drawUsage, firstHour, fitUsage } from "./keys_chart.js";
import { clock, onZoneChange, when } from "./time.js";

const KEYS = "/admin/keys";
const USAGE = "/admin/usage";
export const EVERY_MS = 10000;
let storeOff = false; // the gateway said it has no database (store_off)
const STORE_OFF = "This gateway runs without a database: keys made at run time, budgets and kept usage need "
  + "DATABASE_URL.";
// Each status as a mark, a word and when it came (or comes), so that it reads without colour.
const STATUSES = {
  active: ["✓", (key) => (key.expires_at ? `expires ${when(key.expires_at)}` : null)],
  expired: ["○", (key) => `expired ${when(key.expires_at)}`],
  revoked: ["✗", (key) => `revoked ${when(key.revoked_at)}`],
};
const SOURCES = { database: "database", environment: "environment (read-only)" };
// A key's limits: null falls back to the gateway's (RATE_LIMIT_*), which is not this key's to show.
const LIMITS = [
  ["rpm", (v) => `${num(v)} requests/min`], ["tpm", (v) => `${num(v)} tokens/min`],
  ["concurrent", (v) => `${num(v)} at once`], ["weight", (v) => `weight ${num(v)}`],
];
// What a budget counts: its limit's field, the field of what was spent this period, the unit.
const COUNTS = [["tokens", "spent_tokens", "tokens"], ["requests", "spent_requests", "requests"]];
// How full a budget is, from the fullest: its class and the words that mark it (a bar reads without colour too).
const LEVELS = [[1, "over", "✗ over budget"], [0.8, "near", "⚠ near budget"], [-Infinity, "ok", null]];
const $ = (id) => document.getElementById(id);

let fetchedAt = 0;
let generation = 0; // bumped when signing out: an answer still on its way is then dropped
let last = null; // {keys, rows, usageError, now}: redrawn when the time zone changes

// The text of a budget's use, its level's class and words, and the bar's fill (0-100 %).
export function budgetUse(spent, limit) {
  if (spent === null || spent === undefined) return { text: `? of ${num(limit)}`, level: "ok", word: null, fill: 0 };
  const ratio = spent / limit;
  const [, level, word] = LEVELS.find(([from]) => ratio >= from);
  return { text: `${num(spent)} of ${num(limit)} (${Math.floor(ratio * 100)}%)`, level, word,
    fill: Math.min(100, Math.max(0, ratio * 100)) };
}

function bar(budget, [limitField, spentField, unit]) {
  const use = budgetUse(budget[spentField], budget[limitField]);
  const fill = el("span", "fill");
  fill.style.width = `${use.fill}%`; // through the DOM, which the page's style policy allows (no style attribute)
  const track = el("span", "track", fill);
  const words = `${use.text} ${unit} this ${budget.per}${use.word ? `, ${use.word}` : ""}`;
  Object.entries({ role: "meter", "aria-valuemin": "0", "aria-valuemax": String(budget[limitField]),
    "aria-valuenow": String(budget[spentField] ?? 0), "aria-valuetext": words,
    "aria-label": `${unit} budget` }).forEach(([name, value]) => track.setAttribute(name, value));
  const text = el("span", "budget-text", `${use.text} ${unit} per ${budget.per}`);
  if (use.word) text.append(" ", el("strong", "level", use.word));
  return el("div", `budget budget-${use.level}`, text, track);
}

function budgetCell(budget) {
  if (!budget) return el("span", "note", "none");
  const bars = COUNTS.filter(([limitField]) => budget[limitField]).map((count) => bar(budget, count));
  const resets = budget.resets_at ? el("span", "reason", `resets ${when(budget.resets_at)}`) : null;
  return el("div", "stack", ...bars, resets);
}

function isOver(budget) {
  return Boolean(budget) && COUNTS.some(([limitField, spentField]) => budget[limitField]
    && budget[spentField] >= budget[limitField]);
}

function statusCell(key) {
  const [mark, since] = STATUSES[key.status] || ["?", () => null];
  const moment = since(key);
  return el("div", "stack", el("span", `status key-${key.status}`, `${mark} ${shown(key.status)}`),
    moment ? el("span", "reason", moment) : null);
}

function limitsCell(key) {
  const set = LIMITS.filter(([field]) => key[field] !== null && key[field] !== undefined)
    .map(([field, words]) => words(key[field]));
  return set.length ? set.join(", ") : el("span", "note", "the gateway's defaults");
}

function usedCell(used) {
  if (used === null) return "—";
  const mine = used || { tokens: 0, requests: 0 };
  return `${num(mine.tokens)} tokens, ${num(mine.requests)} request${mine.requests === 1 ? "" : "s"}`;
}

function keyRow(key, used) {
  const retired = key.status !== "active";
  const tr = row([longText(key.name), longText(key.id, "key-id"),
    key.prefix ? el("code", null, `${shown(key.prefix)}…`) : el("span", "note", "none"),
    statusCell(key), SOURCES[key.source] || shown(key.source),
    key.models ? el("span", "wrap", key.models.map(shown).join(", ")) : "every model",
    limitsCell(key), budgetCell(key.budget), usedCell(used === null ? null : used.get(key.id))],
  isOver(key.budget) ? "failed" : retired ? "retired" : null);
  tr.dataset.keyId = key.id;
  return tr;
}

// Tokens and requests of each key (any model) over the rows' 24 hours.
function usedByKey(rows) {
  const used = new Map();
  for (const usage of rows) {
    const mine = used.get(usage.key) || { tokens: 0, requests: 0 };
    mine.tokens += (usage.prompt_tokens || 0) + (usage.completion_tokens || 0);
    mine.requests += usage.requests || 0;
    used.set(usage.key, mine);
  }
  return used;
}

function render() {
  const { keys, rows, usageError, now } = last;
  $("keys-shown").hidden = false;
  $("keys-status").textContent = usageError ? `The usage is not available: ${shown(usageError)}` : "";
  const used = rows ? usedByKey(rows) : null;
  replaceRows($("keys").tBodies[0], keys.map((key) => keyRow(key, used)));
  $("keys-updated").textContent = `Read at ${clock(now)}; every 10 s.`;
  if (rows) drawUsage($("keys-chart"), rows, now);
  else clearUsage($("keys-chart"));
  $("keys-chart").hidden = !rows;
}

// The error of an answer that is not a 2xx: the envelope's {code, message}, or its status.
async function failure(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") return body.error;
  } catch (ignored) {
    // Not JSON: the status alone says it.
  }
  return { code: null, message: `HTTP ${response.status}` };
}

function showOnly(line) {
  last = null;
  $("keys").tBodies[0].replaceChildren();
  clearUsage($("keys-chart"));
  $("keys-shown").hidden = true;
  $("keys-status").textContent = line;
}

// Read the keys and their usage when 10 s have passed since the last read (or at once: force), then draw them.
export async function refreshKeys(force = false) {
  if (storeOff || (!force && Date.now() - fetchedAt < EVERY_MS)) return;
  fetchedAt = Date.now();
  const asked = generation;
  const now = Date.now() / 1000;
  const query = `group_by=hour&from=${firstHour(now)}&to=${Math.ceil(now)}`;
  const [keys, usage] = await Promise.all([call(KEYS), call(`${USAGE}?${query}`)]);
  const [keysError, usageError] = [keys.ok ? null : await failure(keys), usage.ok ? null : await failure(usage)];
  const [keyList, usageRows] = [keys.ok ? (await keys.json()).data : null, usage.ok ? (await usage.json()).data : null];
  if (asked !== generation || savedKey() === null) return; // signed out meanwhile: show nothing of it
  if (keysError && keysError.code === "store_off") {
    storeOff = true; // not asked again until the next sign-in: each ask would be a failed request in the list
    showOnly(STORE_OFF);
  } else if (keysError) {
    $("keys-status").textContent = `The keys are not available: ${shown(keysError.message)}`;
  } else {
    last = { keys: keyList, rows: usageRows, usageError: usageError && usageError.message, now };
    render();
  }
}

// Forget every key and usage shown (signing out).
export function clearKeys() {
  generation += 1;
  storeOff = false;
  fetchedAt = 0;
  showOnly("");
  $("keys-updated").textContent = "";
}

// Redraw in a new time zone (the chart's axis is rebuilt), and fit the chart to a new width.
export function keysPanel() {
  onZoneChange(() => {
    if (!last) return;
    clearUsage($("keys-chart"));
    render();
  });
  let width = 0;
  new ResizeObserver(() => {
    const now = $("keys-chart").clientWidth;
    if (now === width) return;
    width = now;
    fitUsage($("keys-chart"));
  }).observe($("keys-chart"));
}
