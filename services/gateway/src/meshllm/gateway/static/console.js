// mesh-llm console: renders the gateway's status stream (server-sent events).
// Plain DOM code, no framework, nothing fetched from outside the gateway.
"use strict";

const COLOURS = ["#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#ff7b72", "#39c5cf", "#e3b341"];
const RATE_HISTORY = 60; // seconds of tokens/s kept per model for the sparkline
const history = new Map(); // model id -> recent tokens/s values
const loadingSince = new Map(); // "model@worker" -> ms when first seen loading
let seenRequests = new Set();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function colourFor(id, ids) {
  const index = ids.indexOf(id);
  return COLOURS[(index < 0 ? 0 : index) % COLOURS.length];
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
}

function nodeHealth(node) {
  const states = Object.values(node.models || {}).map((m) => m.state);
  if (node.failed_recently || states.includes("failed")) return ["bad", "failing"];
  if (states.includes("loading")) return ["warn", "loading"];
  if (states.length === 0) return ["off", "idle"];
  return ["ok", "healthy"];
}

// A worker a gateway reported unreachable: planned around while it does not answer the
// planner's health check, still placed while the planner checks it.
function suspectLine(suspect) {
  if (!suspect) return null;
  const left = suspect.state === "left_out";
  return el("div", { class: left ? "bad" : "warn", "data-suspect": suspect.worker_id },
    (left ? "left out of placement" : "being probed") + " since " +
    new Date(suspect.since_unix_s * 1000).toLocaleTimeString() + " · reported by " +
    suspect.reporter + ": " + suspect.reason);
}

function renderNodes(nodes, suspects) {
  const suspectOf = new Map((suspects || []).map((s) => [s.worker_id, s]));
  const box = document.getElementById("nodes");
  if (!nodes.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no workers have joined"));
    return;
  }
  box.replaceChildren(...nodes.map((node) => {
    const [level, word] = nodeHealth(node);
    const models = Object.entries(node.models || {}).map(([id, m]) =>
      el("div", {}, id + " ", el("span", { class: "badge " + stateClass(m.state) }, m.state),
        m.error ? el("div", { class: "bad" }, m.error) : null));
    return el("div", { class: "card", "data-node": node.worker_id },
      el("h3", {}, node.worker_id, el("span", { class: "badge " + level }, word)),
      suspectLine(suspectOf.get(node.worker_id)),
      el("dl", {},
        el("dt", {}, "address"), el("dd", {}, node.address),
        el("dt", {}, "backend"), el("dd", {}, node.backend + ", " + node.threads + " threads"),
        el("dt", {}, "memory"), el("dd", {}, bytes(node.memory_budget_bytes)),
        el("dt", {}, "in flight"), el("dd", { class: "in-flight" }, node.in_flight),
        el("dt", {}, "models"), el("dd", {}, ...(models.length ? models : ["none"]))));
  }));
}

function stateClass(state) {
  return { ready: "ok", loading: "warn", failed: "bad" }[state] || "off";
}

function sparkline(values) {
  const width = 120, height = 22;
  const max = Math.max(1, ...values);
  const points = values.map((v, i) =>
    (i * width / Math.max(1, RATE_HISTORY - 1)).toFixed(1) + "," +
    (height - 1 - (v / max) * (height - 2)).toFixed(1)).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("class", "spark");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points); line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#58a6ff"); line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  return svg;
}

function loadingLabel(model, stage) {
  const key = model.model_id + "@" + stage.worker_id;
  if (stage.state !== "loading") { loadingSince.delete(key); return ""; }
  if (!loadingSince.has(key)) loadingSince.set(key, Date.now());
  const what = stage.phase || "loading";
  const percent = stage.progress ? " " + Math.round(100 * stage.progress) + "%" : "";
  return " · " + what + percent + " · " +
    Math.round((Date.now() - loadingSince.get(key)) / 1000) + "s";
}

