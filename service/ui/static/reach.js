// Whether what the page shows is still true: when a refresh fails the tables are dimmed and a banner says since
// when the gateway cannot be reached; when the gateway started again (its started_at changed) a notice says that
// its counts start again from nothing.
import { clock, when } from "./time.js";

const $ = (id) => document.getElementById(id);

let unreachableSince = null; // epoch seconds of the first failed refresh in a row
let startedAt = null;

// A refresh failed (the gateway did not answer, or answered an error): dim the tables and say since when.
export function refreshFailed(why) {
  if (unreachableSince === null) unreachableSince = Date.now() / 1000;
  $("dashboard").classList.add("stale");
  const banner = $("unreachable");
  banner.textContent = `Gateway unreachable since ${clock(unreachableSince)} (${why}); what is shown may be out of `
    + "date. Retrying.";
  banner.hidden = false;
}

// A refresh succeeded: undim, and notice a restart of the gateway (every count it keeps in memory is new).
export function refreshed(gateway) {
  unreachableSince = null;
  $("dashboard").classList.remove("stale");
  $("unreachable").hidden = true;
  if (!gateway || gateway.started_at === undefined) return;
  if (startedAt !== null && gateway.started_at !== startedAt) {
    const notice = $("restarted");
    notice.textContent = `Gateway restarted at ${when(gateway.started_at)}: counts start again.`;
    notice.hidden = false;
  }
  startedAt = gateway.started_at;
  $("gateway-version").textContent = gateway.version ? `version ${gateway.version}, ` : "";
  $("gateway-started").textContent = when(gateway.started_at);
}

// Forget it all (signing out).
export function forgetReach() {
  unreachableSince = null;
  startedAt = null;
  $("dashboard").classList.remove("stale");
  for (const id of ["unreachable", "restarted"]) {
    $(id).hidden = true;
    $(id).textContent = "";
  }
  $("gateway-version").textContent = "";
  $("gateway-started").textContent = "—";
}
