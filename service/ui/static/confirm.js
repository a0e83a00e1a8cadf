// Before a Load that would unload other models (to make room), or of a model whose last load failed: a dialog
// naming them, so that a healthy model is never evicted without a word.
import { el, shown } from "./dom.js";

const $ = (id) => document.getElementById(id);

// Why a Load of this model needs asking first: a list of sentences (none: load at once).
export function loadWarnings(model) {
  const warnings = [];
  const victims = (model.life && model.life.load_unloads) || [];
  if (victims.length) {
    warnings.push([`Loading it unloads ${victims.length === 1 ? "this model" : "these models"} to make room:`,
      victims]);
  }
  if (model.status === "failed") {
    warnings.push([model.failure ? "Its last load failed:" : "Its last load failed.",
      model.failure ? [model.failure] : []]);
  }
  return warnings;
}

// Ask before loading a model, when it needs asking; resolves to true to load, false to leave things as they are.
export function confirmLoad(model, label) {
  const warnings = loadWarnings(model);
  if (!warnings.length) return Promise.resolve(true);
  const dialog = $("confirm-load");
  $("confirm-title").textContent = `Load ${shown(label)}?`;
  $("confirm-body").replaceChildren(...warnings.flatMap(([sentence, items]) => [el("p", null, sentence),
    ...(items.length ? [el("ul", null, ...items.map((item) => el("li", "wrap", shown(item))))] : [])]));
  return new Promise((resolve) => {
    const finish = (answer) => {
      dialog.removeEventListener("close", dismissed);
      $("confirm-yes").onclick = null;
      $("confirm-no").onclick = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const dismissed = () => finish(false); // Escape
    dialog.addEventListener("close", dismissed);
    $("confirm-yes").onclick = () => finish(true);
    $("confirm-no").onclick = () => finish(false);
    dialog.showModal();
    $("confirm-no").focus(); // the safe choice is the default
  });
}

// Close the dialog unanswered (signing out).
export function dismissConfirm() {
  const dialog = $("confirm-load");
  if (dialog.open) dialog.close();
}
