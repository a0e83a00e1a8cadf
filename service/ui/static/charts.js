/* global uPlot */
// Over time: requests/s, errors, tokens/s, time to first token and queue depth, overall or of one model, over the
// last hour (10 s steps) or day (5 min steps), from /ui/api/history, drawn with uPlot (vendor/, a global script).
// Each chart has a caption in words too (its last and highest value): a canvas says nothing to a screen reader.
import { call, savedKey } from "./api.js";
import { el, shown } from "./dom.js";
import { when, zone } from "./time.js";

const HISTORY = "/ui/api/history";
const EVERY_MS = { hour: 5000, day: 60000 }; // a new point comes every 10 s (hour) or 5 min (day)
const HEIGHT = 160;
// Each chart: its id, title, unit, series (key in the history, label, colour variable), and whether its points are
// dots (times to first token come from the steps with requests alone: a lone one would not show as a line).
const CHARTS = [
  ["requests", "Requests per second", "/s", [["requests_per_s", "requests/s", "--accent"]]],
  ["errors", "Errors per step", "", [["errors", "errors", "--bad"]]],
  ["tokens", "Tokens per second", "/s", [["tokens_per_s", "tokens/s", "--accent"]]],
  ["ttft", "Time to first token", " ms", [["ttft_p50_ms", "p50", "--accent"], ["ttft_p95_ms", "p95", "--warn"]], true],
  ["queue", "Queue depth", "", [["queue_depth", "queued", "--fg"]]],
];
// uPlot's own axis font, set on the y axes so that each is made as wide as its longest label measures in it: a
// guess per character clipped "4000 ms" on the left in a wider font (Debian's).
const AXIS_FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif';
const Y_AXIS_EDGE = 10 + 5 + 4; // uPlot's tick and gap between a y label and the plot, and a margin at the left
const $ = (id) => document.getElementById(id);

let plots = {}; // chart id -> uPlot
let history = null;
let fetchedAt = 0;

let ruler = null; // a canvas context that measures labels

function labelWidth(text) {
  ruler = ruler || document.createElement("canvas").getContext("2d");
  ruler.font = AXIS_FONT;
  return ruler.measureText(text).width;
}

function colour(variable) {
  return getComputedStyle(document.documentElement).getPropertyValue(variable).trim() || "#888";
}

// The time axis in the chosen zone, 24-hour, with the date (MM-DD) under the first tick and each new day's.
function timeTicks(u, ticks) {
  return ticks.map((t, i) => {
    const [day, time] = [when(t).slice(5, 10), when(t).slice(11, 16)];
    return i === 0 || when(ticks[i - 1]).slice(5, 10) !== day ? `${time}\n${day}` : time;
  });
}

function options(chart, width) {
  const [, , unit, series, dots] = chart;
  const axis = { stroke: colour("--muted"), grid: { stroke: colour("--line"), width: 1 },
    ticks: { stroke: colour("--line"), width: 1 } };
  return {
    width, height: HEIGHT, legend: { show: true }, cursor: { drag: { x: false, y: false } },
    tzDate: (ts) => (zone() === "utc" ? uPlot.tzDate(new Date(ts * 1000), "Etc/UTC") : new Date(ts * 1000)),
    scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    axes: [{ ...axis, values: timeTicks, size: 44 },
      { ...axis, font: AXIS_FONT, values: (u, ticks) => ticks.map((v) => `${+v.toFixed(2)}${unit}`),
        size: (u, values) => Math.ceil(Y_AXIS_EDGE + Math.max(labelWidth("000"), ...(values || []).map(labelWidth))) }],
    series: [{ label: "time", value: (u, v) => (v === null || v === undefined ? "—" : when(v)) },
      ...series.map(([, label, variable]) => ({
        label, stroke: colour(variable), width: 2, spanGaps: false, points: { show: Boolean(dots), size: 5 },
        value: (u, v) => (v === null || v === undefined ? "—" : `${+v.toFixed(2)}${unit}`),
      }))],
  };
}

