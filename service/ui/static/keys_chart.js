/* global uPlot */
// Tokens per hour over the last 24 hours, one line per key (the 8 that used the most, the rest summed as one),
// from /admin/usage's hourly rows, drawn with uPlot (vendor/). Its caption says each line's total in words too.
import { shown } from "./dom.js";
import { when, zone } from "./time.js";

export const HOUR_S = 3600;
export const HOURS = 24;
const TOP = 8;
const HEIGHT = 200;
const LABEL_CHARS = 24; // a legend entry stays narrow (the whole name is in the keys' table and the caption)
// Okabe-Ito's colours (told apart with most colour blindness), then the page's own for the rest.
const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#d55e00", "#cc79a7", "#0072b2", "#f0e442", "#999999"];

let plot = null;

// The first hour of the chart (epoch s): the hour 23 hours before the one now, so that 24 hours show.
export function firstHour(now) {
  return Math.floor(now / HOUR_S) * HOUR_S - (HOURS - 1) * HOUR_S;
}

// Hourly rows (any model) as {t: [24 hours], series: [{key, label, total, values}]}: the TOP keys by tokens, then
// one "other keys" series summing the rest (when there is a rest).
export function usageSeries(rows, now) {
  const start = firstHour(now);
  const t = Array.from({ length: HOURS }, (_, i) => start + i * HOUR_S);
  const byKey = new Map();
  for (const row of rows) {
    const index = Math.round((Date.parse(row.period) / 1000 - start) / HOUR_S);
    if (!(index >= 0 && index < HOURS)) continue;
    const name = row.name === null || row.name === undefined ? row.key : row.name;
    const entry = byKey.get(row.key) || { key: row.key, label: name, total: 0, values: new Array(HOURS).fill(0) };
    const tokens = (row.prompt_tokens || 0) + (row.completion_tokens || 0);
    entry.values[index] += tokens;
    entry.total += tokens;
    byKey.set(row.key, entry);
  }
  const ranked = [...byKey.values()].sort((a, b) => b.total - a.total || String(a.label).localeCompare(b.label));
  const series = ranked.slice(0, TOP);
  const rest = ranked.slice(TOP);
  if (rest.length) {
    series.push({ key: null, label: `${rest.length} other keys`, total: rest.reduce((sum, s) => sum + s.total, 0),
      values: t.map((_, i) => rest.reduce((sum, s) => sum + s.values[i], 0)) });
  }
  return { t, series };
}

function colour(variable) {
  return getComputedStyle(document.documentElement).getPropertyValue(variable).trim() || "#888";
}

function label(text) {
  const safe = shown(text);
  return safe.length > LABEL_CHARS ? `${safe.slice(0, LABEL_CHARS - 1)}…` : safe;
}

// The time axis in the chosen zone: the hour, with the date (MM-DD) under the first tick and each new day's.
function hourTicks(u, ticks) {
  return ticks.map((t, i) => {
    const day = when(t).slice(5, 10);
    const hour = when(t).slice(11, 16);
    return i === 0 || when(ticks[i - 1]).slice(5, 10) !== day ? `${hour}\n${day}` : hour;
  });
}

function options(series, width) {
  const axis = { stroke: colour("--muted"), grid: { stroke: colour("--line"), width: 1 },
    ticks: { stroke: colour("--line"), width: 1 } };
  const tokens = (u, v) => (v === null || v === undefined ? "—" : Math.round(v).toLocaleString("en"));
  return {
    width, height: HEIGHT, legend: { show: true }, cursor: { drag: { x: false, y: false } },
    tzDate: (ts) => (zone() === "utc" ? uPlot.tzDate(new Date(ts * 1000), "Etc/UTC") : new Date(ts * 1000)),
    scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    axes: [{ ...axis, values: hourTicks, size: 44 },
      { ...axis, values: (u, ticks) => ticks.map((v) => tokens(u, v)),
        size: (u, values) => 16 + 7 * Math.max(3, ...(values || []).map((v) => v.length)) }],
    series: [{ label: "hour", value: (u, v) => (v === null || v === undefined ? "—" : when(v)) },
      ...series.map((s, i) => ({ label: label(s.label), stroke: s.key === null ? colour("--fg") : PALETTE[i],
        width: 2, points: { show: true, size: 5 }, value: tokens }))],
  };
}

// The chart's caption in words: each line's total over the 24 hours.
export function usageSummary(series) {
  if (!series.length) return "No tokens used in the last 24 hours.";
  return series.map((s) => `${shown(s.label)}: ${s.total.toLocaleString("en")} tokens`).join(" · ");
}

// Draw the chart in figure (its .plot and .summary) from the usage rows; rebuilt when the keys shown change.
export function drawUsage(figure, rows, now) {
  const { t, series } = usageSeries(rows, now);
  const columns = [t, ...series.map((s) => s.values)];
  const labels = series.map((s) => label(s.label)).join("\u0000");
  if (plot && plot.labels === labels) {
    plot.chart.setData(columns);
  } else {
    clearUsage(figure);
    const box = figure.querySelector(".plot");
    plot = { labels, chart: new uPlot(options(series, Math.max(200, box.clientWidth)), columns, box) };
  }
  figure.querySelector(".summary").textContent = usageSummary(series);
  // What the chart draws, for a test (and a curious reader): its hours, lines and the sum of its values.
  figure.dataset.points = String(t.length);
  figure.dataset.lines = String(series.length);
  figure.dataset.sum = String(plot.chart.data.slice(1).flat().reduce((sum, v) => sum + (v || 0), 0));
}

// Fit the chart to its figure's width (the window was resized).
export function fitUsage(figure) {
  if (plot) plot.chart.setSize({ width: Math.max(200, figure.querySelector(".plot").clientWidth), height: HEIGHT });
}

// Remove the chart and its caption (signing out, or a new time zone: the axis is rebuilt from scratch).
export function clearUsage(figure) {
  if (plot) plot.chart.destroy();
  plot = null;
  figure.querySelector(".plot").replaceChildren();
  figure.querySelector(".summary").textContent = "";
  for (const name of ["points", "lines", "sum"]) delete figure.dataset[name];
}
