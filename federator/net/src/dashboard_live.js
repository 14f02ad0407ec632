"use strict";
// Shared by the dashboard pages (served as /ui/live.js): the event stream and the "live" line.
// live(what, onStatus): opens /ui/events, calls onStatus with each status document, and keeps
// the element #feed saying whether the page is live, late, or cut off from `what` (the
// federator, the agent). The server sends at least every second while anything changes.
function age(ms) {
  if (ms === null || ms === undefined) return "never";
  return ms < 10000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms / 1000) + " s";
}

function live(what, onStatus, onFailed) {
  const feed = document.getElementById("feed");
  let lastEvent = 0;
  const es = new EventSource("events");
  es.addEventListener("status", ev => {
    lastEvent = Date.now();
    feed.className = "live";
    feed.textContent = "live";
    onStatus(JSON.parse(ev.data));
  });
  es.addEventListener("failed", ev => {
    feed.className = "down";
    feed.textContent = "the " + what + " cannot report its status: " + ev.data;
    if (onFailed) onFailed(ev.data);
  });
  es.onerror = () => {
    feed.className = "down";
    feed.textContent = "the " + what + " is unreachable; retrying";
  };
  setInterval(() => {
    if (lastEvent && feed.className === "live" && Date.now() - lastEvent > 3000) {
      feed.className = "late";
      feed.textContent = "no update for " + Math.round((Date.now() - lastEvent) / 1000) + " s";
    }
  }, 1000);
}
