// Live view of the events a local Produl collector received.
// Polls GET /api/events once a second; renders with textContent only, so an
// event's content can never inject markup into the page.
// Reading events needs the collector's access token: the address it prints
// carries it in the fragment (#token=...), which never leaves the browser;
// it is kept for this tab and sent as "Authorization: Bearer <token>".
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
    const when = new Date(stored.received_at * 1000).toLocaleTimeString();
    tr.append(
      cell(when),
      cell(ev.t === "pv" ? "pageview" : "event", "type-" + ev.t),
      cell(ev.n),
      cell(ev.p),
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
    setStatus("live, updated " + new Date().toLocaleTimeString(), "live");
  } catch (error) {
    setStatus("collector unreachable (" + error.message + ")", "offline");
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, POLL_MS);
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
  await refresh();
});
window.addEventListener("hashchange", () => {
  takeTokenFromAddress();
  refresh();
});
takeTokenFromAddress();
poll();
