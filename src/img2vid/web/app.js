// The img2vid page: everything goes through the same JSON API a script would use.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "img2vid.token";
// The fields shown up front; the rest live under "More settings".
const MAIN_PARAMS = ["num_frames", "num_steps", "motion_bucket_id", "fps_id", "seed", "width", "height"];
const LABELS = {
  watermark: "Invisible watermark",
  loop: "Loop",
  extend: "Extend (segments)",
  num_frames: "Frames",
  num_steps: "Steps",
  fps_id: "Frame rate id",
  motion_bucket_id: "Motion",
  cond_aug: "Conditioning noise",
  min_cfg: "Guidance, first frame",
  max_cfg: "Guidance, last frame",
  guidance: "Guidance schedule",
  sampler: "Sampler",
  seed: "Seed",
  width: "Width",
  height: "Height",
  fit: "Fit",
  decode_chunk_size: "Decode chunk",
  interpolate: "Frame interpolation",
};
const POLL_MS = 500;
const EVENT_FAILURES = 3; // event streams that fail in a row before the page polls instead
const PHASE_TEXT = {
  loading: "Starting…",
  conditioning: "Encoding the image…",
  decoding: "Decoding…",
  interpolating: "Interpolating…",
  writing: "Writing…",
};
const HISTORY_PAGE = 12;

const state = {
  model: null,       // GET /v1/model
  file: null,        // the picked image
  previewUrl: null,
  jobId: null,       // the job shown in the video panel
  job: null,
  pollTimer: null,
  events: null,      // the EventSource following the shown job
  eventFailures: 0,
  livePreview: null, // the preview URL shown (a blob URL with a token)
  historyOffset: 0,
  blobUrls: new Map(), // media fetched with a token (video/img elements cannot send headers)
};

class ApiError extends Error {
  constructor(status, body, headers) {
    super(body && typeof body.detail === "string" ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.headers = headers;
  }
}

function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", "Bearer " + token());
  let res;
  try {
    res = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(0, { detail: "Cannot reach the server. Is `img2vid serve` still running?" });
  }
  if (res.status === 401) askToken(token() ? "That token was not accepted." : "");
  let body = null;
  const type = res.headers.get("content-type") || "";
  if (type.includes("application/json")) body = await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, body, res.headers);
  return body;
}

// Without a token the browser streams media straight from the URL (Range requests, seeking).
// With one, an element cannot send the header, so fetch the bytes and hand it a blob URL.
async function mediaUrl(path) {
  if (!token()) return path;
  if (state.blobUrls.has(path)) return state.blobUrls.get(path);
  const res = await fetch(path, { headers: { Authorization: "Bearer " + token() } });
  if (!res.ok) throw new ApiError(res.status, null);
  const url = URL.createObjectURL(await res.blob());
  state.blobUrls.set(path, url);
  return url;
}

