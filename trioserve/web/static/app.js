// trioserve playground: streamed chat with prefill progress, and a live status panel.
//
// fetch + a ReadableStream SSE parser (EventSource cannot POST). The request opts in to
// `event: prefill_progress` with the X-SwiftLM-Prefill-Progress header; Stop aborts the fetch,
// which closes the connection, and the server drops the sequence before its next step.

import { sseEvents } from "./sse.js";

const KEY_STORAGE = "trioserve.apiKey";
const HEALTH_INTERVAL_MS = 1000;
const RATE_WINDOW_MS = 3000; // server tokens/s: the /metrics counter's rise over this window
const GENERATED = /^trioserve_generated_tokens_total(?:\{[^}]*\})?\s+(\S+)/m;

const $ = (id) => document.getElementById(id);

const conversation = []; // what the next request sends: {role, content}
let current = null; // the answer in flight: {controller, view}
let serverRate = true; // false once /metrics is missing or lacks the counter: tab rate only
const samples = []; // [time ms, generated tokens so far] from /metrics
let epoch = 0; // bumped by "Clear": an answer that ends after it must not touch the new one

// ---------------------------------------------------------------- API key

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

/** Show the key dialog; resolve to the key, or null when the person cancels. */
function askKey(refused) {
  const dialog = $("key-dialog");
  $("key-error").hidden = !refused;
  $("key-input").value = "";
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "ok" ? $("key-input").value.trim() || null : null),
      { once: true },
    );
    dialog.showModal();
  });
}

/** POST JSON; on a 401 ask for the key (once per refusal), keep it for this tab, retry.
 * Resolves to {response, sentAt}: when the accepted request left, for time to first token. */
async function postJSON(path, body, signal) {
  for (;;) {
    const sentAt = performance.now();
    const headers = {
      "Content-Type": "application/json",
      "X-SwiftLM-Prefill-Progress": "true",
    };
    const key = storedKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal,
    });
    if (response.status !== 401) return { response, sentAt };
    await response.body?.cancel();
    sessionStorage.removeItem(KEY_STORAGE);
    const given = await askKey(Boolean(key));
    if (!given) throw new Error("This server needs an API key (started with --api-key).");
    sessionStorage.setItem(KEY_STORAGE, given);
  }
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error?.message ?? text;
  } catch {
    return text || `HTTP ${response.status}`;
  }
}

// ---------------------------------------------------------------- messages

class MessageView {
  constructor(role, text) {
    const node = $("message-template").content.firstElementChild.cloneNode(true);
    node.dataset.role = role;
    node.querySelector(".role").textContent = role === "user" ? "You" : "Assistant";
    this.node = node;
    this.content = node.querySelector(".content");
    this.meta = node.querySelector(".meta");
    this.progressBlock = node.querySelector(".progress-block");
    this.progressLabel = node.querySelector(".progress-label");
    this.bar = node.querySelector(".progress");
    this.fill = node.querySelector(".progress-fill");
    this.history = []; // every bar value shown, in order: the tests read data-history
    this.content.textContent = text;
    $("empty-hint").hidden = true;
    $("messages").append(node);
    scrollToEnd(true);
  }

  set state(value) {
    this.node.dataset.state = value;
  }

  get state() {
    return this.node.dataset.state;
  }

  progress(p) {
    this.progressBlock.hidden = false;
    this.bar.dataset.status = p.status;
    if (p.status === "queued") {
      this.state = "queued";
      const position = p.queue_position ?? "?";
      this.progressLabel.textContent = `Waiting for a free slot — position ${position} in the queue`;
    } else {
      this.state = "prefill";
      this.progressLabel.textContent =
        `Reading the prompt: ${p.n_past} / ${p.n_prompt_tokens} tokens ` +
        `(${Math.round(p.fraction * 100)}%) · ${p.elapsed_seconds.toFixed(1)} s`;
    }
    const percent = p.status === "queued" ? 0 : Math.round(p.fraction * 1000) / 10;
    this.setBar(percent);
  }

  setBar(percent) {
    this.fill.style.width = `${percent}%`;
    this.bar.setAttribute("aria-valuenow", String(percent));
    if (this.history.at(-1) !== percent) {
      this.history.push(percent);
      this.bar.dataset.history = this.history.join(",");
    }
  }

  append(text) {
    if (this.state !== "generating") {
      this.state = "generating";
      this.progressBlock.hidden = true;
    }
    this.content.textContent += text;
    scrollToEnd(false);
  }
}

