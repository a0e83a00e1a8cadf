// The operators' page: sign in with the admin key, then refresh everything from /ui/api/state (and the requests in
// flight, the charts' history) every couple of seconds; load and unload models with the admin routes, cancel a
// request, read a model's llama.cpp log, and run the playground. Signing out forgets every value shown.
import { wireActions } from "./actions.js";
import { call, errorMessage, forgetKey, saveKey, savedKey } from "./api.js";
import { charts, clearCharts, drawCharts, refreshCharts } from "./charts.js";
import { dismissConfirm } from "./confirm.js";
import { clearRecent, filters, showRecent } from "./filters.js";
import { fetchInflight, renderInflight } from "./inflight.js";
import { clearKeys, keysPanel, refreshKeys } from "./keys.js";
import { renderLife } from "./life.js";
import { closeLog, logPanel } from "./logs.js";
import { offerModels, playground } from "./playground.js";
import { forgetReach, refreshFailed, refreshed } from "./reach.js";
import { renderClients, renderModels } from "./tables.js";
import { clock, onZoneChange, zoneSwitch } from "./time.js";

const STATE = "/ui/api/state";
const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

const pending = new Set(); // models with a load or unload under way
const cancelling = new Set(); // requests with a cancel under way
let last = null; // the last state and requests in flight shown, redrawn when the time zone changes
let newest; // the newest request listed: when another ends, the charts are fetched at once
let timer = null;
let running = null;
let again = false;

function show(signedIn) {
  $("sign-in").hidden = signedIn;
  $("dashboard").hidden = !signedIn;
  $("signed-in").hidden = !signedIn;
}

function render(state, inflight) {
  last = { state, inflight };
  renderModels($("models").tBodies[0], state.models, pending);
  renderLife($("life"), state.models, state.gateway ? state.gateway.now : Date.now() / 1000);
  renderClients($("clients").tBodies[0], state.clients);
  showRecent(state.recent);
  renderInflight($("inflight").tBodies[0], inflight, cancelling);
  offerModels($("play-model"), state.models);
  $("window").textContent = state.window_s === 60 ? "minute" : `${state.window_s} s`;
  $("updated").textContent = `Updated ${clock(Date.now() / 1000)}`;
  refreshed(state.gateway);
}

// Forget every value shown: the tables, cards, charts, log and the playground's answer.
function clearAll() {
  last = null;
  newest = undefined;
  for (const id of ["models", "clients", "inflight"]) $(id).tBodies[0].replaceChildren();
  clearRecent();
  $("life").replaceChildren();
  clearCharts();
  clearKeys();
  closeLog();
  dismissConfirm();
  forgetReach();
  $("play-model").replaceChildren();
  for (const id of ["play-answer", "play-stats", "notice"]) $(id).textContent = "";
  $("updated").textContent = "Not refreshed yet";
}

function signOut(message) {
  forgetKey();
  clearTimeout(timer);
  clearAll();
  show(false);
  $("sign-in-error").textContent = message || "";
  $("admin-key").focus();
}

async function poll() {
  clearTimeout(timer);
  try {
    const [response, inflight] = await Promise.all([call(STATE), fetchInflight().catch(() => null)]);
    if (savedKey() === null) return; // signed out while it was on its way: show nothing of it
    if (response.status === 401 || response.status === 403) {
      signOut(`The gateway no longer takes this key: ${await errorMessage(response)}`);
      return;
    }
    if (!response.ok) {
      refreshFailed(`HTTP ${response.status}: ${await errorMessage(response)}`);
    } else {
      const state = await response.json();
      render(state, inflight ?? (last ? last.inflight : []));
      const top = state.recent.length ? state.recent[0].request_id : null;
      refreshKeys().catch(() => {}); // every 10 s, not waited for: the keys do not hold up this refresh
      await refreshCharts(top !== newest).catch(() => {});
      newest = top;
    }
  } catch (error) {
    if (savedKey() !== null) refreshFailed("no answer");
  }
  if (savedKey() !== null && !document.hidden) timer = setTimeout(refresh, REFRESH_MS);
}

// One refresh at a time; asked for during one, another follows it at once (after an action, say).
function refresh() {
  if (running) {
    again = true;
    return running;
  }
  running = poll().finally(() => {
    running = null;
    if (again) {
      again = false;
      refresh();
    }
  });
  return running;
}

async function signIn(event) {
  event.preventDefault();
  const input = $("admin-key");
  const key = input.value.trim();
  $("sign-in-error").textContent = "Checking…";
  let response;
  try {
    response = await call(STATE, { key });
  } catch (error) {
    $("sign-in-error").textContent = "The gateway cannot be reached.";
    return;
  }
  if (!response.ok) {
    $("sign-in-error").textContent = `Refused (${response.status}): ${await errorMessage(response)}`;
    input.select();
    return;
  }
  saveKey(key);
  input.value = "";
  $("sign-in-error").textContent = "";
  show(true);
  render(await response.json(), []);
  $("models-title").focus();
  refresh();
}

function start() {
  if (!$("sign-in")) return; // ADMIN_API_KEY is unset: the page only says how to turn it on
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  wireActions({ models: () => (last ? last.state.models : []), pending, cancelling, refresh });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && savedKey() !== null) refresh();
  });
  zoneSwitch($("time-zone"));
  onZoneChange(() => {
    if (last) render(last.state, last.inflight);
    clearCharts(false);
    drawCharts();
  });
  filters();
  charts();
  keysPanel();
  logPanel();
  playground($("playground"), refresh);
  $("models-title").tabIndex = -1;
  show(savedKey() !== null);
  if (savedKey() !== null) refresh();
}

start();