function askToken(message) {
  const form = $("#token-form");
  form.hidden = false;
  $("#model-status").textContent = message || "This server needs a token.";
  $("#token").focus();
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

function clearFieldErrors() {
  document.querySelectorAll(".field-error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll(".field.invalid").forEach((el) => el.classList.remove("invalid"));
}

function fieldError(name, message) {
  const el = document.getElementById("err-" + name);
  if (!el) return false;
  el.textContent = message;
  el.closest(".field").classList.add("invalid");
  if (!MAIN_PARAMS.includes(name)) $("#more").open = true;
  return true;
}

// ---- the model and the parameter form --------------------------------------------------------------

async function loadModel() {
  for (;;) {
    try {
      state.model = await api("/v1/model");
      break;
    } catch (e) {
      if (e.status === 401) return; // the token form takes over; it calls loadModel again
      $("#model-status").textContent = e.status === 503 ? e.message + " — waiting…" : e.message;
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  const m = state.model;
  $("#model-status").textContent = `${m.model} on ${m.device || "?"}` + (m.workers > 1 ? ` ×${m.workers}` : "");
  buildForm();
  updateGenerate();
  loadHistory(true);
}

function buildForm() {
  const main = $("#main-params");
  const more = $("#more-params");
  main.replaceChildren();
  more.replaceChildren();
  for (const [name, spec] of Object.entries(state.model.parameters)) {
    const field = document.createElement("div");
    field.className = "field";
    field.dataset.name = name;

    const label = document.createElement("label");
    label.htmlFor = "p-" + name;
    label.textContent = LABELS[name] || name;
    const apiName = document.createElement("code");
    apiName.textContent = name; // the name the API and its error messages use
    label.append(" ", apiName);
    field.append(label);

    const row = document.createElement("div");
    row.className = "row";
    let input;
    if (spec.type === "choice") {
      input = document.createElement("select");
      for (const c of spec.choices) input.append(new Option(c, c));
    } else if (spec.type === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
    } else {
      input = document.createElement("input");
      input.type = "number";
      input.min = spec.min;
      input.max = spec.max;
      input.step = spec.multiple_of || (spec.type === "int" ? 1 : "any");
      input.inputMode = spec.type === "int" ? "numeric" : "decimal";
      if (spec.none_means) input.placeholder = spec.none_means;
    }
    input.id = "p-" + name;
    input.name = name;
    input.addEventListener("input", () => {
      const err = document.getElementById("err-" + name);
      err.textContent = "";
      field.classList.remove("invalid");
    });
    row.append(input);
    if (name === "seed") {
      const dice = document.createElement("button");
      dice.type = "button";
      dice.id = "seed-random";
      dice.className = "secondary";
      dice.textContent = "Random";
      dice.title = "pick a random seed";
      dice.addEventListener("click", () => { input.value = randomSeed(); });
      row.append(dice);
    }
    field.append(row);

    const help = document.createElement("small");
    help.className = "help";
    const range = spec.type === "choice" || spec.type === "bool" ? "" : ` (${spec.min}–${fmtMax(spec.max)}${spec.multiple_of ? `, ×${spec.multiple_of}` : ""})`;
    help.textContent = spec.help + range;
    field.append(help);

    const err = document.createElement("small");
    err.className = "field-error";
    err.id = "err-" + name;
    err.setAttribute("aria-live", "polite");
    field.append(err);

    (MAIN_PARAMS.includes(name) ? main : more).append(field);
  }
  fillForm(state.model.defaults);
}

// JSON numbers past 2^53 arrive rounded (the seed's 2^63-1 would read 9223372036854776000).
function fmtMax(max) {
  return max > Number.MAX_SAFE_INTEGER ? `2^${Math.round(Math.log2(max))}−1` : String(max);
}

function fillForm(values) {
  for (const [name, value] of Object.entries(values)) {
    const input = document.getElementById("p-" + name);
    if (input && input.type === "checkbox") input.checked = value === true || value === "true";
    else if (input) input.value = value === null || value === undefined ? "" : String(value);
  }
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

// ---- the image ---------------------------------------------------------------------------------------

function pickFile(file) {
  showError("");
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image.`);
    return;
  }
  const limit = state.model ? state.model.max_upload_mb : Infinity;
  if (file.size > limit * 1024 * 1024) {
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${limit} MB.`);
    return;
  }
  state.file = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  const img = $("#preview");
  img.src = state.previewUrl;
  img.alt = file.name;
  img.hidden = false;
  $("#drop-text").textContent = file.name;
  updateGenerate();
}

function updateGenerate() {
  $("#generate").disabled = !(state.file && state.model);
}

// ---- jobs --------------------------------------------------------------------------------------------

async function generate() {
  showError("");
  clearFieldErrors();
  const data = new FormData();
  data.append("image", state.file, state.file.name);
  for (const input of $("#params").querySelectorAll("input, select")) {
    if (input.type === "checkbox") data.append(input.name, input.checked ? "true" : "false");
    else if (input.value !== "") data.append(input.name, input.value);
  }
  const button = $("#generate");
  button.disabled = true;
  try {
    const job = await api("/v1/jobs", { method: "POST", body: data });
    await showJob(job.id, job);
    loadHistory(true);
  } catch (e) {
    const field = e.status === 422 && e.body.field;
    if (field && fieldError(field, e.message.replace(field + ": ", ""))) {
      showError(e.message);
    } else if (e.status === 429) {
      const wait = e.headers && e.headers.get("Retry-After");
      showError(e.message + (wait ? ` (about ${wait} s)` : ""));
    } else if (e.status !== 401) {
      showError(e.message);
    }
  } finally {
    updateGenerate();
  }
}

function stopPolling() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
  if (state.events) state.events.close();
  state.events = null;
}

// Keep an active job up to date: server-sent events, or polling where they fail.
function follow(job) {
  const active = job.status === "queued" || job.status === "running";
  if (!active || job.id !== state.jobId) return stopPolling();
  if (state.events || state.pollTimer) return;
  if (window.EventSource && state.eventFailures < EVENT_FAILURES) openEvents(job.id);
  else state.pollTimer = setTimeout(poll, POLL_MS);
}

function openEvents(id) {
  // EventSource cannot send headers: the token goes in the query, as the API allows.
  const query = token() ? "?token=" + encodeURIComponent(token()) : "";
  const es = new EventSource(`/v1/jobs/${id}/events${query}`);
  state.events = es;
  const onJob = (e) => {
    state.eventFailures = 0;
    if (id === state.jobId) renderJob(JSON.parse(e.data));
  };
  es.addEventListener("progress", onJob);
  es.addEventListener("end", (e) => { stopPolling(); onJob(e); });
  es.onerror = () => {
    if (state.events !== es) return;
    // CONNECTING: the stream ended and the browser reconnects by itself; CLOSED: it gave up.
    state.eventFailures += 1;
    if (es.readyState === EventSource.CLOSED || state.eventFailures >= EVENT_FAILURES) {
      stopPolling();
      state.pollTimer = setTimeout(poll, POLL_MS);
    }
  };
}

async function showJob(id, job) {
  stopPolling();
  state.jobId = id;
  state.job = null;
  const video = $("#video");
  video.pause();
  video.removeAttribute("src");
  video.hidden = true;
  $("#download").hidden = true;
  renderJob(job || (await api("/v1/jobs/" + id)));
}

async function poll() {
  state.pollTimer = null;
  const id = state.jobId;
  try {
    const job = await api("/v1/jobs/" + id);
    if (id === state.jobId) renderJob(job);
  } catch (e) {
    if (id === state.jobId) {
      $("#job-status").textContent = e.message;
      state.pollTimer = setTimeout(poll, POLL_MS * 4);
    }
  }
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${Math.ceil(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

const STATUS_TEXT = {
  queued: "Waiting in the queue",
  running: "Generating",
  succeeded: "Done",
  failed: "Failed",
  canceled: "Canceled",
};

function renderJob(job) {
  const isActive = (j) => j.status === "queued" || j.status === "running";
  const justFinished = state.job && state.job.id === job.id && isActive(state.job) && !isActive(job);
  state.job = job;
  const active = isActive(job);
  let text = STATUS_TEXT[job.status] || job.status;
  if (job.status === "queued" && job.queue_position !== null) {
    text += job.queue_position === 0 ? " (next)" : ` (${job.queue_position} ahead)`;
  }
  if (job.cancel_requested && active) text = "Canceling…";
  $("#job-status").textContent = text;
  $("#job-status").dataset.status = job.status;

  const bar = $("#progress");
  const { step, total } = job.progress;
  bar.hidden = !active && job.status !== "succeeded";
  if (total > 0) {
    bar.max = total;
    bar.value = step;
  } else if (job.status === "succeeded") {
    bar.max = 1;
    bar.value = 1;
  } else {
    bar.removeAttribute("value"); // indeterminate while queued or encoding the image
  }
  let ptext = "";
  const phase = job.status === "running" ? job.phase : null;
  if (phase && PHASE_TEXT[phase]) {
    ptext = PHASE_TEXT[phase];
  } else if (job.status === "running" && total > 0) {
    ptext = `step ${step} / ${total}`;
    if (job.eta_s !== null) ptext += ` · about ${fmtSeconds(job.eta_s)} left`;
  }
  $("#progress-text").textContent = ptext;
  $("#progress-text").dataset.phase = job.status === "succeeded" ? "done" : phase || job.status;
  showLivePreview(active ? job.preview_url : null);
  $("#cancel").hidden = !active || job.cancel_requested;

  if (job.status === "failed") {
    showError("The job failed: " + (job.error || "unknown error"));
  }
  renderParams(job);
  $("#reuse").hidden = false;

  if (active) {
    follow(job);
  } else {
    stopPolling();
    if (job.status === "succeeded") showVideo(job);
    if (justFinished) loadHistory(true);
  }
}

// The live preview: every frame so far, animated, while the job runs; gone when it ends.
async function showLivePreview(url) {
  if (url === state.livePreview) return;
  state.livePreview = url;
  const img = $("#live-preview");
  const drop = () => { if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src); };
  if (!url) {
    drop();
    img.hidden = true;
    img.removeAttribute("src");
    return;
  }
  let src = url;
  if (token()) { // an <img> cannot send the header: fetch the bytes
    try {
      const res = await fetch(url, { headers: { Authorization: "Bearer " + token() } });
      if (!res.ok) return;
      src = URL.createObjectURL(await res.blob());
    } catch (e) {
      return; // the next preview will do
    }
    if (state.livePreview !== url) return URL.revokeObjectURL(src);
  }
  drop();
  img.src = src;
  img.hidden = false;
}

async function showVideo(job) {
  const video = $("#video");
  if (video.dataset.job === job.id && !video.hidden) return;
  try {
    const url = await mediaUrl(job.video_url);
    if (job.id !== state.jobId) return;
    video.dataset.job = job.id;
    video.muted = true; // autoplay is only allowed muted
    video.src = url;
    video.hidden = false;
    video.play().catch(() => {}); // a blocked autoplay still leaves the controls
    const link = $("#download");
    link.href = token() ? url : job.video_url;
    link.download = `img2vid-${job.id.slice(0, 8)}.mp4`;
    link.hidden = false;
  } catch (e) {
    showError("Cannot load the video: " + e.message);
  }
}

function renderParams(job) {
  const dl = $("#job-params");
  dl.replaceChildren();
  const params = { ...job.parameters, ...(job.resolved_parameters || {}) };
  for (const [k, v] of Object.entries(params)) {
    if (v === null || v === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = LABELS[k] || k;
    dt.title = k;
    const dd = document.createElement("dd");
    dd.textContent = typeof v === "number" && !Number.isInteger(v) ? String(+v.toFixed(4)) : String(v);
    dl.append(dt, dd);
  }
}

async function cancelJob() {
  if (!state.jobId) return;
  $("#cancel").disabled = true;
  try {
    const job = await api("/v1/jobs/" + state.jobId, { method: "DELETE" });
    stopPolling();
    renderJob(job);
  } catch (e) {
    showError(e.message);
  } finally {
    $("#cancel").disabled = false;
  }
}

function reuseSettings() {
  if (!state.job) return;
  const p = state.job.parameters;
  fillForm(Object.fromEntries(Object.keys(state.model.parameters).map((k) => [k, p[k] ?? null])));
}

// ---- history -----------------------------------------------------------------------------------------

async function loadHistory(reset) {
  if (!state.model) return;
  if (reset) state.historyOffset = 0;
  let page;
  try {
    page = await api(`/v1/jobs?limit=${HISTORY_PAGE}&offset=${state.historyOffset}`);
  } catch (e) {
    return;
  }
  const list = $("#history");
  if (reset) list.replaceChildren();
  for (const job of page.jobs) list.append(historyItem(job));
  state.historyOffset += page.jobs.length;
  $("#history-more").hidden = state.historyOffset >= page.total;
  if (reset && !state.jobId) {
    const active = page.jobs.find((j) => j.status === "queued" || j.status === "running");
    if (active) showJob(active.id, active); // a reload mid-job picks it up again
  }
}

function historyItem(job) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "history-item";
  button.dataset.id = job.id;
  button.addEventListener("click", () => {
    showError("");
    showJob(job.id);
    window.scrollTo({ top: $("#output-card").offsetTop - 8, behavior: "smooth" });
  });

  const img = document.createElement("img");
  img.alt = "";
  img.loading = "lazy";
  mediaUrl(job.image_url).then((u) => { img.src = u; }).catch(() => {});
  const text = document.createElement("span");
  const title = document.createElement("strong");
  title.textContent = STATUS_TEXT[job.status] || job.status;
  title.className = "status-" + job.status;
  const when = document.createElement("span");
  when.className = "muted";
  when.textContent = " " + new Date(job.created).toLocaleString();
  const p = job.parameters;
  const details = document.createElement("small");
  details.textContent = [
    p.num_frames != null ? `${p.num_frames} frames` : null,
    p.num_steps != null ? `${p.num_steps} steps` : null,
    p.width && p.height ? `${p.width}×${p.height}` : null,
    `motion ${p.motion_bucket_id}`,
    `seed ${p.seed}`,
  ].filter(Boolean).join(" · ");
  text.append(title, when, document.createElement("br"), details);
  button.append(img, text);
  li.append(button);
  return li;
}

// ---- wiring ------------------------------------------------------------------------------------------

function init() {
  $("#file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#file").click(); }
  });
  $("#generate").addEventListener("click", generate);
  $("#params").addEventListener("submit", (e) => { e.preventDefault(); if (!$("#generate").disabled) generate(); });
  $("#reset").addEventListener("click", () => { clearFieldErrors(); if (state.model) fillForm(state.model.defaults); });
  $("#cancel").addEventListener("click", cancelJob);
  $("#reuse").addEventListener("click", reuseSettings);
  $("#history-more").addEventListener("click", () => loadHistory(false));
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token-form").hidden = true;
    loadModel();
  });
  loadModel();
}

init();
