// The experience centre page: make a video, watch it being made, keep a history.
//
// Plain JavaScript with standard DOM APIs (no build step, nothing fetched from the internet).
// It talks only to the job service that serves it, on the same origin: the Jobs API under /v1
// (DESIGN.md, "Jobs API"). The API key is kept in localStorage and sent as a bearer token;
// EventSource and <video> cannot send headers, so their URLs carry it as ?key= (the service
// accepts that on the events and content URLs only).
"use strict";

const KEY_STORAGE = "wan.apiKey";
const PAGE_SIZE = 10;
const FINAL_STATUSES = new Set(["completed", "failed", "cancelled"]);
const ACTIVE_STATUSES = new Set(["queued", "in_progress"]);
// The named events of GET /v1/videos/{id}/events ("deleted": by another tab or client).
const EVENT_TYPES = ["queued", "progress", "completed", "failed", "cancelled", "deleted"];
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];
// Used only when the service's model description leaves a bound out; the server checks anyway.
const FALLBACK_LIMITS = { max_num_frames: 161, max_fps: 60, max_inference_steps: 100, max_guidance_scale: 20 };
// The longest wait between two tries to reopen a job's event stream that the server closed.
const MAX_RETRY_DELAY_MS = 30000;

const $ = (id) => document.getElementById(id);

const state = {
  key: null,
  models: new Map(), // id -> normalized model
  cards: new Map(), // video id -> {el, video, source, retryDelay, live, lastEvent}
  lastId: null, // the oldest video listed, for ?after=
  image: null, // {file, url} of the chosen image
};

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const error = (body && body.error) || {};
    super(error.message || (status ? `The service answered ${status}.` : "The job service cannot be reached."));
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
    this.retryAfter = retryAfter;
  }
}

// Seeds go up to 2^63-1, past what a JavaScript number holds exactly: read them as strings so a
// seed shown or reused is the one the server used. (In JSON text a key can only be `"seed":`
// outside a string value; inside one its quotes would be escaped.)
function parseJson(text) {
  return JSON.parse(text.replace(/"seed"(\s*):(\s*)(\d+)/g, '"seed"$1:$2"$3"'));
}

// The inverse: a seed held as a string of digits goes out as a JSON number with all its digits.
function toJson(body) {
  return JSON.stringify(body).replace(/([{,])"seed":"(\d+)"/, "$1\"seed\":$2");
}

async function api(path, { method = "GET", body, key = state.key } = {}) {
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : toJson(body) });
  } catch {
    throw new ApiError(0, null, null);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? parseJson(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    throw new ApiError(response.status, data, retryAfter);
  }
  return data;
}

const withKey = (path) => `${path}${path.includes("?") ? "&" : "?"}key=${encodeURIComponent(state.key)}`;
const videoPath = (id) => `/v1/videos/${encodeURIComponent(id)}`;

// ---------------------------------------------------------------------------------------------
// The API key

function showKeyForm(message, { canCancel = false } = {}) {
  closeAllStreams();
  $("key-section").hidden = false;
  $("key-cancel").hidden = !canCancel;
  $("key-error").textContent = message || "";
  $("key-input").setAttribute("aria-invalid", message ? "true" : "false");
  if (!canCancel) {
    $("app").hidden = true;
    $("key-status").hidden = true;
  }
  $("key-input").focus();
}

function keyRefused(error) {
  // A saved key that stopped working (revoked, another server): forget it, ask for a new one.
  localStorage.removeItem(KEY_STORAGE);
  showKeyForm(`The service refused the saved API key: ${error.message} Paste a valid key.`);
}

