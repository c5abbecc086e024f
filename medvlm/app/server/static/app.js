// medvlm web UI: upload an image, ask a question or link a report, and draw the returned regions
// (box, points, mask outline) over the image. Plain JS, no build step, no external URLs.
// Region coordinates are pixels of the ORIGINAL image (x = column); the overlay canvas maps them to the
// displayed size. Masks arrive as uncompressed row-major RLE (first count = zeros).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#ff4d4d", "#3ddc84", "#4da6ff", "#ffc233", "#d37bff", "#33e0d0", "#ff8c42", "#f06ebf"];
const BROWSER_IMAGE = /\.(png|jpe?g|gif|webp|bmp)$/i;

const state = {
  file: null,        // the File chosen
  isDicom: false,    // DICOM upload: the browser cannot show it, the server renders image.png
  objectUrl: null,   // blob URL of a browser-displayable upload
  reply: null,       // the last API reply
  regions: [],       // [{...region, color, paths: {fill, edge}, sentences: [index]}]
  sentences: [],     // report sentences (link-report replies only)
  size: null,        // {width, height} of the original image
  highlight: null,   // {kind: "region"|"sentence", id} hovered or pinned
  pinned: null,
  drag: null,        // box being dragged on the overlay, original pixels
};

// ---------------------------------------------------------------- errors and status

function showError(err) {
  const e = (err && err.error) || err || {};
  $("error-type").textContent = e.type || "Error";
  $("error-message").textContent = e.message || String(err);
  $("error-expected").textContent = e.expected ? "Expected: " + e.expected : "";
  $("error-fix").textContent = e.fix ? "Fix: " + e.fix : "";
  $("error-banner").hidden = false;
  $("overlay").dataset.state = "error";
  setStatus("The request failed; see the message above.");
}

function clearError() {
  $("error-banner").hidden = true;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  for (const id of ["ask-button", "link-button", "image-input"]) $(id).disabled = busy;
  if (busy) $("overlay").dataset.state = "busy";
}

// ---------------------------------------------------------------- API key

// kept for this tab only (sessionStorage), sent as "Authorization: Bearer <key>" like an OpenAI client's key
const KEY_STORE = "medvlm-api-key";

function apiKey() {
  const field = $("api-key-input");
  return field ? field.value.trim() : "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function explain401(err) {
  const e = Object.assign({}, (err && err.error) || err || {});
  e.fix = apiKey() ? "The API key in the field above is not the server's: check it (MEDVLM_API_KEY of `medvlm serve`)."
                   : "This server needs an API key: enter it in the 'API key' field above.";
  return e;
}

// a result file (an <img> or a download) from a server that needs the key: fetched with the header, as a blob URL
async function authorizedBlobUrl(url) {
  const resp = await fetch(url, { headers: authHeaders() });
  if (!resp.ok) {
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    const err = body && body.error ? body : { type: "http_" + resp.status, message: resp.statusText || "Request failed" };
    throw resp.status === 401 ? explain401(err) : err;
  }
  return URL.createObjectURL(await resp.blob());
}

async function downloadWithKey(event) {
  const a = event.currentTarget;
  if (!apiKey() || !a.getAttribute("href")) return;  // no key: the plain link works
  event.preventDefault();
  try {
    const url = await authorizedBlobUrl(a.href);
    const tmp = document.createElement("a");
    tmp.href = url;
    tmp.download = decodeURIComponent(a.href.split("/").pop() || "download");
    document.body.appendChild(tmp);
    tmp.click();
    tmp.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    showError(err);
  }
}

// ---------------------------------------------------------------- image upload