function summary(chart, data) {
  const [, , unit, series] = chart;
  return series.map(([key, label]) => {
    const values = (data[key] || []).filter((v) => v !== null && v !== undefined);
    if (!values.length) return `${label}: no data yet`;
    const last = values[values.length - 1];
    return `${label}: last ${+last.toFixed(2)}${unit}, highest ${+Math.max(...values).toFixed(2)}${unit}`;
  }).join(" · ");
}

function chosenSeries() {
  if (!history || !history.series) return null;
  return history.series[$("chart-model").value] || history.series["*"] || null;
}

// Draw (or redraw) every chart from the history last fetched.
export function drawCharts() {
  const data = chosenSeries();
  const grid = $("charts");
  if (!data) return;
  for (const chart of CHARTS) {
    const [id, title, , series] = chart;
    const columns = [data.t || [], ...series.map(([key]) => data[key] || [])];
    let figure = $(`chart-${id}`);
    if (!figure) {
      figure = el("figure", "chart", el("figcaption", null, el("strong", null, title), el("span", "summary")),
        el("div", "plot"));
      figure.id = `chart-${id}`;
      grid.append(figure);
    }
    figure.querySelector(".summary").textContent = summary(chart, data);
    const plot = figure.querySelector(".plot");
    if (plots[id]) plots[id].setData(columns);
    else plots[id] = new uPlot(options(chart, Math.max(200, plot.clientWidth)), columns, plot);
    // What the chart draws, for a test (and a curious reader): its points, and the sum of its values.
    const drawn = plots[id].data;
    figure.dataset.points = String(drawn[0].length);
    figure.dataset.sum = String(drawn.slice(1).flat().reduce((total, v) => total + (v || 0), 0));
  }
}

function offerModels() {
  const select = $("chart-model");
  const names = Object.keys(history.series || {}).filter((name) => name !== "*").sort();
  const now = [...select.options].slice(1).map((node) => node.value);
  if (names.length === now.length && names.every((name, i) => name === now[i])) return;
  const chosen = select.value;
  const option = (value, label) => Object.assign(document.createElement("option"), { value, textContent: label });
  select.replaceChildren(option("*", "every model"), ...names.map((name) => option(name, shown(name))));
  select.value = names.includes(chosen) ? chosen : "*";
}

// Fetch the history when its window's next point may be there (or at once: force), then draw.
export async function refreshCharts(force = false) {
  const window = $("chart-window").value;
  if (!force && Date.now() - fetchedAt < EVERY_MS[window]) return;
  fetchedAt = Date.now();
  const response = await call(`${HISTORY}?window=${window}`);
  if (savedKey() === null) return; // signed out while it was on its way: draw nothing of it
  if (!response.ok) {
    $("charts-status").textContent = `The history is not available (HTTP ${response.status}).`;
    return;
  }
  const fetched = await response.json();
  if (savedKey() === null) return;
  history = fetched;
  $("charts-status").textContent = "";
  offerModels();
  drawCharts();
}

// Remove every chart (signing out, or a new time zone: the axes are rebuilt from scratch).
export function clearCharts(forget = true) {
  for (const plot of Object.values(plots)) plot.destroy();
  plots = {};
  $("charts").replaceChildren();
  if (forget) {
    history = null;
    fetchedAt = 0;
    $("chart-model").replaceChildren(Object.assign(document.createElement("option"), { value: "*",
      textContent: "every model" }));
    $("charts-status").textContent = "";
  }
}

// Wire the window and model choices, and redraw at a new width.
export function charts() {
  $("chart-window").addEventListener("change", () => refreshCharts(true).catch(() => {}));
  $("chart-model").addEventListener("change", drawCharts);
  let width = 0;
  new ResizeObserver(() => {
    const now = $("charts").clientWidth;
    if (now === width) return;
    width = now;
    for (const [id, plot] of Object.entries(plots)) {
      plot.setSize({ width: Math.max(200, $(`chart-${id}`).querySelector(".plot").clientWidth), height: HEIGHT });
    }
  }).observe($("charts"));
}