function scrollToEnd(force) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) {
    box.scrollTop = box.scrollHeight;
  }
}

function formatStats(s) {
  const parts = [];
  if (s.ttft != null) parts.push(`TTFT ${(s.ttft / 1000).toFixed(2)} s`);
  if (s.rate != null) parts.push(`${s.rate.toFixed(1)} tok/s`);
  if (s.tokens) parts.push(`${s.tokens} tokens`);
  if (s.promptTokens) parts.push(`prompt ${s.promptTokens} tokens`);
  if (s.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

// ---------------------------------------------------------------- one exchange

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
  };
  const maxTokens = Number.parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const model = $("model").value;
  if (model) body.model = model; // with several models the server needs it
  return body;
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  new MessageView("user", text);
  const view = new MessageView("assistant", "");
  view.state = "waiting";
  view.progressBlock.hidden = false;
  const picked = $("model").selectedOptions[0];
  const cold = picked && picked.dataset.status !== "loaded";
  // The server answers once the model is loaded: say why the first token takes a while.
  view.progressLabel.textContent = cold ? `Loading model ${picked.value}…` : "Sending…";
  const controller = new AbortController();
  current = { controller, view };
  setBusy(true);

  const turn = epoch;
  const stats = { start: performance.now(), first: null, last: null, count: 0, tokens: 0 };
  let answer = "";
  let finished = false; // saw data: [DONE]; a stream cut before it is an error
  try {
    const { response, sentAt } = await postJSON(
      "/v1/chat/completions",
      requestBody(),
      controller.signal,
    );
    stats.start = sentAt;
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const { event, data } of sseEvents(response.body)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (event === "prefill_progress") {
        view.progress(chunk);
        stats.promptTokens = chunk.n_prompt_tokens;
        continue;
      }
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        stats.tokens = chunk.usage.completion_tokens;
        stats.promptTokens = chunk.usage.prompt_tokens;
      }
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const piece = choice.delta?.content;
      if (piece) {
        const now = performance.now();
        if (stats.first === null) {
          stats.first = now;
          stats.ttft = now - stats.start;
          view.node.dataset.ttftMs = String(Math.round(stats.ttft));
        }
        stats.last = now;
        stats.count += 1;
        answer += piece;
        view.append(piece);
        updateRate(stats);
        view.meta.textContent = formatStats({ ...stats, tokens: stats.count });
      }
      if (choice.finish_reason) stats.finish = choice.finish_reason;
    }
    if (!finished) throw new Error("the stream ended before [DONE]");
    view.state = "done";
    updateRate(stats);
    view.meta.textContent = formatStats(stats.tokens ? stats : { ...stats, tokens: stats.count });
  } catch (err) {
    view.progressBlock.hidden = true;
    if (controller.signal.aborted) {
      view.state = "stopped";
      updateRate(stats);
      view.meta.textContent = [formatStats({ ...stats, tokens: stats.count }), "stopped"]
        .filter(Boolean)
        .join(" · ");
    } else {
      view.state = "error";
      view.meta.textContent = `Error: ${err.message}`;
    }
  } finally {
    if (turn === epoch) {
      if (answer) {
        conversation.push({ role: "assistant", content: answer });
      } else {
        conversation.pop(); // nothing came back: this turn is not part of the conversation
        view.meta.textContent += " (not kept in the conversation)";
      }
    }
    current = null;
    setBusy(false);
    refreshHealth(); // show the freed slot now, not at the next poll
  }
}

function updateRate(stats) {
  if (stats.first === null || stats.count < 2 || stats.last <= stats.first) return;
  stats.rate = ((stats.count - 1) * 1000) / (stats.last - stats.first);
  if (!serverRate) $("stat-tps").textContent = stats.rate.toFixed(1);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.dataset.busy = busy ? "true" : "false";
}

// ---------------------------------------------------------------- status panel

async function refreshHealth() {
  try {
    const response = await fetch("/health", { cache: "no-store" });
    renderHealth(await response.json());
  } catch {
    renderHealth(null);
  }
}

