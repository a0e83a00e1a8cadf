// The operators' page: sign in with the admin key, then refresh the tables from /ui/api/state every couple of
// seconds, load and unload models with the admin routes, and run the playground.
import { call, errorMessage, forgetKey, saveKey, savedKey } from "./api.js";
import { offerModels, playground } from "./playground.js";
import { renderClients, renderModels, renderRecent } from "./tables.js";

const STATE = "/ui/api/state";
const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

const pending = new Set(); // models with a load or unload under way
let timer = null;
let running = null;
let again = false;

function show(signedIn) {
  $("sign-in").hidden = signedIn;
  $("dashboard").hidden = !signedIn;
  $("signed-in").hidden = !signedIn;
}

function render(state) {
  renderModels($("models").tBodies[0], state.models, pending);
  renderClients($("clients").tBodies[0], state.clients);
  renderRecent($("recent").tBodies[0], state.recent);
  offerModels($("play-model"), state.models);
  $("window").textContent = state.window_s === 60 ? "minute" : `${state.window_s} s`;
  $("updated").textContent = `Updated ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`;
}

function signOut(message) {
  forgetKey();
  clearTimeout(timer);
  show(false);
  $("sign-in-error").textContent = message || "";
  $("admin-key").focus();
}

async function poll() {
  clearTimeout(timer);
  try {
    const response = await call(STATE);
    if (response.status === 401 || response.status === 403) {
      signOut(`The gateway no longer takes this key: ${await errorMessage(response)}`);
      return;
    }
    if (!response.ok) $("updated").textContent = `Refresh failed: ${await errorMessage(response)}`;
    else render(await response.json());
  } catch (error) {
    $("updated").textContent = "The gateway cannot be reached; retrying";
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
  render(await response.json());
  $("models-title").focus();
  refresh();
}

async function act(button) {
  const { action, model } = button.dataset;
  const verb = action === "load" ? "Loading" : "Unloading";
  pending.add(model);
  button.disabled = true;
  $("notice").textContent = `${verb} ${model}…`;
  try {
    const response = await call(`/models/${action}`, { method: "POST", body: { model } });
    $("notice").textContent = response.ok
      ? `${model}: ${(await response.json()).status}`
      : `Could not ${action} ${model}: ${await errorMessage(response)}`;
  } catch (error) {
    $("notice").textContent = `Could not ${action} ${model}: the gateway cannot be reached`;
  } finally {
    pending.delete(model);
    refresh();
  }
}

function start() {
  if (!$("sign-in")) return; // ADMIN_API_KEY is unset: the page only says how to turn it on
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("models").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button && !button.disabled) act(button);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && savedKey() !== null) refresh();
  });
  playground($("playground"), refresh);
  $("models-title").tabIndex = -1;
  if (savedKey() !== null) {
    show(true);
    refresh();
  } else {
    show(false);
  }
}

start();
