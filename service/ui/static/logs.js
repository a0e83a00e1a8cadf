// llama.cpp's own log of one model, its last lines, polled every 2 s while the panel is open (as llama-swap shows
// it). Its words stay on this page: each line is text, with deceptive characters written out.
import { call, errorMessage } from "./api.js";
import { shown } from "./dom.js";
import { clock } from "./time.js";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

let open = null; // the model whose log is shown, or null
let timer = null;
let generation = 0; // a poll answered after its panel closed (or changed model) is dropped

function logPath(name) {
  return `/ui/api/models/${encodeURIComponent(name)}/log`;
}

async function poll(mine) {
  const lines = $("log-lines");
  let words;
  try {
    const response = await call(logPath(open));
    if (mine !== generation) return;
    if (response.ok) {
      const body = await response.json();
      if (mine !== generation) return;
      // Kept at the bottom while the reader is there; left alone once they scroll up to read.
      const atEnd = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 4;
      lines.textContent = (body.lines || []).map(shown).join("\n") || "(nothing written yet)";
      if (atEnd) lines.scrollTop = lines.scrollHeight;
      words = `${(body.lines || []).length} lines, updated ${clock(Date.now() / 1000)}`;
    } else {
      words = `Refresh failed: ${await errorMessage(response)}`;
    }
  } catch (error) {
    if (mine !== generation) return;
    words = "The gateway cannot be reached; retrying";
  }
  if (mine !== generation) return;
  $("log-status").textContent = words;
  timer = setTimeout(() => poll(mine), POLL_MS);
}

// Open the panel on a model's log (or switch it to another model) and start polling.
export function openLog(name) {
  closeLog();
  open = name;
  $("log-title-name").textContent = shown(name);
  $("log-lines").textContent = "";
  $("log-status").textContent = "Reading…";
  $("log-panel").hidden = false;
  $("log-panel").scrollIntoView({ block: "nearest" });
  $("log-close").focus();
  poll(generation);
}

// Close the panel, stop polling, and forget its lines.
export function closeLog() {
  generation += 1;
  clearTimeout(timer);
  open = null;
  $("log-panel").hidden = true;
  $("log-lines").textContent = "";
  $("log-status").textContent = "";
  $("log-title-name").textContent = "";
}

// Wire the panel's Close button.
export function logPanel() {
  $("log-close").addEventListener("click", closeLog);
}
