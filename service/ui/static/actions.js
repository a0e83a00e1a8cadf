// The page's actions on the gateway: load and unload a model (asking first when a Load would unload others or
// its last load failed), open a model's llama.cpp log, cancel a request in flight. The notice says how it went,
// unless the admin signed out meanwhile: the signed-out page shows nothing of it.
import { call, errorMessage, savedKey } from "./api.js";
import { confirmLoad } from "./confirm.js";
import { shown } from "./dom.js";
import { cancelRequest } from "./inflight.js";
import { openLog } from "./logs.js";
import { modelLabel } from "./tables.js";

const $ = (id) => document.getElementById(id);
const signedOut = () => savedKey() === null;

// page: { models() (the models last shown), pending, cancelling (Sets of names and handles under way), refresh() }.
export function wireActions(page) {
  $("models").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button && !button.disabled) act(page, button);
  });
  $("inflight").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action=cancel]");
    if (button && !button.disabled) cancel(page, button);
  });
}

async function act(page, button) {
  const { action, model } = button.dataset;
  if (action === "log") {
    openLog(model);
    return;
  }
  const known = page.models().find((m) => m.name === model);
  const label = known ? modelLabel(known) : model;
  if (action === "load" && known && !(await confirmLoad(known, label))) {
    if (!signedOut()) $("notice").textContent = `${shown(label)}: not loaded.`;
    return;
  }
  page.pending.add(model);
  button.disabled = true;
  $("notice").textContent = `${action === "load" ? "Loading" : "Unloading"} ${shown(label)}…`;
  page.refresh(); // show its new status (loading, unloading) while it happens
  let words;
  try {
    const response = await call(`/models/${action}`, { method: "POST", body: { model } });
    words = response.ok
      ? `${shown(label)}: ${(await response.json()).status}`
      : `Could not ${action} ${shown(label)}: ${shown(await errorMessage(response))}`;
  } catch (error) {
    words = `Could not ${action} ${shown(label)}: the gateway cannot be reached`;
  } finally {
    page.pending.delete(model);
  }
  if (signedOut()) return;
  $("notice").textContent = words;
  page.refresh();
}

async function cancel(page, button) {
  const { handle, requestId } = button.dataset;
  page.cancelling.add(handle);
  button.disabled = true;
  const words = await cancelRequest(handle, requestId);
  page.cancelling.delete(handle);
  if (signedOut()) return;
  $("notice").textContent = words;
  page.refresh();
}