function stagesOf(replica, layers) {
  // A replica split across workers lists its stages (pipeline order); a whole one is a
  // single stage holding every layer.
  if (replica.stages && replica.stages.length) return replica.stages;
  return [{ worker_id: replica.worker_id, layers: replica.layers || [0, layers],
            state: replica.state }];
}

function placementBar(model, replica, workerIds) {
  // One bar per replica; each segment is the layer range one worker holds.
  const layers = Math.max(1, model.n_layers || 1);
  const bar = el("div", { class: "placement", "data-placement": model.model_id,
                          "data-head": replica.worker_id });
  for (const stage of stagesOf(replica, layers)) {
    const [start, end] = stage.layers || [0, layers];
    const left = 100 * start / layers, width = 100 * (end - start) / layers;
    const label = stage.worker_id + " · layers " + start + "–" + (end - 1) +
      loadingLabel(model, stage);
    const ready = stage.state === "ready";
    bar.append(el("div", {
      class: "segment " + (ready ? "" : "loading"),
      "data-worker": stage.worker_id, "data-layers": start + "-" + end,
      title: label + " (" + stage.state + ")",
      style: "left:" + left + "%;width:" + width + "%;background-color:" +
        colourFor(stage.worker_id, workerIds) + (ready ? "" : "99"),
    }, label));
  }
  return el("div", { class: "replica-row" }, bar);
}

function renderModels(models, workerIds) {
  const box = document.getElementById("models");
  if (!models.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no models configured"));
    return;
  }
  box.replaceChildren(...models.map((model) => {
    const values = history.get(model.model_id) || [];
    const level = { serving: "ok", not_served: "bad" }[model.state] || "warn";
    return el("div", { class: "model", "data-model": model.model_id },
      el("div", { class: "title" },
        el("b", {}, model.model_id),
        el("span", { class: "badge status " + level, "data-state": model.state },
          model.status),
        el("span", { class: "muted" }, model.n_layers + " layers, " +
          bytes(model.weights_bytes) + " weights, context " + model.context_length),
        el("span", {}, el("b", { class: "rate" }, model.tokens_per_s.toFixed(1)),
          " tokens/s "),
        sparkline(values),
        el("span", { class: "muted" }, model.ready_replicas + " ready"),
        ...waitingBadge(model)),
      ...(model.replicas || []).map((replica) => placementBar(model, replica, workerIds)),
      ...expertLines(model));
  }));
}

// A mixture-of-experts model served by expert shards: which experts each shard holds.
function expertLines(model) {
  const e = model.experts;
  if (!e) return [];
  const head = el("div", { class: "muted", "data-experts": model.model_id },
    e.shards.length + " expert shards of " + e.expert_count + " experts · coverage " +
    e.coverage + " · " + e.ranking);
  return [head, ...e.shards.map((shard) => el("div", {
    class: "muted", "data-shard": shard.worker_id,
  }, shard.worker_id + ": " + shard.summary))];
}

// Requests waiting now for the model's first replica (a cold start), when there are.
function waitingBadge(model) {
  const waiting = model.demand ? model.demand.waiting_requests : 0;
  return waiting > 0
    ? [el("span", { class: "badge warn", "data-waiting": waiting },
        waiting + " waiting for a replica")]
    : [];
}

function renderRecent(recent) {
  const body = document.querySelector("#recent tbody");
  document.getElementById("recent-empty").hidden = recent.length > 0;
  const fresh = new Set(recent.map((r) => r.request_id));
  body.replaceChildren(...recent.map((r) => {
    const outcome = r.outcome === "ok" ? "ok" : r.outcome === "cancelled" ? "warn" : "bad";
    return el("tr", { "data-request": r.request_id, "data-trace": r.trace_id,
                      class: seenRequests.has(r.request_id) ? "" : "new" },
      el("td", {}, new Date(r.at_unix_s * 1000).toLocaleTimeString()),
      el("td", {}, r.model),
      el("td", { class: outcome }, r.outcome),
      el("td", {}, r.finish_reason),
      el("td", { class: "num" }, r.input_tokens),
      el("td", { class: "num" }, r.output_tokens),
      el("td", { class: "num" }, seconds(r.ttft_s)),
      el("td", { class: "num" }, seconds(r.duration_s)),
      el("td", {}, r.trace_id ? el("code", { title: r.trace_id }, r.trace_id.slice(0, 8)) :
        el("span", { class: "muted", title: "not sampled" }, "-")));
  }));
  seenRequests = fresh;
}