async function isDicomFile(file) {
  if (/\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom") return true;
  const magic = await file.slice(128, 132).text();
  return magic === "DICM";
}

async function onFileChosen() {
  const file = $("image-input").files[0];
  clearError();
  resetResults();
  if (!file) return;
  state.file = file;
  state.isDicom = await isDicomFile(file);
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = null;
  const img = $("image-view");
  img.dataset.failed = "0";
  delete img.dataset.source;
  if (!state.isDicom && (BROWSER_IMAGE.test(file.name) || file.type.startsWith("image/"))) {
    state.objectUrl = URL.createObjectURL(file);
    img.src = state.objectUrl;
    img.hidden = false;
    setStatus("Ask a question, paste a report, or drag a box on the image.");
  } else {
    img.removeAttribute("src");
    img.hidden = true;
    setStatus(file.name + ": the browser cannot show this file; the server's rendering appears after the first request.");
  }
}

// The browser cannot decode DICOM (or a file it failed to show): show the server's 8-bit rendering of the
// result, GET /v1/results/{id}/image.png (or the reply's downloads.image).
function previewFromReply(reply) {
  const img = $("image-view");
  if (!(state.isDicom || !state.objectUrl || img.dataset.failed === "1") || !reply.result_id) return;
  const src = (reply.downloads && reply.downloads.image) || resultUrl(reply.result_id, "/image.png");
  img.hidden = false;
  if (!apiKey()) {
    if (img.getAttribute("src") !== src) img.src = src;
    return;
  }
  if (img.dataset.source === src) return;
  img.dataset.source = src;
  authorizedBlobUrl(src).then((url) => { img.src = url; }).catch(showError);
}

// ---------------------------------------------------------------- requests

function resultUrl(id, suffix) {
  return "v1/results/" + encodeURIComponent(id) + suffix;
}

async function post(path, fields) {
  if (!state.file) {
    showError({ type: "no_image", message: "Choose an image first.", fix: "Use the Image field above." });
    return null;
  }
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  clearError();
  setBusy(true);
  setStatus("Working…");
  try {
    const resp = await fetch(path, { method: "POST", body: form, headers: authHeaders() });
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    if (!resp.ok) {
      const err = body && body.error ? body : { type: "http_" + resp.status, message: detailText(body) || resp.statusText || "Request failed" };
      showError(resp.status === 401 ? explain401(err) : err);
      return null;
    }
    return body;
  } catch (err) {
    showError({ type: "network", message: "Could not reach the server: " + err.message,
                fix: "Check that `medvlm serve` is running." });
    return null;
  } finally {
    setBusy(false);
  }
}

// a reply that is not in the API's error format (e.g. a proxy's, or a framework's {"detail": ...})
function detailText(body) {
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) return d.map((e) => (e.loc ? e.loc.join(".") + ": " : "") + (e.msg || JSON.stringify(e))).join("; ");
  return "";
}

async function ask(event) {
  event.preventDefault();
  const text = $("question-input").value.trim();
  if (!text) return showError({ type: "no_text", message: "Type a question or a phrase.", expected: "e.g. where is the heart?" });
  const reply = await post("v1/ground", { text });
  if (reply) showReply(reply, "ground");
}

async function linkReport(event) {
  event.preventDefault();
  const report = $("report-input").value.trim();
  if (!report) return showError({ type: "no_report", message: "Paste a report first." });
  const reply = await post("v1/link-report", { report });
  if (reply) showReply(reply, "report");
}

async function segmentBox(box) {
  const reply = await post("v1/segment", { box: JSON.stringify(box.map((v) => Math.round(v))) });
  if (reply) showReply(reply, "segment");
}

// ---------------------------------------------------------------- replies

function resetResults() {
  state.reply = null;
  state.regions = [];
  state.sentences = [];
  state.size = null;
  state.highlight = state.pinned = null;
  $("region-list").replaceChildren();
  $("sentence-list").replaceChildren();
  $("sentences-heading").hidden = true;
  $("answer").textContent = "";
  setDownloads(null);
  $("overlay").dataset.state = "idle";
  $("overlay").dataset.regionCount = "0";
  draw();
}

function showReply(reply, kind) {
  resetResults();
  state.reply = reply;
  state.sentences = kind === "report" ? reply.sentences || [] : [];
  const regions = reply.regions || [];
  state.size = imageSize(reply, regions);
  const byRegion = new Map();
  // sentences are numbered 1, 2, ... in report order (r.sentences holds those numbers)
  state.sentences.forEach((s, pos) => (s.region_ids || []).forEach((id) => {
    if (!byRegion.has(id)) byRegion.set(id, []);
    byRegion.get(id).push(pos + 1);
  }));
  state.regions = regions.map((r, i) => {
    const sentences = byRegion.get(r.id) || [];
    const colorKey = sentences.length ? sentences[0] - 1 : i;
    return { ...r, sentences, color: COLORS[colorKey % COLORS.length], paths: maskPaths(r.mask) };
  });
  previewFromReply(reply);
  const answer = reply.answer || (kind === "segment" ? "Segmented the box." : "");
  $("answer").textContent = answer + (reply.note ? " (" + reply.note + ")" : "");
  renderSentenceList();
  renderRegionList();
  setDownloads(reply.result_id);
  const overlay = $("overlay");
  overlay.dataset.regionCount = String(state.regions.length);
  overlay.dataset.boxes = JSON.stringify(state.regions.map((r) => r.box));
  overlay.dataset.state = "done";
  setStatus(state.regions.length + " region(s)" + (state.sentences.length ? ", " + state.sentences.length + " sentence(s)" : "") + ".");
  draw();
}

