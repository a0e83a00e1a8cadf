// The playground: one chat message to a model, its answer streamed as the gateway relays it, with the time to the
// first token and the tokens per second. It posts to /ui/api/chat with the admin key (client "admin").
import { call, errorMessage } from "./api.js";
import { shown } from "./dom.js";

const EVENT_END = /\r?\n\r?\n/;

// Fill the model list from the state's models, keeping the choice the user made.
export function offerModels(select, models) {
  const names = models.map((model) => (model.name === null ? "default" : model.name));
  const offered = [...select.options].map((option) => option.value);
  if (names.length === offered.length && names.every((name, i) => name === offered[i])) return;
  const chosen = select.value;
  select.replaceChildren(...models.map((model, i) => {
    const option = document.createElement("option");
    option.value = names[i];
    option.textContent = model.name === null ? "any (the one llama-server)" : shown(model.name);
    return option;
  }));
  if (names.includes(chosen)) select.value = chosen;
}

// Wire the playground's form; onDone() runs after each answer (the page refreshes its tables then).
export function playground(form, onDone) {
  const answer = document.getElementById("play-answer");
  const stats = document.getElementById("play-stats");
  const send = document.getElementById("play-send");
  const stop = document.getElementById("play-stop");
  let controller = null;

  stop.addEventListener("click", () => controller && controller.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    answer.textContent = "";
    stats.textContent = "Sending…";
    try {
      await converse(controller.signal, answer, stats);
    } catch (error) {
      stats.textContent = error.name === "AbortError" ? "Stopped." : `The stream broke: ${error.message}`;
    } finally {
      send.disabled = false;
      stop.disabled = true;
      controller = null;
      onDone();
    }
  });
}

async function converse(signal, answer, stats) {
  const body = {
    model: document.getElementById("play-model").value,
    messages: [{ role: "user", content: document.getElementById("play-message").value }],
    max_tokens: Number(document.getElementById("play-max").value) || 64,
    stream: true,
    stream_options: { include_usage: true },
  };
  const started = performance.now();
  const response = await call("/ui/api/chat", { method: "POST", body, signal });
  if (!response.ok) {
    stats.textContent = `Refused (${response.status}): ${await errorMessage(response)}`;
    return;
  }
  const timing = { started, first: null, last: null, usage: null, chunks: 0, failed: null };
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    let end;
    while ((end = EVENT_END.exec(pending)) !== null) {
      const event = pending.slice(0, end.index);
      pending = pending.slice(end.index + end[0].length);
      take(event, answer, stats, timing);
    }
  }
  stats.textContent = timing.failed ? `The model failed: ${timing.failed}` : summary(timing);
}

// One SSE event: a comment while the model loads or waits for a slot, a chunk of the answer, the usage, or an error.
function take(event, answer, stats, timing) {
  const data = [];
  for (const line of event.split(/\r?\n/)) {
    if (line.startsWith(":")) stats.textContent = "Waiting for the model (loading, or for a free slot)…";
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length || data[0] === "[DONE]") return;
  const chunk = JSON.parse(data.join("\n"));
  if (chunk.error) {
    timing.failed = chunk.error.message || "an error";
    return;
  }
  if (chunk.usage) timing.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    const text = choice.delta && choice.delta.content;
    if (!text) continue;
    const now = performance.now();
    if (timing.first === null) {
      timing.first = now;
      stats.textContent = `First token after ${Math.round(now - timing.started)} ms; streaming…`;
    }
    timing.last = now;
    timing.chunks += 1;
    answer.append(text);
  }
}

function summary(timing) {
  if (timing.first === null) return "The answer is empty.";
  const tokens = timing.usage ? timing.usage.completion_tokens : timing.chunks;
  const seconds = (timing.last - timing.first) / 1000;
  // The first token ends the wait; the rate is of the tokens after it.
  const rate = tokens > 1 && seconds > 0 ? ((tokens - 1) / seconds).toFixed(1) : "—";
  return `First token after ${Math.round(timing.first - timing.started)} ms · ${tokens} tokens · ${rate} tokens/s`;
}
