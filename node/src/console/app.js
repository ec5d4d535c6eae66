// The botclaw console: renders the snapshots /console/events sends once a second.
// Plain JavaScript, no dependencies: the page must work without network access.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
};

// Per node: the last latency buckets seen, so each snapshot charts the last second's turns.
const previous = new Map();
// Load imbalance (turns/s, max/mean over the members up) over the last 5 minutes.
const imbalance = [];
const IMBALANCE_POINTS = 300;

function parseMetrics(text) {
  const out = { buckets: new Map(), errors: {}, held: 0 };
  for (const line of text.split("\n")) {
    const m = line.match(/^(\w+)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const [, name, labels = "", value] = m;
    const v = Number(value);
    if (name === "botclaw_turn_latency_seconds_bucket") {
      const le = (labels.match(/le="([^"]+)"/) || [])[1];
      if (le) out.buckets.set(le, (out.buckets.get(le) || 0) + v);
    } else if (name === "botclaw_errors_total") {
      const code = (labels.match(/code="([^"]+)"/) || [])[1] || "?";
      out.errors[code] = (out.errors[code] || 0) + v;
    } else if (name === "botclaw_held_now") {
      out.held += v;
    }
  }
  return out;
}

// histogram_quantile over cumulative bucket deltas, linear within a bucket; null if no turns.
function quantile(q, now, before) {
  const bounds = [...now.keys()].map((le) => [le === "+Inf" ? Infinity : Number(le), le]).sort((a, b) => a[0] - b[0]);
  const counts = bounds.map(([, le]) => (now.get(le) || 0) - ((before && before.get(le)) || 0));
  const total = counts[counts.length - 1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let lower = 0, below = 0;
  for (let i = 0; i < bounds.length; i++) {
    const upper = bounds[i][0];
    if (counts[i] >= rank) {
      if (upper === Infinity) return lower;
      const inBucket = counts[i] - below;
      return inBucket > 0 ? lower + (upper - lower) * ((rank - below) / inBucket) : upper;
    }
    lower = upper; below = counts[i];
  }
  return lower;
}

const ms = (s) => (s == null ? "–" : s < 0.001 ? `${(s * 1e6).toFixed(0)} µs` : `${(s * 1e3).toFixed(1)} ms`);
const mib = (b) => (b == null ? "–" : `${(b / 1048576).toFixed(0)} MiB`);
const dur = (s) => (s >= 3600 ? `${(s / 3600).toFixed(1)} h` : s >= 60 ? `${(s / 60).toFixed(1)} min` : `${s.toFixed(0)} s`);

function render(snap) {
  const st = snap.status, c = st.controller || {};
  $("#self").textContent = st.node;
  $("#leader").textContent = c.leader || "none";
  $("#term").textContent = c.term;
  $("#map-version").textContent = c.map_version;

  const byName = new Map(snap.nodes.map((n) => [n.name, n]));
  const tbody = $("#members tbody");
  tbody.replaceChildren();
  const loads = [];
  for (const m of st.members) {
    const node = byName.get(m.name);
    const metrics = node ? parseMetrics(node.metrics) : null;
    let p50 = null, p99 = null;
    if (metrics) {
      const before = previous.get(m.name);
      p50 = quantile(0.5, metrics.buckets, before);
      p99 = quantile(0.99, metrics.buckets, before);
      previous.set(m.name, metrics.buckets);
    }
    const ns = node && node.status;
    const errors = metrics ? Object.entries(metrics.errors).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(", ") : "";
    const load = m.load || {};
    if (m.state === "up") loads.push(load.turns_per_s || 0);
    const row = el("tr", { "data-node": m.name, "data-state": m.state, class: node && !ns && m.state === "up" ? "stale" : "" },
      el("td", {}, m.name + (m.is_self ? " (this node)" : "")),
      el("td", { class: "state" }, m.state),
      el("td", {}, (m.roles || []).join(", ")),
      el("td", { class: "num" }, m.incarnation),
      el("td", { class: "num" }, m.state === "up" ? dur(m.uptime_s) : "–"),
      el("td", {}, m.is_self ? "–" : m.linked ? "linked" : "no link"),
      el("td", { class: "num" }, (load.turns_per_s || 0).toFixed(1)),
      el("td", { class: "num" }, ms(p50)),
      el("td", { class: "num" }, ms(p99)),
      el("td", { class: "num" }, ns ? ns.active_conversations : load.active ?? "–"),
      el("td", { class: "num" }, metrics ? metrics.held : "–"),
      el("td", { class: "num" }, ns ? mib(ns.rss_bytes) : "–"),
      el("td", {}, errors),
      el("td", { class: "num" }, (c.owned || {})[m.name] ?? 0));
    tbody.append(row);
  }

  const dl = $("#controller");
  dl.replaceChildren();
  const facts = [
    ["leader", c.leader || "none (no majority of voters in sight?)"],
    ["voters", (c.voters || []).join(", ")],
    ["learners", c.learners],
    ["applied index", c.applied_index],
    ["moves in flight", c.moves_in_flight],
    ["shards under R", c.shards_under_replicated],
    ["shards unavailable", c.shards_unavailable + ((c.unavailable || []).length ? ` (${c.unavailable.join(", ")})` : "")],
    ["shards unassigned", c.shards_unassigned],
    ["this node serving", st.serving ? "yes" : "no"],
  ];
  for (const [k, v] of facts) {
    dl.append(el("dt", {}, k), el("dd", { id: "c-" + k.replace(/\W+/g, "-"), class: k.startsWith("shards un") && v > 0 ? "bad" : "" }, v ?? "–"));
  }

  const owned = Object.entries(c.owned || {});
  const most = Math.max(1, ...owned.map(([, n]) => n));
  const shards = $("#shards");
  shards.replaceChildren();
  for (const [name, n] of owned) {
    const bar = el("span", { class: "bar" });
    // Through the CSSOM: the page's CSP allows no inline style attributes.
    bar.style.width = `${(200 * n) / most}px`;
    shards.append(el("div", { class: "barrow" }, el("span", {}, name), bar, el("span", {}, n)));
  }
  if (owned.length) {
    const counts = owned.map(([, n]) => n);
    const mean = counts.reduce((a, b) => a + b, 0) / counts.length;
    $("#imbalance-now").textContent = (mean > 0 ? Math.max(...counts) / mean : 1).toFixed(2);
  }
  if (loads.length) {
    const mean = loads.reduce((a, b) => a + b, 0) / loads.length;
    const ratio = mean > 0 ? Math.max(...loads) / mean : 1;
    $("#load-imbalance").textContent = mean > 0 ? ratio.toFixed(2) : "–";
    imbalance.push(ratio);
    if (imbalance.length > IMBALANCE_POINTS) imbalance.shift();
    drawImbalance();
  }

  const dry = $("#dry-run");
  dry.replaceChildren();
  for (const n of snap.nodes) {
    const p = n.preview;
    if (!p) { dry.append(el("p", { class: "bad" }, `${n.name}: no answer`)); continue; }
    const item = el("div", { class: "dry", "data-node": n.name, "data-moves": p.moves.length },
      el("b", {}, n.name), ` ${p.load_ratio.toFixed(2)}× average: ${p.why}`);
    for (const m of p.moves) {
      item.append(el("div", { class: "move" }, `→ shard ${m.shard} (${m.turns_per_s.toFixed(1)} turns/s) to ${m.to}`));
    }
    dry.append(item);
  }

  const select = $("#drain-node");
  const chosen = select.value;
  select.replaceChildren(...st.members.filter((m) => m.state === "up").map((m) => el("option", { value: m.name }, m.name)));
  if (chosen) select.value = chosen;
}

function drawImbalance() {
  const svg = $("#imbalance");
  const top = Math.max(2, ...imbalance);
  const y = (v) => 60 - (60 * (v - 1)) / (top - 1);
  const points = imbalance.map((v, i) => `${(300 * i) / (IMBALANCE_POINTS - 1)},${y(v).toFixed(1)}`).join(" ");
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points);
  const one = document.createElementNS(ns, "line");
  for (const [k, v] of [["x1", 0], ["x2", 300], ["y1", y(1.2)], ["y2", y(1.2)]]) one.setAttribute(k, v);
  svg.replaceChildren(one, line);
}

async function refreshFlags() {
  try {
    const r = await fetch("/flags");
    const f = await r.json();
    $("#flags tbody").replaceChildren(...f.flags.map((x) => el("tr", { "data-flag": x.name },
      el("td", {}, x.name), el("td", {}, x.enabled ? "on" : "off"), el("td", { class: "num" }, `${x.percent.toFixed(2)}%`), el("td", {}, x.bot || "all"))));
  } catch (e) { /* shown on the next refresh */ }
}

function token() {
  const t = $("#token").value.trim();
  sessionStorage.setItem("botclaw-admin-token", t);
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function post(path, confirmText) {
  if (confirmText && !window.confirm(confirmText)) return;
  const out = $("#control-result");
  try {
    const r = await fetch(path, { method: "POST", headers: token() });
    out.textContent = `${r.status}: ${await r.text()}`;
    out.className = r.ok ? "" : "bad";
  } catch (e) {
    out.textContent = String(e); out.className = "bad";
  }
  refreshFlags();
}

// The owner's record of the conversation's last turns (bot run to durable reply).
function recentLine(r) {
  if (!r) return "recent turns: the owner could not be asked";
  if (!r.live) return `recent turns: none live on ${r.node} (the conversation is idle)`;
  const ms = r.turns.map((t) => `#${t.turn} ${(t.micros / 1000).toFixed(1)} ms`);
  return `recent turns on ${r.node}: ${ms.join(" · ") || "none yet"}`;
}

async function lookup(conv) {
  const out = $("#lookup-result");
  if (!conv) return;
  try {
    const r = await fetch(`/placement?conv=${encodeURIComponent(conv)}`);
    const body = await r.text();
    if (!r.ok) { out.textContent = body; out.className = "bad"; return; }
    const p = JSON.parse(body);
    out.className = "";
    out.dataset.owner = p.owner || "";
    out.textContent = [
      `conversation ${p.conv}: shard ${p.shard} (${p.state})`,
      `owner ${p.owner || "none"} · in sync ${(p.isr || []).join(", ") || "none"}` + ((p.learners || []).length ? ` · learning ${p.learners.join(", ")}` : ""),
      `ring position 0x${p.ring_position} (${(100 * p.ring_fraction).toFixed(2)}% around the ring)` + (p.conv_hash ? ` · conversation hash 0x${p.conv_hash}` : ""),
      `epoch ${p.epoch} · map v${p.map_version} · controller leader ${p.leader || "none"}`,
      p.rebalancer_move ? `the rebalancer moved this shard to ${p.rebalancer_move.to} (load)` : "",
      p.desired ? `the ring would place it on ${JSON.stringify(p.desired)}` : "",
      p.why ? `why: ${p.why}` : "",
      recentLine(p.recent_turns),
    ].filter(Boolean).join("\n");
  } catch (e) {
    out.textContent = String(e); out.className = "bad";
  }
}

function connect() {
  const badge = $("#conn");
  const source = new EventSource("/console/events");
  source.addEventListener("snapshot", (e) => {
    badge.textContent = "live"; badge.className = "badge live";
    render(JSON.parse(e.data));
  });
  source.onerror = () => { badge.textContent = "reconnecting…"; badge.className = "badge lost"; };
}

window.addEventListener("DOMContentLoaded", () => {
  $("#token").value = sessionStorage.getItem("botclaw-admin-token") || "";
  $("#lookup").addEventListener("submit", (e) => { e.preventDefault(); lookup($("#conv").value.trim()); });
  $("#flag-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = new URLSearchParams({ name: $("#flag-name").value.trim(), percent: $("#flag-percent").value, enabled: $("#flag-enabled").value });
    if ($("#flag-bot").value.trim()) q.set("bot", $("#flag-bot").value.trim());
    post(`/flags/set?${q}`, `Set flag ${q.get("name")} to ${q.get("percent")}%?`);
  });
  $("#drain-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const node = $("#drain-node").value;
    post(`/console/drain?node=${encodeURIComponent(node)}`, `Drain ${node}? Its conversations move to the others, then it leaves and exits.`);
  });
  // `#conv=ID` in the address looks a conversation up at once (links from logs, tests).
  const wanted = new URLSearchParams(location.hash.slice(1)).get("conv");
  if (wanted) { $("#conv").value = wanted; lookup(wanted); }
  refreshFlags();
  setInterval(refreshFlags, 5000);
  connect();
});