function imageSize(reply, regions) {
  if (reply.image && reply.image.width && reply.image.height) return { width: reply.image.width, height: reply.image.height };
  const withMask = regions.find((r) => r.mask && r.mask.size);
  if (withMask) return { width: withMask.mask.size[1], height: withMask.mask.size[0] };
  const img = $("image-view");
  return img.naturalWidth ? { width: img.naturalWidth, height: img.naturalHeight } : null;
}

function setDownloads(id) {
  const links = { "download-json": ".json", "download-png": "/masks.png", "download-zip": "/masks.zip",
                  "download-nii": "/masks.nii.gz", "download-dcm": "/masks.dcm" };
  const given = (state.reply && state.reply.downloads) || {};
  for (const [elId, suffix] of Object.entries(links)) {
    const a = $(elId);
    const key = elId.slice("download-".length);
    const href = id ? given[key] || resultUrl(id, suffix) : null;
    if (href) {
      a.href = href;
      a.setAttribute("download", "");
      a.removeAttribute("aria-disabled");
    } else {
      a.removeAttribute("href");
      a.setAttribute("aria-disabled", "true");
    }
  }
  // DICOM SEG exists only for a DICOM input: the server lists it in `downloads` when it can make it
  $("download-dcm").hidden = !(id && (state.reply.downloads ? given.dcm : state.isDicom));
}

// ---------------------------------------------------------------- side lists

function regionNumber(r) {
  return r.sentences.length ? r.sentences.join(",") : String(r.id);
}

function renderSentenceList() {
  const list = $("sentence-list");
  $("sentences-heading").hidden = state.sentences.length === 0;
  state.sentences.forEach((s, pos) => {
    const n = pos + 1;
    const li = document.createElement("li");
    li.id = "sentence-" + n;
    li.className = "item status-" + s.status;
    li.dataset.number = String(n);
    li.dataset.status = s.status;
    const box = checkbox("sentence-toggle-" + n, "Show the regions of sentence " + n);
    const num = badge(String(n), COLORS[pos % COLORS.length]);
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = s.text;
    const status = document.createElement("span");
    status.className = "tag";
    status.textContent = s.status.replace(/_/g, " ") + ((s.region_ids || []).length ? " · " + s.region_ids.length + " region(s)" : "");
    li.append(box, num, text, status);
    hookHighlight(li, "sentence", n);
    list.append(li);
  });
}

function renderRegionList() {
  const list = $("region-list");
  for (const r of state.regions) {
    const li = document.createElement("li");
    li.id = "region-" + r.id;
    li.className = "item";
    li.dataset.regionId = String(r.id);
    li.dataset.box = JSON.stringify(r.box);
    const box = checkbox("region-toggle-" + r.id, "Show region " + r.id + " (" + r.label + ")");
    const text = document.createElement("span");
    text.className = "text";
    const score = typeof r.score === "number" ? " · score " + r.score.toFixed(2) : "";
    const b = (r.box || []).map((v) => Math.round(v)).join(", ");
    text.textContent = r.label + score + (b ? " · box [" + b + "]" : "");
    li.append(box, badge(regionNumber(r), r.color), text);
    const flags = checkNotes(r.checks);
    if (flags) {
      const note = document.createElement("span");
      note.className = "tag";
      note.textContent = flags;
      li.append(note);
    }
    hookHighlight(li, "region", r.id);
    list.append(li);
  }
}

// the anatomy check's verdicts: {"zone": {"ok": false, ...}, "laterality": {...}, "action": "repair"}
function checkNotes(checks) {
  if (!checks || typeof checks !== "object") return "";
  const notes = Object.entries(checks).filter(([, v]) => v && v.ok === false).map(([k]) => k + " check failed");
  if (typeof checks.action === "string" && checks.action !== "none") notes.push("anatomy check: " + checks.action);
  return notes.join("; ");
}

function checkbox(id, label) {
  const input = document.createElement("input");
  input.type = "checkbox";
  input.id = id;
  input.checked = true;
  input.setAttribute("aria-label", label);
  input.addEventListener("change", draw);
  input.addEventListener("click", (e) => e.stopPropagation());
  return input;
}

