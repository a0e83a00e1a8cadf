// Times as the gateway's logs write them: UTC with the date (YYYY-MM-DD HH:MM:SS UTC), or, by the reader's choice
// (kept in this browser), the local time with its offset from UTC.
const CHOICE = "llama-gateway.time-zone";
const listeners = [];

// "utc" or "local": how times are shown now.
export function zone() {
  return sessionStorage.getItem(CHOICE) === "local" ? "local" : "utc";
}

// Show times in the given zone ("utc" or "local") from now on, and redraw what shows them.
export function setZone(chosen) {
  sessionStorage.setItem(CHOICE, chosen);
  for (const listener of listeners) listener();
}

// Call fn whenever the zone changes.
export function onZoneChange(fn) {
  listeners.push(fn);
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

function offset(date) {
  const minutes = -date.getTimezoneOffset();
  const sign = minutes < 0 ? "-" : "+";
  return `UTC${sign}${pad(Math.floor(Math.abs(minutes) / 60))}:${pad(Math.abs(minutes) % 60)}`;
}

// An epoch (seconds) as a date and time: "2027-01-15 08:00:00 UTC", or local "2027-01-15 13:30:00 UTC+05:30".
export function when(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const d = new Date(seconds * 1000);
  if (zone() === "utc") {
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} `
      + `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} UTC`;
  }
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())} ${offset(d)}`;
}

// The time of day alone, in the chosen zone: "08:00:00 UTC" (for notices about the last minutes).
export function clock(seconds) {
  return when(seconds).slice(11);
}

// A duration in seconds as people say it: "45 s", "12 min", "3 h 5 min".
export function span(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// Wire the UTC/local choice (a select of "utc" and "local").
export function zoneSwitch(select) {
  select.value = zone();
  select.addEventListener("change", () => setZone(select.value));
}
