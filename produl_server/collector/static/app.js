// Live view of the events a local Produl collector received.
// Polls GET /api/events once a second; renders with textContent only, so an
// event's content can never inject markup into the page.
// Reading events needs the collector's access token: the address it prints
// carries it in the fragment (#token=...), which never leaves the browser;
// it is kept for this tab and sent as "Authorization: Bearer <token>".
// The pace chart polls GET /api/pace (same token) and draws the collection
// requests per second as SVG bars: 429s in red, the quota as a dashed line.
"use strict";

const POLL_MS = 1000;
const LIMIT = 200;
const TOKEN_KEY = "produl-collector-token";
const $ = (id) => document.getElementById(id);
let seen = new Set();
let firstLoad = true;

function takeTokenFromAddress() {
  const hash = new URLSearchParams(window.location.hash.slice(1));
  const token = hash.get("token");
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function showLock(locked) {
  $("unlock").hidden = !locked;
}

function filters() {
  const params = new URLSearchParams({ limit: String(LIMIT) });
  const pairs = [["t", "filter-type"], ["n", "filter-name"], ["vi", "filter-visitor"]];
  for (const [key, id] of pairs) {
    const value = $(id).value.trim();
    if (value) params.set(key, value);
  }
  return params;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function renderEvents(events) {
  const body = $("events");
  const rows = events.map((stored) => {
    const ev = stored.event;
    const tr = document.createElement("tr");
    tr.dataset.id = String(stored.id);
    if (!firstLoad && !seen.has(stored.id)) tr.className = "new";
    const warnings = stored.warnings || [];
    if (warnings.length) {
      // Fields the API reference marks required: Produl may drop the event.
      tr.classList.add("warned");
      tr.title = warnings.join(", ") + " (Produl may drop it)";
    }
    const when = new Date(stored.received_at * 1000).toLocaleTimeString();
    tr.append(
      cell(when),
      // A keyless event (a browser's, with a site id k) may come from any web
      // page open in this browser: the page marks it untrusted.
      ev.k === undefined
        ? cell(ev.t === "pv" ? "pageview" : "event", "type-" + ev.t)
        : cell((ev.t === "pv" ? "pageview" : "event") + " · keyless, untrusted", "untrusted"),
      cell(ev.n),
      cell(ev.p),
      cell(ev.ti, "title"),
      cell(ev.vi),
      cell(ev.sk),
      cell(ev.pr === undefined ? "" : JSON.stringify(ev.pr), "props"),
    );
    return tr;
  });
  body.replaceChildren(...rows);
  seen = new Set(events.map((stored) => stored.id));
  firstLoad = false;
  $("empty").hidden = events.length > 0;
}

function renderFlagged(flagged) {
  const line = $("flagged");
  line.hidden = !flagged;
  line.textContent = flagged
    ? `${plural(flagged, "event")} without u, p, vi or sk, which the API reference ` +
      "marks required: Produl may drop them (hover a marked row for the field)."
    : "";
}

function renderCounts(counts, total) {
  const items = Object.entries(counts).map(([name, count]) => {
    const li = document.createElement("li");
    li.dataset.name = name;
    li.append(document.createTextNode(name));
    const b = document.createElement("b");
    b.textContent = String(count);
    li.append(b);
    return li;
  });
  $("counts").replaceChildren(...items);
  $("total").textContent = `(${total} in all)`;
}

function setStatus(text, state) {
  const status = $("status");
  status.textContent = text;
  status.className = "status " + state;
}

async function refresh() {
  try {
    const response = await fetch("/api/events?" + filters().toString(), {
      cache: "no-store",
      headers: authHeaders(),
    });
    if (response.status === 401) {
      showLock(true);
      setStatus("locked: open the address the collector printed, or paste its token", "locked");
      return;
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    showLock(false);
    const data = await response.json();
    renderEvents(data.events);
    renderCounts(data.counts, data.total);
    renderFlagged(data.flagged);
    setStatus("live, updated " + new Date().toLocaleTimeString(), "live");
  } catch (error) {
    setStatus("collector unreachable (" + error.message + ")", "offline");
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, POLL_MS);
}

// -- the pace chart -----------------------------------------------------------

const PACE_MS = 1000;
// The chart's coordinate system (the SVG's viewBox) and the plot's margins.
const CHART = { width: 900, height: 160, left: 44, right: 52, top: 12, bottom: 24 };

function svgNode(name, attributes, text) {
  // The namespace comes from the <svg> in the page: no URL in this file.
  const node = document.createElementNS($("pace-chart").namespaceURI, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function decimal(value) {
  if (Number.isInteger(value)) return String(value);
  return value.toFixed(value < 1 ? 2 : 1);
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function lastMinute(pace) {
  let requests = 0;
  let refused = 0;
  for (const second of pace.seconds) {
    if (second.t <= pace.now - 60) continue;
    requests += second.requests;
    refused += second.rate_limited;
  }
  return { requests, refused };
}

function paceSummary(pace) {
  const { requests, refused } = lastMinute(pace);
  const peak = Math.max(0, ...pace.seconds.map((second) => second.requests));
  const quota = pace.quota_per_minute;
  const limit = quota === null
    ? "no quota"
    : `quota ${decimal(quota)} per minute (${decimal(quota / 60)} per second) per client`;
  return `${plural(requests, "request")} in the last minute, ${refused} refused; `
    + `peak ${peak} per second in the last ${decimal(pace.window / 60)} minutes; ${limit}.`;
}

function roundUp(value) {
  // The top of the scale: 1, 2 or 5 times a power of ten, at least value.
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function paceScale(pace) {
  const peak = Math.max(0, ...pace.seconds.map((second) => second.requests));
  const quota = pace.quota_per_minute === null ? 0 : pace.quota_per_minute / 60;
  const top = roundUp(Math.max(1, peak, quota * 1.2));
  const plotWidth = CHART.width - CHART.left - CHART.right;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  const first = pace.now - pace.window + 1;
  const step = plotWidth / pace.window;
  return {
    step,
    top,
    bottom: CHART.top + plotHeight,
    x: (t) => CHART.left + (t - first) * step,
    y: (count) => CHART.top + plotHeight * (1 - count / top),
  };
}

function paceAxes(pace, scale) {
  const nodes = [
    svgNode("line", { class: "axis", x1: CHART.left, x2: CHART.width - CHART.right, y1: scale.bottom, y2: scale.bottom }),
    svgNode("line", { class: "axis", x1: CHART.left, x2: CHART.left, y1: CHART.top, y2: scale.bottom }),
    svgNode("text", { class: "tick", x: CHART.left - 6, y: CHART.top + 10, "text-anchor": "end" }, decimal(scale.top) + "/s"),
    svgNode("text", { class: "tick", x: CHART.left - 6, y: scale.bottom, "text-anchor": "end" }, "0"),
  ];
  for (let ago = 0; ago < pace.window; ago += 60) {
    const label = ago === 0 ? "now" : `-${ago / 60} min`;
    const anchor = ago === 0 ? "end" : "middle";
    nodes.push(svgNode("text", { class: "tick", x: scale.x(pace.now - ago) + scale.step, y: CHART.height - 6, "text-anchor": anchor }, label));
  }
  return nodes;
}

function paceBar(second, scale) {
  const width = Math.max(1, scale.step * 0.8);
  const x = scale.x(second.t);
  const group = svgNode("g", {
    class: "second",
    "data-t": second.t,
    "data-requests": second.requests,
    "data-refused": second.rate_limited,
  });
  const when = new Date(second.t * 1000).toLocaleTimeString();
  group.append(svgNode("title", {}, `${when}: ${plural(second.requests, "request")}, ${second.rate_limited} refused`));
  group.append(svgNode("rect", { class: "bar", x, width, y: scale.y(second.requests), height: scale.bottom - scale.y(second.requests) }));
  if (second.rate_limited > 0) {
    // The refused part on top of the bar, and a mark under the axis that
    // stays visible when the bar is a sliver.
    const y = scale.y(second.requests);
    group.append(svgNode("rect", { class: "refused", x, width, y, height: scale.y(second.requests - second.rate_limited) - y }));
    group.append(svgNode("rect", { class: "refused-mark", x, width: Math.max(2, width), y: scale.bottom + 2, height: 4 }));
  }
  return group;
}

function paceQuota(pace, scale) {
  if (pace.quota_per_minute === null) return [];
  const perSecond = pace.quota_per_minute / 60;
  const y = scale.y(perSecond);
  const label = `quota ${decimal(pace.quota_per_minute)}/min = ${decimal(perSecond)}/s`;
  return [
    svgNode("line", { id: "pace-quota", class: "quota", x1: CHART.left, x2: CHART.width - CHART.right, y1: y, y2: y }),
    // At the left: the newest bars are at the right.
    svgNode("text", { class: "quota-label", x: CHART.left + 6, y: Math.max(CHART.top + 10, y - 4) }, label),
  ];
}

function minuteCounts(pace) {
  // For each second of the window, the requests in the 60 s ending there:
  // what the quota counts, so the line shows how full the minute is.
  const perSecond = new Map(pace.seconds.map((second) => [second.t, second.requests]));
  const counts = [];
  let running = 0;
  for (let t = pace.now - pace.window - 59; t <= pace.now; t += 1) {
    running += perSecond.get(t) || 0;
    running -= perSecond.get(t - 60) || 0;
    if (t > pace.now - pace.window) counts.push({ t, count: running });
  }
  return counts;
}

function paceMinute(pace, scale) {
  // The count in the last 60 s on its own scale (right axis), against the
  // quota per minute: a per-second quota line lies flat after a burst.
  const counts = minuteCounts(pace);
  const quota = pace.quota_per_minute;
  const most = Math.max(1, ...counts.map((point) => point.count));
  const top = roundUp(Math.max(most, quota === null ? 0 : quota * 1.2));
  const y = (count) => CHART.top + (scale.bottom - CHART.top) * (1 - count / top);
  const right = CHART.width - CHART.right;
  const points = counts.map((point) => `${scale.x(point.t) + scale.step / 2},${y(point.count)}`);
  const now = counts.length ? counts[counts.length - 1].count : 0;
  const nodes = [
    svgNode("line", { class: "axis", x1: right, x2: right, y1: CHART.top, y2: scale.bottom }),
    svgNode("text", { class: "tick minute-tick", x: right + 4, y: CHART.top + 10 }, decimal(top) + "/60s"),
    svgNode("text", { class: "tick minute-tick", x: right + 4, y: scale.bottom }, "0"),
    svgNode("polyline", { id: "pace-minute", class: "minute", points: points.join(" "), "data-last-minute": now }),
  ];
  if (quota !== null) {
    const quotaY = y(quota);
    nodes.push(
      svgNode("line", { id: "pace-minute-quota", class: "minute-quota", x1: CHART.left, x2: right, y1: quotaY, y2: quotaY }),
      svgNode("text", { class: "minute-label", x: right - 6, y: Math.max(CHART.top + 10, quotaY - 4), "text-anchor": "end" },
        `last 60 s: ${decimal(now)} of ${decimal(quota)}`),
    );
  }
  return nodes;
}

function fleetSummary(fleet) {
  // Started with --redis: the fleet's quota windows, as the clients share them.
  if (fleet.error) return `Fleet quota (${fleet.redis}): ${fleet.error}.`;
  if (!fleet.windows.length) return `Fleet quota (${fleet.redis}): no window in use.`;
  const windows = fleet.windows.map((w) => `${plural(w.used, "request")} in ${w.key}`);
  return `Fleet quota (${fleet.redis}), last 61 s: ${windows.join("; ")}.`;
}

function renderPace(pace) {
  const summary = paceSummary(pace);
  const chart = $("pace-chart");
  const title = svgNode("title", { id: "pace-chart-title" }, summary);
  const scale = paceScale(pace);
  const bars = pace.seconds.map((second) => paceBar(second, scale));
  chart.replaceChildren(title, ...paceAxes(pace, scale), ...bars, ...paceQuota(pace, scale), ...paceMinute(pace, scale));
  chart.setAttribute("aria-label", summary);
  $("pace-summary").textContent = summary;
  const fleet = $("pace-fleet");
  fleet.hidden = !pace.fleet;
  if (pace.fleet) fleet.textContent = fleetSummary(pace.fleet);
  $("pace-window").textContent = plural(pace.window / 60, "minute");
}

async function refreshPace() {
  try {
    const response = await fetch("/api/pace", { cache: "no-store", headers: authHeaders() });
    // A locked page or an unreachable collector: the events poll says so.
    if (response.ok) renderPace(await response.json());
  } catch (error) {
    // ditto
  }
}

async function pollPace() {
  await refreshPace();
  setTimeout(pollPace, PACE_MS);
}

$("filters").addEventListener("input", refresh);
$("filters").addEventListener("submit", (event) => event.preventDefault());
$("reset").addEventListener("click", async () => {
  if (!window.confirm("Delete every stored event?")) return;
  await fetch("/api/events", { method: "DELETE", headers: authHeaders() });
  await refresh();
});
$("unlock").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  await Promise.all([refresh(), refreshPace()]);
});
window.addEventListener("hashchange", () => {
  takeTokenFromAddress();
  refresh();
});
takeTokenFromAddress();
poll();
pollPace();