async function saveKey(event) {
  event.preventDefault();
  const candidate = $("key-input").value.trim();
  const error = $("key-error");
  if (!candidate) {
    error.textContent = "Paste your API key first.";
    $("key-input").setAttribute("aria-invalid", "true");
    return;
  }
  $("key-save").disabled = true;
  error.textContent = "Checking the key…";
  try {
    const models = await api("/v1/models", { key: candidate });
    localStorage.setItem(KEY_STORAGE, candidate);
    $("key-input").value = "";
    $("key-input").setAttribute("aria-invalid", "false");
    error.textContent = "";
    $("key-section").hidden = true;
    await start(candidate, models);
  } catch (e) {
    $("key-input").setAttribute("aria-invalid", "true");
    error.textContent =
      e.status === 401
        ? `This key was not accepted: ${e.message}`
        : `The key could not be checked: ${e.message}`;
  } finally {
    $("key-save").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Models and the form

// native_sizes entries may come as [w, h], "WxH" or {width, height}.
function parseSize(size) {
  if (Array.isArray(size)) return [Number(size[0]), Number(size[1])];
  if (typeof size === "string") {
    const match = /^(\d+)\s*[x×]\s*(\d+)$/.exec(size.trim());
    return match ? [Number(match[1]), Number(match[2])] : null;
  }
  if (size && typeof size === "object") return [Number(size.width), Number(size.height)];
  return null;
}

function normalizeModel(raw) {
  const defaults = raw.defaults || {};
  const limits = { ...FALLBACK_LIMITS, ...(raw.limits || {}) };
  const multiple = Number(raw.size_multiple) || 16;
  const fits = ([w, h]) =>
    w > 0 && h > 0 && w % multiple === 0 && h % multiple === 0 &&
    (!limits.max_side_px || Math.max(w, h) <= limits.max_side_px) &&
    (!limits.max_pixels || w * h <= limits.max_pixels);
  // Native sizes and their portrait (or landscape) forms, as far as this server's limits allow.
  const presets = [];
  for (const size of (raw.native_sizes || []).map(parseSize).filter(Boolean)) {
    for (const candidate of [size, [size[1], size[0]]]) {
      if (fits(candidate) && !presets.some(([w, h]) => w === candidate[0] && h === candidate[1])) {
        presets.push(candidate);
      }
    }
  }
  // GET /v1/models lists profiles as {name: {defaults, lora, scheduler, lossy, locked}}; a list of
  // names (or of {name, ...}) is read too. locked null: not told, so the page assumes steps and guidance.
  const rawProfiles = raw.profiles || [];
  const entries = Array.isArray(rawProfiles)
    ? rawProfiles.map((p) => (typeof p === "string" ? [p, {}] : [p && p.name, p || {}]))
    : Object.entries(rawProfiles).map(([name, p]) => [name, p || {}]);
  const profiles = entries.filter(([name]) => name).map(([name, p]) => ({
    name,
    defaults: p.defaults || {},
    locked: Array.isArray(p.locked) ? p.locked : null,
    lossy: p.lossy || [],
    lora: p.lora || [],
  }));
  return {
    id: raw.id,
    imageInput: raw.image_input || "rejected",
    multiple,
    presets,
    defaults,
    limits,
    profiles,
    defaultSize: defaults.width && defaults.height ? [defaults.width, defaults.height] : null,
  };
}

const ACCEPTS = {
  rejected: "Text only.",
  optional: "Text, with an optional image to start from.",
  required: "Text and an image to start from (required).",
};

function currentModel() {
  return state.models.get($("model").value);
}

function fillModels(list) {
  state.models.clear();
  const select = $("model");
  select.replaceChildren();
  for (const raw of list) {
    const model = normalizeModel(raw);
    state.models.set(model.id, model);
    const label = { rejected: "text", optional: "text, image optional", required: "text + image" }[model.imageInput];
    select.append(new Option(`${model.id} (${label || model.imageInput})`, model.id));
  }
}

function orientation([w, h]) {
  return w > h ? "landscape" : w < h ? "portrait" : "square";
}

// Applies the chosen model: what it accepts, its sizes and durations, its defaults in the form.
function applyModel({ keepPrompt = true } = {}) {
  const model = currentModel();
  if (!model) return;
  clearErrors();
  $("model-info").textContent = ACCEPTS[model.imageInput] || "";
  const takesImage = model.imageInput !== "rejected";
  $("image-field").hidden = !takesImage;
  $("image-label").textContent = model.imageInput === "required" ? "Image (required)" : "Image (optional)";
  if (!takesImage) clearImage();

  const size = $("size");
  size.replaceChildren();
  const [dw, dh] = model.defaultSize || [0, 0];
  size.append(new Option(`${dw}×${dh} (default)`, ""));
  $("size-hint").textContent =
    model.imageInput === "rejected" ? "" : "With an image, the default size takes the image's shape.";
  for (const preset of model.presets) {
    if (preset[0] === dw && preset[1] === dh) continue; // the default option above is this size
    size.append(new Option(`${preset[0]}×${preset[1]} ${orientation(preset)}`, `${preset[0]}x${preset[1]}`));
  }
  size.append(new Option("Custom size…", "custom"));
  $("custom-size").hidden = true;
  for (const id of ["width", "height"]) {
    const input = $(id);
    input.step = model.multiple;
    input.min = model.multiple;
    if (model.limits.max_side_px) input.max = model.limits.max_side_px;
    input.value = id === "width" ? dw : dh;
  }

  const profiles = $("profile");
  profiles.replaceChildren(new Option("None: the settings below", ""));
  for (const profile of model.profiles) profiles.append(new Option(profile.name, profile.name));
  $("profile-field").hidden = model.profiles.length === 0;

  setDefaults(model);
  if (!keepPrompt) $("prompt").value = "";
}

function setDefaults(model = currentModel()) {
  const d = model.defaults;
  $("negative_prompt").value = d.negative_prompt ?? "";
  $("num_inference_steps").value = d.num_inference_steps ?? "";
  $("fps").value = d.fps ?? "";
  $("guidance_scale").value = d.guidance_scale ?? "";
  const twoExperts = d.guidance_scale_2 !== null && d.guidance_scale_2 !== undefined;
  $("guidance_scale_2-field").hidden = !twoExperts;
  $("guidance_scale_2").value = twoExperts ? d.guidance_scale_2 : "";
  $("guidance_scale-label").textContent = twoExperts ? "Guidance, high-noise expert" : "Guidance";
  $("seed").value = "";
  $("profile").value = "";
  applyProfile();
}

const formatNumber = (n, digits = 2) => String(Number(Number(n).toFixed(digits)));

// Durations are frame counts of the form 4k+1 (the model's rule); each option shows both the
// seconds and the frames, so any choice is valid and nothing is rounded behind the user's back.
function fillDurations(selectedFrames) {
  const model = currentModel();
  const select = $("duration");
  const previous = selectedFrames ?? Number(select.value);
  const fps = Number($("fps").value) || model.defaults.fps || 16;
  const max = model.limits.max_num_frames;
  select.replaceChildren();
  const counts = [];
  for (let frames = 5; frames <= max; frames += 4) counts.push(frames);
  if (previous && !counts.includes(previous)) counts.push(previous);
  counts.sort((a, b) => a - b);
  for (const frames of counts) {
    const option = new Option(`${formatNumber((frames - 1) / fps)} s · ${frames} frames`, String(frames));
    select.append(option);
  }
  if (previous) select.value = String(previous);
  $("duration-hint").textContent = `At ${fps} frames per second.`;
}

// The request fields a speed preset may set that the form shows, with their controls and words.
const PRESET_FIELDS = {
  num_inference_steps: ["num_inference_steps", "steps"],
  guidance_scale: ["guidance_scale", "guidance"],
  guidance_scale_2: ["guidance_scale_2", "guidance"],
  fps: ["fps", "frames per second"],
  num_frames: ["duration", "duration"],
  negative_prompt: ["negative_prompt", "negative prompt"],
  width: ["size", "size"],
  height: ["size", "size"],
  lora: [null, "LoRA"], // no control: the page sends no lora of its own
};
const ASSUMED_LOCKED = ["num_inference_steps", "guidance_scale", "guidance_scale_2"];

function currentProfile(model = currentModel()) {
  return model.profiles.find((p) => p.name === $("profile").value) || null;
}

// Applies the chosen speed preset: the form shows the values the job will use (the model's
// defaults under the preset's own), and the fields the preset fixes are disabled and not sent
// (the server refuses a locked field given with its preset).
function applyProfile() {
  const model = currentModel();
  const profile = currentProfile(model);
  const values = { ...model.defaults, ...(profile ? profile.defaults : {}) };
  for (const id of ["negative_prompt", "num_inference_steps", "fps", "guidance_scale"]) $(id).value = values[id] ?? "";
  if (!$("guidance_scale_2-field").hidden) $("guidance_scale_2").value = values.guidance_scale_2 ?? "";
  fillDurations(values.num_frames);
  const locked = profile ? profile.locked ?? ASSUMED_LOCKED : [];
  const controls = new Set(locked.map((field) => PRESET_FIELDS[field]?.[0]).filter(Boolean));
  for (const [control] of Object.values(PRESET_FIELDS)) if (control) $(control).disabled = controls.has(control);
  for (const id of ["width", "height"]) $(id).disabled = controls.has("size");
  const hint = [];
  if (locked.length) {
    const words = [...new Set(locked.map((field) => PRESET_FIELDS[field]?.[1] || field))];
    hint.push(`The preset sets its own ${words.join(", ").replace(/, ([^,]*)$/, " and $1")}.`);
  }
  if (profile && profile.lora.length) hint.push(`It uses the LoRA ${profile.lora.map((l) => l.name).join(", ")}.`);
  if (profile && profile.lossy.length) hint.push(`Faster, at some cost in quality (${profile.lossy.join(", ").replaceAll("_", " ")}).`);
  $("profile-hint").textContent = hint.join(" ");
}

function onSizeChange() {
  const custom = $("size").value === "custom";
  $("custom-size").hidden = !custom;
  showError("size", "");
  if (custom) $("width").focus();
}

// ---------------------------------------------------------------------------------------------
// Image input

function setImage(file) {
  const model = currentModel();
  showError("image", "");
  if (!IMAGE_TYPES.includes(file.type)) {
    showError("image", `${file.name} is not a PNG, JPEG or WebP image.`);
    return;
  }
  if (model.limits.max_image_bytes && file.size > model.limits.max_image_bytes) {
    showError("image", `${file.name} is ${formatBytes(file.size)}, over the ${formatBytes(model.limits.max_image_bytes)} limit.`);
    return;
  }
  clearImage();
  const url = URL.createObjectURL(file);
  state.image = { file, url };
  const preview = $("image-preview");
  preview.src = url;
  preview.hidden = false;
  $("image-name").textContent = `${file.name}, ${formatBytes(file.size)}`;
  $("image-clear").hidden = false;
}

function clearImage() {
  if (state.image) URL.revokeObjectURL(state.image.url);
  state.image = null;
  $("image").value = "";
  $("image-preview").hidden = true;
  $("image-preview").removeAttribute("src");
  $("image-name").textContent = "";
  $("image-clear").hidden = true;
}

function formatBytes(bytes) {
  return bytes >= 1048576 ? `${formatNumber(bytes / 1048576, 1)} MB` : `${Math.ceil(bytes / 1024)} kB`;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---------------------------------------------------------------------------------------------
// Validation: the rules the page knows from the model's description, shown as the user goes;
// the server's own message (its error's `param`) lands next to the same field after submission.

// Which control shows the error for an API parameter.
function fieldFor(param) {
  const custom = $("size").value === "custom";
  const map = {
    size: "size",
    width: custom ? "width" : "size",
    height: custom ? "height" : "size",
    seconds: "num_frames",
    num_frames: "num_frames",
    input_reference: "image",
  };
  const name = map[param] || param;
  return $(`${name}-error`) ? name : null;
}

const CONTROL = { num_frames: "duration" };

function showError(field, message) {
  const error = $(`${field}-error`);
  if (!error) return;
  error.textContent = message;
  const control = $(CONTROL[field] || field);
  if (control) control.setAttribute("aria-invalid", message ? "true" : "false");
  if (message && $("advanced").contains(error)) $("advanced").open = true;
}

function clearErrors() {
  for (const element of document.querySelectorAll("#video-form .error")) {
    element.textContent = "";
  }
  for (const element of document.querySelectorAll("#video-form [aria-invalid]")) {
    element.setAttribute("aria-invalid", "false");
  }
}

function checkInteger(value, label, low, high) {
  if (!/^\d+$/.test(value.trim())) return `${label} must be a whole number.`;
  const n = Number(value);
  if (n < low || (high !== undefined && n > high)) {
    return high !== undefined ? `${label} must be between ${low} and ${high}.` : `${label} must be at least ${low}.`;
  }
  return "";
}

function checkNumber(value, label, high) {
  if (value.trim() === "" || !Number.isFinite(Number(value))) return `${label} must be a number.`;
  const n = Number(value);
  if (n < 0 || n > high) return `${label} must be between 0 and ${high}.`;
  return "";
}

// Returns {field: message} for the fields given (all when none are).
function validate(only) {
  const model = currentModel();
  const limits = model.limits;
  const errors = {};
  const want = (field) => !only || only.includes(field);
  const prompt = $("prompt").value;
  if (want("prompt")) {
    if (!prompt.trim()) errors.prompt = "Describe the video you want.";
    else if (limits.max_prompt_chars && prompt.length > limits.max_prompt_chars) {
      errors.prompt = `The prompt is ${prompt.length} characters, over the ${limits.max_prompt_chars} limit.`;
    }
  }
  const negative = $("negative_prompt").value;
  if (want("negative_prompt") && limits.max_prompt_chars && negative.length > limits.max_prompt_chars) {
    errors.negative_prompt = `The negative prompt is ${negative.length} characters, over the ${limits.max_prompt_chars} limit.`;
  }
  if (want("image") && model.imageInput === "required" && !state.image) {
    errors.image = `${model.id} makes a video from an image: choose one.`;
  }
  if ($("size").value === "custom" && !$("size").disabled) {
    const high = limits.max_side_px;
    for (const side of ["width", "height"]) {
      if (!want(side)) continue;
      const label = side === "width" ? "Width" : "Height";
      const value = $(side).value;
      let message = checkInteger(value, label, model.multiple, high);
      if (!message && Number(value) % model.multiple) {
        message = `${label} must be a multiple of ${model.multiple} for ${model.id}.`;
      }
      if (message) errors[side] = message;
    }
    const pixels = Number($("width").value) * Number($("height").value);
    if (want("width") && !errors.width && !errors.height && limits.max_pixels && pixels > limits.max_pixels) {
      errors.width = `Width × height is ${pixels} pixels, over the ${limits.max_pixels} limit.`;
    }
  }
  // A field a speed preset fixes is disabled: not checked, not sent.
  const open = (field) => want(field) && !$(field).disabled;
  if (open("num_inference_steps")) {
    const message = checkInteger($("num_inference_steps").value, "Steps", 1, limits.max_inference_steps);
    if (message) errors.num_inference_steps = message;
  }
  if (open("guidance_scale")) {
    const message = checkNumber($("guidance_scale").value, "Guidance", limits.max_guidance_scale);
    if (message) errors.guidance_scale = message;
  }
  if (open("guidance_scale_2") && !$("guidance_scale_2-field").hidden) {
    const message = checkNumber($("guidance_scale_2").value, "Guidance", limits.max_guidance_scale);
    if (message) errors.guidance_scale_2 = message;
  }
  if (open("fps")) {
    const message = checkInteger($("fps").value, "Frames per second", 1, limits.max_fps);
    if (message) errors.fps = message;
  }
  const seed = $("seed").value.trim();
  if (want("seed") && seed && !/^\d+$/.test(seed)) {
    errors.seed = "The seed must be a whole number, 0 or more (or empty for a random one).";
  }
  return errors;
}

// Checks one field as the user leaves it (and again while they correct it).
function validateField(event) {
  const field = event.target.id === "duration" ? "num_frames" : event.target.id;
  if (!$(`${field}-error`)) return;
  if (event.type === "input" && !$(`${field}-error`).textContent) return;
  const errors = validate([field]);
  showError(field, errors[field] || "");
}

async function buildBody() {
  const model = currentModel();
  const body = { model: model.id, prompt: $("prompt").value };
  const size = $("size").value;
  const open = (id) => !$(id).disabled; // disabled: fixed by the speed preset, not sent
  if (size === "custom" && open("size")) {
    body.width = Number($("width").value);
    body.height = Number($("height").value);
  } else if (size && open("size")) {
    body.size = size;
  }
  if ($("profile").value) body.profile = $("profile").value;
  if (open("duration")) body.num_frames = Number($("duration").value);
  if (open("fps")) body.fps = Number($("fps").value);
  if (open("negative_prompt")) body.negative_prompt = $("negative_prompt").value;
  if (open("num_inference_steps")) body.num_inference_steps = Number($("num_inference_steps").value);
  if (open("guidance_scale")) body.guidance_scale = Number($("guidance_scale").value);
  if (open("guidance_scale_2") && !$("guidance_scale_2-field").hidden) {
    body.guidance_scale_2 = Number($("guidance_scale_2").value);
  }
  const seed = $("seed").value.trim();
  if (seed) body.seed = seed; // digits; toJson sends them as a number
  if (state.image) body.image = await readAsDataUrl(state.image.file);
  return body;
}

async function submitVideo(event) {
  event.preventDefault();
  clearErrors();
  const errors = validate();
  const fields = Object.keys(errors);
  if (fields.length) {
    for (const field of fields) showError(field, errors[field]);
    focusField(fields[0]);
    return;
  }
  const button = $("submit");
  button.disabled = true;
  button.textContent = "Submitting…";
  try {
    const video = await api("/v1/videos", { method: "POST", body: await buildBody() });
    const card = addCard(video, { top: true });
    card.live = true;
    follow(card);
    announce(`Video queued${video.queue_position ? ` at position ${video.queue_position}` : ""}.`);
    card.el.querySelector(".status").focus({ preventScroll: true });
  } catch (e) {
    if (e.status === 401) return keyRefused(e);
    const field = e.param && fieldFor(e.param);
    if (field && e.status === 400) {
      showError(field, e.message);
      focusField(field);
    } else if (e.status === 429) {
      $("form-error").textContent = `${e.message}${e.retryAfter ? ` Try again in ${e.retryAfter} s.` : ""}`;
    } else {
      $("form-error").textContent = e.message;
    }
  } finally {
    button.disabled = false;
    button.textContent = "Generate video";
  }
}

function focusField(field) {
  const control = $(CONTROL[field] || field);
  if (!control) return;
  if ($("advanced").contains(control)) $("advanced").open = true;
  if (field === "image") {
    $("image").focus();
    $("drop").scrollIntoView({ block: "center" });
  } else {
    control.focus();
  }
}

// ---------------------------------------------------------------------------------------------
// Video cards

const STATUS_TEXT = {
  queued: "Queued",
  in_progress: "Making it",
  completed: "Ready",
  failed: "Failed",
  cancelled: "Cancelled",
};

function addCard(video, { top = false } = {}) {
  const existing = state.cards.get(video.id);
  if (existing) {
    render(existing, video);
    return existing;
  }
  const el = $("video-card").content.firstElementChild.cloneNode(true);
  const card = { el, video, source: null, retryDelay: 1000, live: false, lastEvent: null, retryTimer: null };
  el.dataset.id = video.id;
  el.querySelector(".status").tabIndex = -1;
  el.querySelector(".cancel").addEventListener("click", () => cancelVideo(card));
  el.querySelector(".reuse").addEventListener("click", () => reuseSettings(card.video));
  el.querySelector(".delete").addEventListener("click", () => confirmDelete(card, true));
  el.querySelector(".delete-no").addEventListener("click", () => confirmDelete(card, false));
  el.querySelector(".delete-yes").addEventListener("click", () => deleteVideo(card));
  state.cards.set(video.id, card);
  const list = $("videos");
  if (top) list.prepend(el);
  else list.append(el);
  $("videos-empty").hidden = true;
  render(card, video);
  return card;
}

function parametersOf(video) {
  const p = { ...(video.parameters || {}) };
  if ((!p.width || !p.height) && video.size) {
    const size = parseSize(video.size);
    if (size) [p.width, p.height] = size;
  }
  if (p.seed === undefined && video.seed !== undefined) p.seed = video.seed;
  return p;
}

function describeParameters(video) {
  const p = parametersOf(video);
  const parts = [video.model];
  if (p.width && p.height) parts.push(`${p.width}×${p.height}`);
  if (p.num_frames && p.fps) parts.push(`${formatNumber((p.num_frames - 1) / p.fps)} s (${p.num_frames} frames, ${p.fps} fps)`);
  else if (video.seconds) parts.push(`${formatNumber(video.seconds)} s`);
  if (p.profile) parts.push(`preset ${p.profile}`);
  if (p.num_inference_steps) parts.push(`${p.num_inference_steps} steps`);
  if (p.guidance_scale !== undefined && p.guidance_scale !== null) {
    const second = p.guidance_scale_2 !== undefined && p.guidance_scale_2 !== null ? ` / ${p.guidance_scale_2}` : "";
    parts.push(`guidance ${p.guidance_scale}${second}`);
  }
  if (p.has_image) parts.push("from an image");
  if (p.seed !== undefined && p.seed !== null) parts.push(`seed ${p.seed}`);
  return parts.filter(Boolean).join(" · ");
}

function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function progressText(card) {
  const video = card.video;
  const event = card.lastEvent;
  const since = event ? (performance.now() - event.at) / 1000 : 0;
  if (video.status === "queued") {
    return video.queue_position ? `Waiting: number ${video.queue_position} in the queue.` : "Waiting in the queue.";
  }
  const parts = [];
  const percent = Math.floor(video.progress || 0);
  if (video.total_steps) parts.push(`Step ${video.step || 0} of ${video.total_steps}`);
  parts.push(`${percent} %`);
  if (event && event.elapsed_s !== undefined && event.elapsed_s !== null && video.status !== "completed") {
    parts.push(`${formatDuration(event.elapsed_s + since)} elapsed`);
  }
  if (event && event.eta_s !== undefined && event.eta_s !== null && video.status === "in_progress") {
    parts.push(`about ${formatDuration(Math.max(0, event.eta_s - since))} left`);
  }
  if (video.status === "completed" && video.started_at && video.completed_at) {
    parts.push(`took ${formatDuration(video.completed_at - video.started_at)}`);
  }
  if (card.reconnecting) parts.push("reconnecting…");
  return parts.join(" · ");
}

function render(card, video) {
  card.video = video;
  const el = card.el;
  const status = video.status;
  el.dataset.status = status;
  const statusEl = el.querySelector(".status");
  statusEl.textContent =
    status === "queued" && video.queue_position ? `Queued · number ${video.queue_position}` : STATUS_TEXT[status] || status;
  const when = el.querySelector(".when");
  if (video.created_at) {
    const date = new Date(video.created_at * 1000);
    when.textContent = date.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
    when.title = date.toISOString();
  }
  el.querySelector(".prompt").textContent = video.prompt || parametersOf(video).prompt || "";
  el.querySelector(".params").textContent = describeParameters(video);

  // The progress bar: while queued or running, and kept at 100 % for a job watched to the end.
  const progress = el.querySelector(".progress");
  const showProgress = ACTIVE_STATUSES.has(status) || (status === "completed" && card.live);
  progress.hidden = !showProgress;
  if (showProgress) {
    const bar = progress.querySelector("progress");
    const value = status === "completed" ? 100 : Math.min(99, Math.floor(video.progress || 0));
    bar.value = value;
    bar.setAttribute("aria-label", `Progress of this video: ${value} %`);
    progress.querySelector(".progress-text").textContent = progressText(card);
  }

  const failure = el.querySelector(".failure");
  failure.hidden = status !== "failed";
  if (status === "failed") {
    const error = video.error || {};
    failure.textContent = `The video could not be made: ${error.message || "no reason was given."}`;
  }

  el.querySelector(".cancel").hidden = !ACTIVE_STATUSES.has(status);
  const download = el.querySelector(".download");
  download.hidden = status !== "completed";
  if (status === "completed") {
    download.href = withKey(`${videoPath(video.id)}/content`);
    download.download = `${video.id}.mp4`;
  }
  renderMedia(card);
}

function renderMedia(card) {
  const video = card.video;
  const media = card.el.querySelector(".media");
  const shown = media.dataset.shows;
  if (video.status === "completed") {
    if (shown === "video") return; // keep the element: replacing it would stop playback
    const player = document.createElement("video");
    player.controls = true;
    player.playsInline = true;
    // Watched live: load it now, it is what the user waits for. History: the poster until played.
    player.preload = card.live ? "metadata" : "none";
    player.poster = withKey(`${videoPath(video.id)}/content?variant=thumbnail`);
    player.src = withKey(`${videoPath(video.id)}/content`);
    player.setAttribute("aria-label", `Video: ${video.prompt || video.id}`);
    player.addEventListener("error", () => {
      const note = document.createElement("p");
      note.className = "hint";
      note.textContent = "This video could not be loaded.";
      media.replaceChildren(note);
      media.dataset.shows = "error";
    });
    media.replaceChildren(player);
    media.dataset.shows = "video";
  } else if (shown !== video.status) {
    // No video yet (or none to come): the page's mark, dimmed; the status line says why.
    const placeholder = document.createElement("div");
    placeholder.className = "placeholder";
    const mark = document.createElement("img");
    mark.src = "/static/favicon.svg";
    mark.alt = "";
    placeholder.append(mark);
    media.replaceChildren(placeholder);
    media.dataset.shows = video.status;
  }
}

// ---------------------------------------------------------------------------------------------
// Progress over Server-Sent Events

function follow(card) {
  if (card.source || FINAL_STATUSES.has(card.video.status)) return;
  clearTimeout(card.retryTimer);
  const source = new EventSource(withKey(`${videoPath(card.video.id)}/events`));
  card.source = source;
  for (const type of EVENT_TYPES) {
    source.addEventListener(type, (event) => onEvent(card, type, event.data));
  }
  // A server that sends unnamed events names the type inside the data instead.
  source.onmessage = (event) => {
    try {
      const data = parseJson(event.data);
      const type = data.event || data.type;
      if (type) onEvent(card, type, event.data);
    } catch {
      // not JSON: nothing to show
    }
  };
  source.onopen = () => {
    card.retryDelay = 1000;
    if (card.reconnecting) {
      card.reconnecting = false;
      render(card, card.video);
    }
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CONNECTING) {
      // The browser reconnects on its own (network blip, a restarted API replica).
      card.reconnecting = true;
      render(card, card.video);
      return;
    }
    // Closed for good (an error status): ask for the job, then open a new stream after a pause.
    source.close();
    card.source = null;
    card.retryTimer = setTimeout(() => refresh(card), card.retryDelay);
    card.retryDelay = Math.min(card.retryDelay * 2, MAX_RETRY_DELAY_MS);
  };
}

function onEvent(card, type, text) {
  if (!EVENT_TYPES.includes(type)) return;
  let data;
  try {
    data = parseJson(text);
  } catch {
    return;
  }
  if (type === "deleted") {
    removeCard(card);
    return;
  }
  card.live = true;
  card.reconnecting = false;
  if (FINAL_STATUSES.has(type)) {
    stopFollowing(card);
    const video = data && data.object === "video" ? data : { ...card.video, status: type };
    render(card, video);
    announce(
      type === "completed" ? "Your video is ready." : type === "failed" ? "A video failed." : "A video was cancelled.",
    );
    return;
  }
  const video = data && data.object === "video" ? { ...data } : { ...card.video, ...data };
  video.status = type === "queued" ? "queued" : "in_progress";
  if (type === "progress") {
    video.queue_position = null;
    card.lastEvent = { elapsed_s: data.elapsed_s, eta_s: data.eta_s, at: performance.now() };
  }
  render(card, video);
}

function stopFollowing(card) {
  clearTimeout(card.retryTimer);
  if (card.source) card.source.close();
  card.source = null;
}

function closeAllStreams() {
  for (const card of state.cards.values()) stopFollowing(card);
}

async function refresh(card) {
  try {
    const video = await api(videoPath(card.video.id));
    render(card, video);
    follow(card);
  } catch (e) {
    if (e.status === 401) return keyRefused(e);
    if (e.status === 404) return removeCard(card);
    card.retryTimer = setTimeout(() => refresh(card), card.retryDelay);
    card.retryDelay = Math.min(card.retryDelay * 2, MAX_RETRY_DELAY_MS);
  }
}

// Elapsed time and ETA move between two step events (a real model's step takes many seconds).
setInterval(() => {
  for (const card of state.cards.values()) {
    if (card.video.status === "in_progress" && card.lastEvent) {
      card.el.querySelector(".progress-text").textContent = progressText(card);
    }
  }
}, 1000);

// ---------------------------------------------------------------------------------------------
// Actions on a video

async function cancelVideo(card) {
  const button = card.el.querySelector(".cancel");
  button.disabled = true;
  try {
    const video = await api(`${videoPath(card.video.id)}/cancel`, { method: "POST" });
    stopFollowing(card);
    render(card, video);
    announce("The video was cancelled.");
  } catch (e) {
    if (e.status === 401) return keyRefused(e);
    if (e.status === 409) await refresh(card); // it finished meanwhile
    else notice(e.message);
  } finally {
    button.disabled = false;
  }
}

function confirmDelete(card, asking) {
  card.el.querySelector(".delete").hidden = asking;
  card.el.querySelector(".confirm").hidden = !asking;
  card.el.querySelector(asking ? ".delete-no" : ".delete").focus();
}

async function deleteVideo(card) {
  try {
    await api(videoPath(card.video.id), { method: "DELETE" });
    removeCard(card);
    announce("The video was deleted.");
    $("videos-title").focus();
  } catch (e) {
    if (e.status === 401) return keyRefused(e);
    if (e.status === 404) removeCard(card);
    else notice(e.message);
  }
}

function removeCard(card) {
  stopFollowing(card);
  card.el.remove();
  state.cards.delete(card.video.id);
  $("videos-empty").hidden = state.cards.size > 0;
}

function reuseSettings(video) {
  const p = parametersOf(video);
  if (state.models.has(video.model)) {
    $("model").value = video.model;
    applyModel();
  }
  const model = currentModel();
  $("prompt").value = video.prompt || p.prompt || "";
  if (p.profile !== undefined) $("profile").value = p.profile || "";
  applyProfile();
  if (p.negative_prompt !== undefined) $("negative_prompt").value = p.negative_prompt;
  for (const name of ["num_inference_steps", "fps", "guidance_scale", "guidance_scale_2"]) {
    if (p[name] !== undefined && p[name] !== null) $(name).value = p[name];
  }
  if (p.width && p.height) {
    const value = `${p.width}x${p.height}`;
    const preset = [...$("size").options].some((o) => o.value === value);
    const isDefault = model.defaultSize && model.defaultSize[0] === p.width && model.defaultSize[1] === p.height;
    $("size").value = preset ? value : isDefault && !p.has_image ? "" : "custom";
    $("custom-size").hidden = $("size").value !== "custom";
    $("width").value = p.width;
    $("height").value = p.height;
  }
  fillDurations(p.num_frames || undefined);
  $("seed").value = p.seed ?? "";
  clearErrors();
  if (p.has_image) showError("image", "The first video started from an image; it is not kept: choose it again.");
  $("make").scrollIntoView({ block: "start" });
  $("prompt").focus({ preventScroll: true });
  announce("The settings of that video are in the form.");
}

// ---------------------------------------------------------------------------------------------
// History

async function loadPage() {
  const more = $("more");
  more.disabled = true;
  try {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), order: "desc" });
    if (state.lastId) query.set("after", state.lastId);
    const page = await api(`/v1/videos?${query}`);
    for (const video of page.data || []) {
      const card = addCard(video);
      if (ACTIVE_STATUSES.has(video.status)) follow(card);
    }
    if (page.last_id) state.lastId = page.last_id;
    more.hidden = !page.has_more;
    $("videos-empty").hidden = state.cards.size > 0;
  } catch (e) {
    if (e.status === 401) return keyRefused(e);
    notice(`Your videos could not be listed: ${e.message}`);
  } finally {
    more.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Page-level messages

function notice(message) {
  const element = $("notice");
  element.textContent = message;
  element.hidden = !message;
}

function announce(message) {
  $("announce").textContent = message;
}

// ---------------------------------------------------------------------------------------------
// Start

async function start(key, models) {
  closeAllStreams();
  state.key = key;
  state.cards.clear();
  state.lastId = null;
  $("videos").replaceChildren();
  notice("");
  try {
    models = models || (await api("/v1/models"));
  } catch (e) {
    if (e.status === 401) return keyRefused(e);
    notice(`The models could not be loaded: ${e.message} Reload the page to try again.`);
    return;
  }
  const list = (models && models.data) || [];
  if (!list.length) {
    notice("This job service has no models configured.");
    return;
  }
  fillModels(list);
  applyModel({ keepPrompt: false });
  $("key-section").hidden = true;
  $("key-status").hidden = false;
  $("key-label").textContent = `Using API key ····${key.slice(-4)}`;
  $("app").hidden = false;
  await loadPage();
}

function bind() {
  $("key-form").addEventListener("submit", saveKey);
  $("key-change").addEventListener("click", () => showKeyForm("", { canCancel: true }));
  $("key-cancel").addEventListener("click", () => {
    $("key-section").hidden = true;
    $("key-error").textContent = "";
  });
  $("video-form").addEventListener("submit", submitVideo);
  $("model").addEventListener("change", () => applyModel());
  $("profile").addEventListener("change", applyProfile);
  $("size").addEventListener("change", onSizeChange);
  $("fps").addEventListener("change", () => fillDurations());
  $("reset-defaults").addEventListener("click", () => {
    setDefaults();
    clearErrors();
  });
  $("more").addEventListener("click", loadPage);
  for (const id of [
    "prompt", "negative_prompt", "width", "height", "num_inference_steps", "fps",
    "guidance_scale", "guidance_scale_2", "seed",
  ]) {
    $(id).addEventListener("blur", validateField);
    $(id).addEventListener("input", validateField);
  }

  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    if (file) setImage(file);
  });
  $("image-clear").addEventListener("click", () => {
    clearImage();
    $("image").focus();
  });
  $("image-preview").addEventListener("error", () => {
    if (state.image) {
      showError("image", `${state.image.file.name} cannot be read as an image.`);
      clearImage();
    }
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) setImage(file);
  });
  // A file dropped outside the drop zone must not make the browser leave the page to show it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

bind();
const savedKey = localStorage.getItem(KEY_STORAGE);
if (savedKey) start(savedKey);
else showKeyForm("");