/** Server-wide tokens/s from the /metrics counter, when the server has one. */
async function refreshServerRate() {
  if (!serverRate) return;
  const key = storedKey();
  let response;
  try {
    response = await fetch("/metrics", {
      cache: "no-store",
      headers: key ? { Authorization: `Bearer ${key}` } : {},
    });
  } catch {
    return;
  }
  if (response.status === 401) return; // no key yet: the tab's rate until one is given
  const match = response.ok ? GENERATED.exec(await response.text()) : null;
  if (!match) {
    serverRate = false;
    $("tps-source").textContent = "(this tab)";
    return;
  }
  const now = performance.now();
  samples.push([now, Number(match[1])]);
  while (samples.length > 2 && now - samples[0][0] > RATE_WINDOW_MS) samples.shift();
  if (samples.length < 2) return;
  const [[t0, n0], [t1, n1]] = [samples[0], samples.at(-1)];
  $("tps-source").textContent = "(server)";
  $("status-note").textContent =
    "Polled from /health and /metrics every second; tokens/s is the whole server's.";
  $("stat-tps").textContent = (((n1 - n0) * 1000) / (t1 - t0)).toFixed(1);
}

/** The model picker, from /v1/models: every served model with its status. */
async function refreshModels() {
  const key = storedKey();
  let response;
  try {
    response = await fetch("/v1/models", {
      cache: "no-store",
      headers: key ? { Authorization: `Bearer ${key}` } : {},
    });
  } catch {
    return;
  }
  if (!response.ok) return; // 401 until a key is given: keep what is shown
  renderModels((await response.json()).data ?? []);
}

function renderModels(models) {
  const select = $("model");
  const ids = models.map((m) => m.id);
  const same =
    ids.length === select.options.length && ids.every((id, i) => select.options[i].value === id);
  if (!same) {
    const kept = select.value;
    select.replaceChildren(
      ...ids.map((id) => {
        const option = document.createElement("option");
        option.value = id;
        return option;
      }),
    );
    if (ids.includes(kept)) select.value = kept;
  }
  models.forEach((m, i) => {
    const option = select.options[i];
    const status = m.status ?? "loaded"; // one model: no status field, loaded once healthy
    option.dataset.status = status;
    option.textContent = m.status ? `${m.id} (${m.status})` : m.id;
  });
  if (select.value) $("model-name").textContent = select.value;
}

async function pollHealth() {
  await Promise.all([refreshHealth(), refreshServerRate(), refreshModels()]);
  setTimeout(pollHealth, HEALTH_INTERVAL_MS);
}

function renderHealth(h) {
  const pill = $("server-state");
  if (!h) {
    pill.dataset.status = "unreachable";
    pill.textContent = "server unreachable";
    for (const id of ["stat-slots", "stat-queue", "stat-batch"]) $(id).textContent = "—";
    return;
  }
  pill.dataset.status = h.status;
  pill.textContent =
    h.status === "ok" ? "ready" : h.status === "loading" ? "loading model…" : `error: ${h.error}`;
  pill.title = h.error ?? "";
  if (h.model && !$("model").value) $("model-name").textContent = h.model;
  if (h.slots_total == null) return;
  $("stat-slots").textContent = `${h.slots_busy} / ${h.slots_total}`;
  $("stat-queue").textContent = String(h.queue_length);
  $("stat-batch").textContent = String(h.in_batch ?? "—");
  const dots = $("slot-dots");
  if (dots.childElementCount !== h.slots_total) {
    dots.replaceChildren(
      ...Array.from({ length: h.slots_total }, () => {
        const dot = document.createElement("span");
        dot.className = "slot";
        return dot;
      }),
    );
  }
  [...dots.children].forEach((dot, i) => dot.classList.toggle("busy", i < h.slots_busy));
}

// ---------------------------------------------------------------- wiring

function submitPrompt() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || current) return;
  prompt.value = "";
  send(text);
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  submitPrompt();
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submitPrompt();
  }
});
$("stop").addEventListener("click", () => current?.controller.abort());
$("clear").addEventListener("click", () => {
  current?.controller.abort();
  epoch += 1;
  conversation.length = 0;
  $("messages").replaceChildren($("empty-hint"));
  $("empty-hint").hidden = false;
});
$("temperature").addEventListener("input", (e) => {
  $("temperature-out").textContent = Number(e.target.value).toFixed(2);
});
$("temperature-out").textContent = Number($("temperature").value).toFixed(2);
$("key-cancel").addEventListener("click", () => $("key-dialog").close(""));
$("model").addEventListener("change", (e) => {
  $("model-name").textContent = e.target.value;
});

setBusy(false);
document.body.dataset.ready = "true";
pollHealth();
