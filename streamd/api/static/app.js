// streamd's page: the stream list (latest frame with its overlays), one stream's live view (SSE), its events and
// prompts. Everything comes from the control API; API data is only ever set as text, never as HTML.
import { api, ApiError, events, forgetToken, image, setToken, token } from "./api.js";
import { lineDiff, promptContent } from "./diff.js";
import { drawFrame } from "./draw.js";

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let current = null;  // the running view's AbortController

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "data") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function newView() {
  if (current) current.abort();
  current = new AbortController();
  return current.signal;
}

// -- the token gate: nothing else is shown (or fetched) until the daemon accepts the page's token ------------
function showGate(message) {
  newView();
  $("app").hidden = true;
  $("token-gate").hidden = false;
  $("forget-token").hidden = true;
  $("status").textContent = "";
  $("token-error").textContent = message || "";
  $("token-input").focus();
}

function refused(e) {
  if (e instanceof ApiError && e.status === 401) {
    showGate(token() ? "The daemon refused this token." : "");
    return true;
  }
  return false;
}

async function route() {
  const signal = newView();
  try {
    await api("/api/v1/streams", { signal });
  } catch (e) {
    if (refused(e)) return;
    $("status").textContent = `API unreachable: ${e.message}`;
  }
  $("token-gate").hidden = true;
  $("app").hidden = false;
  $("forget-token").hidden = !token();
  const m = location.hash.match(/^#\/stream\/(.+)$/);
  if (m) streamView(decodeURIComponent(m[1]), signal);
  else listView(signal);
}

// -- the list ---------------------------------------------------------------------------------------------------
function fmt(x, digits = 1) { return typeof x === "number" ? x.toFixed(digits) : "-"; }

function latencyMs(rec) {
  return rec && typeof rec.publish_ts === "number" ? (rec.publish_ts - rec.capture_ts) * 1000 : null;
}

function caption(rec) {
  if (!rec) return "";
  if (Array.isArray(rec.active_tags) && rec.active_tags.length) return `tags: ${rec.active_tags.join(", ")}`;
  if (Array.isArray(rec.tags) && rec.tags.length) return `tags: ${rec.tags.map((t) => t.tag || t).join(", ")}`;
  return rec.text ? `“${rec.text}”` : "";
}

function makeCard(s) {
  const card = el("div", { class: "card", data: { stream: s.id } },
    el("h3", {}, el("a", { href: `#/stream/${enc(s.id)}` }, s.id), el("span", { class: "state" })),
    el("canvas", { width: "320", height: "180" }),
    el("div", { class: "caption" }),
    el("div", { class: "meta" }));
  return card;
}

async function refreshCard(card, s, signal) {
  const state = card.querySelector(".state");
  state.textContent = s.reason ? `${s.state}: ${s.reason}` : s.state;
  state.className = `state ${s.state}`;
  const base = `/api/v1/streams/${enc(s.id)}`;
  const { data } = await api(`${base}/results?limit=1`, { signal });
  const last = data.entries[0];
  const meta = [`${s.pipeline}`, `fps ${fmt(s.fps_out)}/${s.fps ?? "all"}`, `dropped ${s.dropped}`,
                `latency ${fmt(latencyMs(last && last.record), 0)} ms`];
  if (s.owner) meta.push(`on ${s.owner}`);
  card.querySelector(".meta").textContent = meta.join(" · ");
  const vlm = await api(`${base}/vlm?limit=1`, { signal });
  card.querySelector(".caption").textContent = caption(vlm.data.entries[0] && vlm.data.entries[0].record);
  const canvas = card.querySelector("canvas");
  if (!last || canvas.dataset.entry === last.id) return;
  let img = await image(`${base}/snapshot.jpg?entry=${enc(last.id)}`, signal);
  if (img) {
    drawFrame(canvas, img.bitmap, last.record);
  } else if ((img = await image(`${base}/snapshot.jpg`, signal))) {
    drawFrame(canvas, img.bitmap, null);  // its record is not the newest: the frame alone
  }
  canvas.dataset.entry = last.id;
}

async function loadPipelines(signal) {
  const select = document.querySelector("#add-form select[name=pipeline]");
  if (select.options.length) return;
  const { data } = await api("/api/v1/pipelines", { signal });
  for (const p of data.pipelines) if (!p.error) select.append(el("option", { value: p.name }, p.name));
}

async function listView(signal) {
  $("list-view").hidden = false;
  $("stream-view").hidden = true;
  const cards = new Map();
  loadPipelines(signal).catch(() => {});
  while (!signal.aborted) {
    try {
      const { data } = await api("/api/v1/streams", { signal });
      const seen = new Set();
      for (const s of data.streams) {
        seen.add(s.id);
        if (!cards.has(s.id)) {
          cards.set(s.id, makeCard(s));
          $("streams").append(cards.get(s.id));
        }
        const card = cards.get(s.id);
        if (!card.busy) {  // one refresh of a card at a time, however slow the daemon answers
          card.busy = true;
          refreshCard(card, s, signal).catch((e) => refused(e)).finally(() => { card.busy = false; });
        }
      }
      for (const [id, card] of cards) if (!seen.has(id)) { card.remove(); cards.delete(id); }
      $("status").textContent = `${data.streams.length} stream(s)`;
    } catch (e) {
      if (signal.aborted || refused(e)) return;
      $("status").textContent = e.message;
    }
    await sleep(2000);
  }
}

async function addStream(ev) {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const body = { id: f.get("id").trim(), url: f.get("url").trim(), pipeline: f.get("pipeline") };
  if (f.get("fps")) body.fps = Number(f.get("fps"));
  $("add-error").textContent = "";
  try {
    await api("/api/v1/streams", { method: "POST", body });
    ev.target.reset();
    location.hash = `#/stream/${enc(body.id)}`;
  } catch (e) {
    if (!refused(e)) $("add-error").textContent = e instanceof ApiError ? e.describe() : e.message;
  }
}

// -- one stream ---------------------------------------------------------------------------------------------------
function eventText(e) {
  switch (e.type) {
    case "state": return `${e.from ?? "start"} → ${e.to}${e.reason ? `: ${e.reason}` : ""}`;
    case "track_started": return `track #${e.track_id} ${e.label} started`;
    case "track_lost": return `track #${e.track_id} ${e.label} lost (${e.reason}, ${e.frames} frames)`;
    case "tag_started": return `tag ${e.tag} started (${fmt(e.confidence, 2)})`;
    case "tag_ended": return `tag ${e.tag} ${fmt(e.start_pts_s)}–${fmt(e.end_pts_s)} s (${fmt(e.duration_s)} s)`;
    case "frames_dropped": return `${e.count} frames dropped (${e.total} in all): ${e.reason}`;
    default: return `${e.type} ${JSON.stringify(e).slice(0, 160)}`;
  }
}

function info(rows) {
  const dl = $("sv-info");
  dl.replaceChildren(...rows.flatMap(([k, v, id]) => [el("dt", {}, k), el("dd", id ? { id } : {}, v)]));
}

function promptVersions(rec) {
  const pv = (rec && rec.prompt_versions) || {};
  return Object.entries(pv).map(([k, v]) => `${k}: ${v.scope} v${v.version}`).join(", ") || "none";
}

async function streamView(sid, signal) {
  $("list-view").hidden = true;
  $("stream-view").hidden = false;
  $("sv-title").textContent = sid;
  $("sv-events").replaceChildren();
  $("sv-caption").textContent = "";
  const base = `/api/v1/streams/${enc(sid)}`;
  const canvas = $("live");
  delete canvas.dataset.entry;
  canvas.dataset.boxes = "0";
  let stream = null, lastRec = null, pending = null, busy = false;

  const render = () => {
    if (!stream) return;
    $("sv-state").textContent = stream.reason ? `${stream.state}: ${stream.reason}` : stream.state;
    $("sv-state").className = `state ${stream.state}`;
    $("sv-pause").textContent = stream.reason_code === "paused" ? "Resume" : "Pause";
    info([["url", stream.url], ["pipeline", stream.pipeline], ["state", stream.state],
          ["reason", stream.reason || "-"], ["sampled fps", `${fmt(stream.fps_out)} (of ${stream.fps ?? "every frame"})`],
          ["dropped", stream.dropped], ["latency", `${fmt(latencyMs(lastRec), 0)} ms`],
          ["seq", lastRec ? lastRec.seq : "-", "sv-seq"],
          ["prompt versions", promptVersions(lastRec), "sv-prompt-versions"], ["daemon", stream.owner || "this one"]]);
  };

  const pump = async () => {  // the newest result only: a slow image never queues up behind it
    busy = true;
    while (pending && !signal.aborted) {
      const ev = pending;
      pending = null;
      try {
        const img = await image(`${base}/snapshot.jpg?entry=${enc(ev.id)}`, signal);
        if (img) {
          drawFrame(canvas, img.bitmap, ev.data);
          canvas.dataset.entry = ev.id;
        }
      } catch (e) { if (refused(e)) return; }
      lastRec = ev.data;
      render();
    }
    busy = false;
  };
  events(`${base}/results/live`, (ev) => { pending = ev; if (!busy) pump(); }, signal,
         (e) => refused(e) || ($("status").textContent = `live view: ${e.message}`));

  $("sv-pause").onclick = async () => {
    $("sv-action-error").textContent = "";
    try {
      const paused = stream && stream.reason_code === "paused";
      const r = await api(base, { method: "PATCH", body: { paused: !paused } });
      stream = r.data;
      render();
    } catch (e) { if (!refused(e)) $("sv-action-error").textContent = e.describe ? e.describe() : e.message; }
  };
  $("sv-remove").onclick = async () => {
    if (!confirm(`Remove stream ${sid}?`)) return;
    try {
      await api(base, { method: "DELETE" });
      location.hash = "#/";
    } catch (e) { if (!refused(e)) $("sv-action-error").textContent = e.describe ? e.describe() : e.message; }
  };

  let prompts = null;
  while (!signal.aborted) {
    try {
      stream = (await api(base, { signal })).data;
      if (!prompts) prompts = setupPrompts(sid, stream.pipeline, signal);
      const evs = (await api(`${base}/events?limit=50`, { signal })).data.entries.reverse();
      $("sv-events").replaceChildren(...evs.map((e) => el("li", {},
        el("span", { class: "t" }, new Date(e.record.ts * 1000).toLocaleTimeString()), eventText(e.record))));
      const vlm = (await api(`${base}/vlm?limit=1`, { signal })).data.entries[0];
      $("sv-caption").textContent = caption(vlm && vlm.record);
      render();
    } catch (e) {
      if (signal.aborted || refused(e)) return;
      $("sv-action-error").textContent = e.message;
    }
    await sleep(2000);
  }
}

// -- prompts: current version, history with author/note, a diff, save, roll back --------------------------------
function setupPrompts(sid, pipeline, signal) {
  const scopes = [`stream:${sid}`, `pipeline:${pipeline}`, "global"];
  $("p-scope").replaceChildren(...scopes.map((s) => el("option", { value: s }, s)));
  let rec = null, etag = null;
  const path = () => `/api/v1/prompts/${$("p-kind").value}/${enc($("p-scope").value)}`;
  const error = (e) => { if (!refused(e)) $("p-error").textContent = e.describe ? e.describe() : e.message; };

  const load = async () => {
    $("p-error").textContent = "";
    $("p-diff").hidden = true;
    try {
      const r = await api(path(), { signal });
      rec = r.data;
      etag = r.etag;
      $("p-current").textContent = `version ${rec.version} by ${rec.author}${rec.note ? `: ${rec.note}` : ""}`;
      $("p-current").dataset.version = String(rec.version);
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 404) return error(e);
      rec = null;
      etag = null;
      $("p-current").textContent = e.code === "prompt_deleted" ? "deleted (the next scope's prompt applies)"
        : "none at this scope (the next scope's prompt applies)";
      $("p-current").dataset.version = "0";
    }
    $("p-text").value = promptContent(rec && !rec.deleted ? { ...rec, schema: null } : null);
    let versions = [];
    try { versions = (await api(`${path()}/history?limit=50`, { signal })).data.versions; } catch (e) { /* none */ }
    $("p-history").tBodies[0].replaceChildren(...versions.map((v) => el("tr", { data: { version: v.version } },
      el("td", {}, `v${v.version}${v.deleted ? " (deleted)" : ""}`), el("td", {}, v.author), el("td", {}, v.note || ""),
      el("td", {}, new Date(v.created_ts * 1000).toLocaleString()),
      el("td", {}, el("button", { class: "small", onclick: () => showDiff(v) }, "diff"), " ",
         el("button", { class: "small", onclick: () => rollback(v.version) }, "roll back")))));
  };

  const showDiff = (v) => {
    const lines = lineDiff(promptContent(v), promptContent(rec));
    $("p-diff").replaceChildren(el("div", {}, `v${v.version} → current (v${rec ? rec.version : "-"})`),
      ...lines.map(([k, t]) => el("span", { class: k }, `${k === "add" ? "+ " : k === "del" ? "- " : "  "}${t}\n`)));
    $("p-diff").hidden = false;
  };

  const save = async () => {
    const kind = $("p-kind").value, text = $("p-text").value, note = $("p-note").value.trim() || undefined;
    const body = kind === "vlm" ? { text, note } : { phrases: text.split("\n").map((s) => s.trim()).filter(Boolean), note };
    if (kind === "vlm" && rec && rec.schema) body.schema = rec.schema;  // the answer's schema stays
    try {
      await api(path(), { method: "PUT", body, etag });
      $("p-note").value = "";
      await load();
    } catch (e) { error(e); if (e.code === "precondition_failed") load(); }
  };

  const rollback = async (version) => {
    try {
      await api(`${path()}/rollback`, { method: "POST", body: { version }, etag });
      await load();
    } catch (e) { error(e); }
  };

  $("p-kind").onchange = load;
  $("p-scope").onchange = load;
  $("p-save").onclick = save;
  load();
  return { load };
}

// -- start ------------------------------------------------------------------------------------------------------
$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setToken($("token-input").value.trim());
  $("token-input").value = "";
  route();
});
$("forget-token").addEventListener("click", () => { forgetToken(); route(); });
$("add-form").addEventListener("submit", addStream);
window.addEventListener("hashchange", route);
route();