function render(state) {
  for (const model of state.models) {
    const values = history.get(model.model_id) || [];
    values.push(model.tokens_per_s);
    while (values.length > RATE_HISTORY) values.shift();
    history.set(model.model_id, values);
  }
  const workerIds = state.nodes.map((n) => n.worker_id);
  document.getElementById("total-rate").textContent = state.tokens_per_s.toFixed(1);
  document.getElementById("node-count").textContent = state.nodes.length;
  document.getElementById("model-count").textContent = state.models.length;
  document.getElementById("updated").textContent =
    "updated " + new Date(state.at_unix_s * 1000).toLocaleTimeString();
  renderNodes(state.nodes, state.suspects);
  renderModels(state.models, workerIds);
  renderRecent(state.recent);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function setConnection(level, text) {
  const badge = document.getElementById("connection");
  badge.className = "badge " + level;
  badge.textContent = text;
}

function connectStatus() {
  const source = new EventSource("/api/status/stream");
  source.addEventListener("open", () => setConnection("ok", "live"));
  source.addEventListener("error", () => setConnection("warn", "reconnecting"));
  source.addEventListener("status", (event) => render(JSON.parse(event.data)));
}

function postItem(post) {
  return el("li", { "data-post": post.post_id || "" },
    el("div", { class: "meta" }, (post.author || "?") + " · " +
      new Date(post.created_unix_ms).toLocaleString() +
      (post.tags && post.tags.length ? " · #" + post.tags.join(" #") : "")),
    el("div", {}, post.text));
}

const BOARD_TIMEOUT_MS = 15000; // a blackboard that does not answer by then is reported
const BOARD_RETRY_MS = 5000;

// The board's posts, or why there are none to show: {posts} | {state, message, retry}.
async function fetchBoard() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), BOARD_TIMEOUT_MS);
  try {
    const response = await fetch("/api/blackboard/posts?limit=30", { signal: abort.signal });
    if (response.status === 404) {
      return { state: "none", message: "no blackboard configured on this gateway " +
        "(start the gateway with --blackboard HOST:PORT or MESHLLM_BLACKBOARD)" };
    }
    if (!response.ok) {
      return { state: "unavailable", retry: true,
        message: "blackboard unavailable (HTTP " + response.status + "); retrying" };
    }
    return { posts: (await response.json()).data || [] };
  } catch (error) {
    return { state: "unavailable", retry: true, message: "blackboard not answering; retrying" };
  } finally {
    clearTimeout(timer);
  }
}

async function connectBoard() {
  const list = document.getElementById("board");
  const board = await fetchBoard();
  if (!board.posts) {
    list.dataset.state = board.state;
    list.replaceChildren(el("li", { class: "muted" }, board.message));
    if (board.retry) setTimeout(connectBoard, BOARD_RETRY_MS);
    return;
  }
  list.dataset.state = board.posts.length ? "posts" : "empty";
  list.replaceChildren(...(board.posts.length ? board.posts.map(postItem) :
    [el("li", { class: "muted empty" }, "no posts yet")]));
  const feed = new EventSource("/api/blackboard/stream");
  feed.addEventListener("post", (event) => {
    list.querySelector(".empty")?.remove();
    list.dataset.state = "posts";
    const item = postItem(JSON.parse(event.data));
    item.classList.add("new");
    list.prepend(item);
  });
}

connectStatus();
connectBoard();
