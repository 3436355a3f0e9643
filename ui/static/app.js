// The page's behaviour.  Every text from the servers or the user goes into the page with
// textContent, never as HTML.
"use strict";

const state = {
  limits: null,   // from /api/info
  imageKey: null, // the server's key of the current image, once it answered for it
  answers: 0,     // submissions answered (results or errors)
};

const $ = (id) => document.getElementById(id);
const COLOUR = /^#[0-9a-f]{6}$/;

document.addEventListener("DOMContentLoaded", () => {
  $("segment-form").addEventListener("submit", onSubmit);
  $("sample").addEventListener("change", onSampleChosen);
  $("image").addEventListener("change", onFileChosen);
  $("preview").addEventListener("error", () => { $("preview").hidden = true; });  // not an image the browser shows
  for (const radio of document.querySelectorAll("input[name=protocol]")) {
    radio.addEventListener("change", () => loadModel(selectedProtocol()));
  }
  loadInfo();
});

async function loadInfo() {
  const answer = await callApi("/api/info");
  if (answer.error) {
    showError(answer.error);
    return;
  }
  state.limits = answer;
  const select = $("sample");
  for (const name of answer.samples) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.appendChild(option);
  }
  if (answer.samples.length > 0) {
    select.value = answer.samples[0];
    onSampleChosen();
  }
  for (const protocol of ["grpc", "http"]) {
    $("protocol-" + protocol).disabled = !answer.protocols.includes(protocol);
  }
  $("protocol-" + answer.default_protocol).checked = true;
  $("image-limits").textContent =
    `at most ${formatBytes(answer.max_image_bytes)} and ${(answer.max_image_pixels / 1e6).toFixed(0)} megapixels; ` +
    `at most ${answer.max_prompts} prompts`;
  loadModel(answer.default_protocol);
}

async function loadModel(protocol) {
  const answer = await callApi("/api/model?protocol=" + encodeURIComponent(protocol));
  showModel(answer.error ? null : answer);
  $("model-error").hidden = !answer.error;
  $("model-error").textContent = answer.error ? answer.error : "";
}

function showModel(model) {
  const fields = { name: "model", checkpoint: "checkpoint", sha256: "checkpoint_sha256", family: "family", recipe: "recipe" };
  for (const [id, key] of Object.entries(fields)) {
    $("model-" + id).textContent = model ? String(model[key]) : "—";
  }
}

function onSampleChosen() {
  if ($("sample").value) {
    $("image").value = "";
    showPreview("/samples/" + encodeURIComponent($("sample").value));
  }
  imageChanged();
}

function onFileChosen() {
  const file = $("image").files[0];
  if (file) {
    $("sample").value = "";
    showPreview(URL.createObjectURL(file));
  }
  imageChanged();
}

function imageChanged() {
  state.imageKey = null;
  $("reuse-key").checked = false;
  $("reuse-key").disabled = true;
  $("result").hidden = true;
  hideError();
}

function showPreview(url) {
  $("preview").src = url;
  $("preview").hidden = false;
}

async function onSubmit(event) {
  event.preventDefault();
  hideError();
  setBusy(true);
  const started = performance.now();
  const form = formData();
  const answer = form.error ? form : await callApi("/api/segment", { method: "POST", body: form });
  if (answer.error) {
    $("result").hidden = true;
    showError(answer.error);
  } else {
    showResult(answer, performance.now() - started);
  }
  setBusy(false);
  state.answers += 1;
  document.body.dataset.answers = String(state.answers);  // what automated checks wait for
}

// The form to send, or {error} when it cannot be sent.
function formData() {
  const form = new FormData();
  const file = $("image").files[0];
  if (file) {
    if (state.limits && file.size > state.limits.max_image_bytes) {
      return { error: `the image is ${file.size} bytes; the limit is ${state.limits.max_image_bytes} bytes` };
    }
    form.append("image", file, file.name);
  } else if ($("sample").value) {
    form.append("sample", $("sample").value);
  } else {
    return { error: "choose an image: upload one or pick a sample" };
  }
  form.append("prompts", $("prompts").value);
  form.append("protocol", selectedProtocol());
  if ($("reuse-key").checked && state.imageKey) {
    form.append("image_key", state.imageKey);
  }
  return form;
}

function showResult(answer, roundTripMs) {
  $("latency").textContent =
    `Triton request ${answer.latency_ms.toFixed(1)} ms (page round trip ${roundTripMs.toFixed(0)} ms)`;
  $("cache-state").textContent = cacheState(answer.cache_hit, answer.sent_image_key);
  $("cache-state").dataset.hit = String(answer.cache_hit);
  $("result-protocol").textContent = answer.protocol === "grpc" ? "gRPC" : "HTTP";
  $("image-key").textContent = answer.image_key ? answer.image_key : "none (no many-prompts model)";
  const rows = $("legend").querySelector("tbody");
  rows.replaceChildren();
  answer.masks.forEach((mask, index) => {
    const row = document.createElement("tr");
    row.dataset.index = String(index);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    if (COLOUR.test(mask.colour)) {
      swatch.style.backgroundColor = mask.colour;
      swatch.dataset.colour = mask.colour;
    }
    row.appendChild(cell(swatch));
    row.appendChild(cell(document.createTextNode(mask.prompt), "prompt"));
    row.appendChild(cell(document.createTextNode(mask.score.toFixed(3)), "score"));
    row.appendChild(cell(document.createTextNode((100 * mask.area_fraction).toFixed(1) + " %"), "area"));
    rows.appendChild(row);
  });
  $("overlay").src = "data:image/png;base64," + answer.overlay_png;
  $("overlay").dataset.protocol = answer.protocol;
  $("preview").hidden = true;
  $("result").hidden = false;
  if (answer.image_key) {
    state.imageKey = answer.image_key;
    $("reuse-key").disabled = false;
  }
}

function cacheState(hit, sentKey) {
  if (hit === null || hit === undefined) {
    return "not reported (no many-prompts model)";
  }
  if (hit) {
    return sentKey ? "cache hit (sent its key only)" : "cache hit";
  }
  return "cache miss (encoded now)";
}

function cell(child, className) {
  const td = document.createElement("td");
  if (className) {
    td.className = className;
  }
  td.appendChild(child);
  return td;
}

// fetch -> the JSON answer, or {error: one line} for any failure (never a stack trace).
async function callApi(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (failure) {
    return { error: "cannot reach the page's server (is `make ui` still running?)" };
  }
  let body = null;
  try {
    body = await response.json();
  } catch (failure) {
    body = null;
  }
  if (!response.ok || body === null) {
    const message = body && typeof body.error === "string" ? body.error : `the page's server answered HTTP ${response.status}`;
    return { error: message };
  }
  return body;
}

function selectedProtocol() {
  const checked = document.querySelector("input[name=protocol]:checked");
  return checked ? checked.value : "grpc";
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("busy").hidden = !busy;
  document.body.dataset.busy = String(busy);
}

function showError(message) {
  $("error-message").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error-message").textContent = "";
}

function formatBytes(bytes) {
  return bytes % (1024 * 1024) === 0 ? `${bytes / (1024 * 1024)} MiB` : `${bytes} bytes`;
}