function badge(text, color) {
  const span = document.createElement("span");
  span.className = "num";
  span.textContent = text;
  span.style.background = color;
  return span;
}

function hookHighlight(li, kind, id) {
  li.addEventListener("mouseenter", () => { state.highlight = { kind, id }; draw(); });
  li.addEventListener("mouseleave", () => { state.highlight = null; draw(); });
  li.addEventListener("click", () => {
    const same = state.pinned && state.pinned.kind === kind && state.pinned.id === id;
    state.pinned = same ? null : { kind, id };
    document.querySelectorAll(".results .item").forEach((el) => el.classList.remove("pinned"));
    if (!same) li.classList.add("pinned");
    draw();
  });
}

// ---------------------------------------------------------------- masks

// Uncompressed row-major RLE -> Path2D objects in original pixels: a fill (one rect per run of ones, split
// at row ends) and the outline (pixel edges between inside and outside).
function maskPaths(mask) {
  if (!mask || !mask.size || !mask.counts) return null;
  const [h, w] = mask.size;
  const bits = new Uint8Array(h * w);
  let pos = 0, val = 0;
  for (const c of mask.counts) {
    if (val) bits.fill(1, pos, Math.min(pos + c, bits.length));
    pos += c;
    val ^= 1;
  }
  const fill = new Path2D(), edge = new Path2D();
  for (let y = 0; y < h; y++) {
    const row = y * w, prev = row - w;
    let runStart = -1, hStart = -1;
    for (let x = 0; x <= w; x++) {
      const on = x < w && bits[row + x] === 1;
      if (on && runStart < 0) runStart = x;
      if (!on && runStart >= 0) {
        fill.rect(runStart, y, x - runStart, 1);
        edge.moveTo(runStart, y); edge.lineTo(runStart, y + 1);   // left edge of the run
        edge.moveTo(x, y); edge.lineTo(x, y + 1);                 // right edge
        runStart = -1;
      }
      // horizontal edge on line y where this row and the one above differ
      const above = x < w && y > 0 && bits[prev + x] === 1;
      const diff = x < w && on !== above;
      if (diff && hStart < 0) hStart = x;
      if (!diff && hStart >= 0) { edge.moveTo(hStart, y); edge.lineTo(x, y); hStart = -1; }
    }
  }
  // bottom edge of the last row
  let b = -1;
  for (let x = 0; x <= w; x++) {
    const on = x < w && h > 0 && bits[(h - 1) * w + x] === 1;
    if (on && b < 0) b = x;
    if (!on && b >= 0) { edge.moveTo(b, h); edge.lineTo(x, h); b = -1; }
  }
  return { fill, edge };
}

// ---------------------------------------------------------------- drawing

function layer(id) {
  return $(id).checked;
}

function regionVisible(r) {
  const own = $("region-toggle-" + r.id);
  if (own && !own.checked) return false;
  if (!r.sentences.length) return true;
  return r.sentences.some((i) => { const t = $("sentence-toggle-" + i); return !t || t.checked; });
}

function isHighlighted(r) {
  const h = state.highlight || state.pinned;
  if (!h) return null;
  return h.kind === "region" ? r.id === h.id : r.sentences.includes(h.id);
}

function draw() {
  const canvas = $("overlay");
  const img = $("image-view");
  const w = img.hidden ? 0 : img.clientWidth, h = img.hidden ? 0 : img.clientHeight;
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = w + "px";
  canvas.style.height = h + "px";
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const size = state.size || (img.naturalWidth ? { width: img.naturalWidth, height: img.naturalHeight } : null);
  if (!w || !size) return;
  const sx = (w * dpr) / size.width, sy = (h * dpr) / size.height;
  const px = dpr / Math.min(sx, sy);   // one CSS pixel, in original pixels
  const toScreen = () => ctx.setTransform(sx, 0, 0, sy, 0, 0);
  for (const r of state.regions) {
    if (!regionVisible(r)) continue;
    const hi = isHighlighted(r);
    ctx.globalAlpha = hi === false ? 0.25 : 1;
    const lw = (hi ? 3.5 : 2) * px;
    toScreen();
    if (layer("layer-masks") && r.paths) {
      ctx.fillStyle = r.color + (hi ? "66" : "38");
      ctx.fill(r.paths.fill);
      ctx.strokeStyle = r.color;
      ctx.lineWidth = lw;
      ctx.stroke(r.paths.edge);
    }
    if (layer("layer-boxes") && r.box) {
      const [x0, y0, x1, y1] = r.box;
      ctx.setLineDash([6 * px, 4 * px]);
      ctx.strokeStyle = r.color;
      ctx.lineWidth = lw;
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.setLineDash([]);
    }
    if (layer("layer-points")) {
      for (const p of r.points || []) {
        ctx.beginPath();
        ctx.arc(p.x, p.y, 5 * px, 0, 2 * Math.PI);
        ctx.fillStyle = p.label === 0 || p.label === "negative" ? "#ff3030" : "#30ff60";
        ctx.fill();
        ctx.lineWidth = 1.5 * px;
        ctx.strokeStyle = "#000";
        ctx.stroke();
      }
    }
    if (layer("layer-labels")) drawNumber(ctx, r, dpr, sx, sy);
  }
  ctx.globalAlpha = 1;
  if (state.drag) {
    toScreen();
    const [x0, y0, x1, y1] = normBox(state.drag);
    ctx.setLineDash([4 * px, 3 * px]);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1.5 * px;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.setLineDash([]);
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
}

function drawNumber(ctx, r, dpr, sx, sy) {
  const anchor = r.box || (r.points && r.points[0] && [r.points[0].x, r.points[0].y]);
  if (!anchor) return;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  const text = regionNumber(r);
  ctx.font = `bold ${13 * dpr}px system-ui, sans-serif`;
  const tw = ctx.measureText(text).width + 8 * dpr, th = 18 * dpr;
  const x = Math.max(0, anchor[0] * sx), y = Math.max(0, anchor[1] * sy - th);
  ctx.fillStyle = r.color;
  ctx.fillRect(x, y, tw, th);
  ctx.fillStyle = "#000";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x + 4 * dpr, y + th / 2);
}

// ---------------------------------------------------------------- drag a box to segment

function toOriginal(event) {
  const canvas = $("overlay");
  const rect = canvas.getBoundingClientRect();
  const size = state.size || { width: $("image-view").naturalWidth, height: $("image-view").naturalHeight };
  return [(event.clientX - rect.left) * size.width / rect.width, (event.clientY - rect.top) * size.height / rect.height];
}

function normBox(d) {
  return [Math.min(d[0], d[2]), Math.min(d[1], d[3]), Math.max(d[0], d[2]), Math.max(d[1], d[3])];
}

function hookDrag() {
  const canvas = $("overlay");
  canvas.addEventListener("pointerdown", (e) => {
    if (!state.file || $("image-view").hidden) return;
    const [x, y] = toOriginal(e);
    state.drag = [x, y, x, y];
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!state.drag) return;
    [state.drag[2], state.drag[3]] = toOriginal(e);
    draw();
  });
  canvas.addEventListener("pointerup", () => {
    if (!state.drag) return;
    const box = normBox(state.drag);
    state.drag = null;
    draw();
    const rect = canvas.getBoundingClientRect();
    const minSide = 6 * (state.size ? state.size.width / rect.width : 1);
    if (box[2] - box[0] >= minSide && box[3] - box[1] >= minSide) segmentBox(box);
  });
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("image-input").addEventListener("change", onFileChosen);
  $("ask-form").addEventListener("submit", ask);
  $("report-form").addEventListener("submit", linkReport);
  $("error-close").addEventListener("click", clearError);
  for (const id of ["layer-boxes", "layer-masks", "layer-points", "layer-labels"]) $(id).addEventListener("change", draw);
  const img = $("image-view");
  img.addEventListener("load", () => { img.dataset.failed = "0"; draw(); });
  img.addEventListener("error", () => {
    if (!img.getAttribute("src")) return;
    img.dataset.failed = "1";
    img.hidden = true;
    setStatus("The browser cannot show this image; the server's rendering appears after the first request.");
  });
  window.addEventListener("resize", draw);
  hookDrag();
  const keyField = $("api-key-input");
  try { keyField.value = sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { /* storage disabled */ }
  keyField.addEventListener("change", () => {
    try { sessionStorage.setItem(KEY_STORE, apiKey()); } catch (_) { /* storage disabled */ }
  });
  for (const id of ["download-json", "download-png", "download-zip", "download-nii", "download-dcm"]) {
    $(id).addEventListener("click", downloadWithKey);
  }
});
