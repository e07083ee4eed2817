// The facerecon page: send the photo(s) to the API, show the 3D face, the overlay with landmarks, the pose, and
// offer the mesh and the JSON as downloads. Every API error is shown as its human `message`.
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("upload"), input: $("photos"), refine: $("refine"), status: $("status"), error: $("error"),
  viewerBox: $("viewer"), coloured: $("view-coloured"), shaded: $("view-shaded"), reset: $("view-reset"),
  overlay: $("overlay"), landmarks: $("landmarks"), photosList: $("photos-list"), photosBody: $("photos-body"),
  pitch: $("pitch"), yaw: $("yaw"), roll: $("roll"), meta: $("meta"), downloads: $("downloads"),
};

let viewer = null;
try {
  viewer = new Viewer(ui.viewerBox);
} catch (err) {
  ui.viewerBox.querySelector(".placeholder").textContent = `3D view unavailable: ${err.message || err}`;
}

/** What the current result is made of: the photos (to ask for other formats), the JSON, cached downloads. */
let current = null;
let busy = false;

// -- talking to the API --------------------------------------------------------------------------------------------
class ApiError extends Error {}

async function post(path, files, fields) {
  const form = new FormData();
  const field = path.endsWith("/set") ? "images" : "image";
  for (const file of files) form.append(field, file, file.name);
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  let response;
  try {
    response = await fetch(path, { method: "POST", body: form });
  } catch (err) {
    throw new ApiError(`Could not reach the service (${err.message || err}).`);
  }
  if (!response.ok) throw new ApiError(await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return message;
  } catch {
    // not the API's error shape: fall through
  }
  return `The service answered ${response.status} ${response.statusText || ""}`.trim() + ".";
}

function options() {
  return ui.refine.checked ? { refine: "true" } : {};
}

function base64Bytes(b64) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// -- the page's states ---------------------------------------------------------------------------------------------
function say(text) {
  ui.status.textContent = text;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function setEnabled(enabled) {
  for (const el of [ui.coloured, ui.shaded, ui.reset, ui.landmarks, ...ui.downloads.querySelectorAll("button")]) {
    el.disabled = !enabled;
  }
}

// A face the detector is unsure of (weak box, or landmarks the face mesh doubts) is shown with its reasons.
function showDetection(detection) {
  const warn = $("detection-warning");
  if (!warn) return;
  const reliable = !detection || detection.reliable;
  warn.hidden = reliable;
  warn.textContent = reliable ? "" : `Unreliable detection: ${detection.warnings.join("; ")}. ` +
    "The reconstruction may be wrong.";
}

function showPose(pose) {
  const fmt = (v) => `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(1)}°`;
  ui.pitch.textContent = pose ? fmt(pose.pitch) : "—";
  ui.yaw.textContent = pose ? fmt(pose.yaw) : "—";
  ui.roll.textContent = pose ? fmt(pose.roll) : "—";
}

// The overlay canvas: the overlay PNG at the photo's size, the 68 landmarks drawn over it when asked.
let overlayImage = null;
let overlayLandmarks = null;

async function showOverlay(encoded, landmarks) {
  overlayImage = null;
  overlayLandmarks = landmarks || null;
  if (encoded) {
    const blob = new Blob([base64Bytes(encoded.data)], { type: encoded.media_type });
    overlayImage = await createImageBitmap(blob);
  }
  drawOverlay();
}

function drawOverlay() {
  const canvas = ui.overlay;
  const ctx = canvas.getContext("2d");
  if (!overlayImage) {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    return;
  }
  canvas.width = overlayImage.width;
  canvas.height = overlayImage.height;
  ctx.drawImage(overlayImage, 0, 0);
  if (!ui.landmarks.checked || !overlayLandmarks) return;
  const r = Math.max(1.5, Math.min(canvas.width, canvas.height) / 150);
  ctx.fillStyle = "#ffd400";
  ctx.strokeStyle = "rgba(0, 0, 0, 0.7)";
  ctx.lineWidth = r / 2;
  for (const [x, y] of overlayLandmarks) {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  }
}

// -- one photo or a set ----------------------------------------------------------------------------------------------
async function reconstruct(files) {
  if (busy || !files.length) return;
  busy = true;
  const isSet = files.length > 1;
  showError("");
  setEnabled(false);
  ui.form.setAttribute("aria-busy", "true");
  current = null;
  viewer?.clear();
  ui.viewerBox.dataset.state = "empty";
  ui.photosList.hidden = true;
  showPose(null);
  await showOverlay(null, null);
  ui.meta.textContent = "";
  say(isSet ? `Reconstructing one identity from ${files.length} photos…` : `Reconstructing ${files[0].name}…`);
  try {
    if (isSet) await reconstructSet(files);
    else await reconstructOne(files[0]);
    ui.viewerBox.dataset.state = "ready";
    setEnabled(true);
    say(isSet ? `Done: one identity from ${files.length} photos.` : `Done: ${files[0].name}.`);
  } catch (err) {
    say("");
    showError(err instanceof ApiError ? err.message : `Something went wrong: ${err.message || err}`);
  } finally {
    busy = false;
    ui.form.removeAttribute("aria-busy");
  }
}

async function reconstructOne(file) {
  const fields = { ...options(), format: "json", include: "mesh,overlay", mesh_format: "glb" };
  // The textured mesh is a second request, sent at once; the page shows the JSON's result while it runs.
  const texturedRequest = post("/v1/reconstruct", [file], { ...options(), format: "glb", texture: "photo" })
    .then((r) => r.arrayBuffer());
  texturedRequest.catch(() => {}); // reported below, after the JSON's own errors
  const response = await post("/v1/reconstruct", [file], fields);
  const text = await response.text();
  const result = JSON.parse(text);
  const face = result.faces[0];
  current = { path: "/v1/reconstruct", files: [file], fields: options(), json: text, cache: {} };
  showPose(face.pose_degrees);
  await showOverlay(face.overlay, face.landmarks68);
  ui.meta.textContent = `Mode ${face.mode}, model ${result.face_model}, ${result.face_count} face(s) returned, ` +
    `landmark error ${face.landmark_error_crop_px.toFixed(2)} px (crop).`;
  showDetection(face.detection);
  if (viewer) {
    const geometry = base64Bytes(face.mesh.data).buffer;
    await viewer.setGeometry(geometry);
    try {
      const textured = await texturedRequest;
      current.cache.glb = new Blob([textured], { type: "model/gltf-binary" });
      await viewer.setColoured(textured);
    } catch (err) {
      // No photo texture (e.g. a face model without UVs): colour the mesh with its vertex colours instead.
      ui.meta.textContent += ` No photo texture: ${err.message || err}`;
      await viewer.setColoured(geometry);
    }
  }
}

async function reconstructSet(files) {
  const fields = { ...options(), format: "json", include: "mesh,overlay", mesh_format: "glb" };
  const response = await post("/v1/reconstruct/set", files, fields);
  const text = await response.text();
  const result = JSON.parse(text);
  current = { path: "/v1/reconstruct/set", files, fields: options(), json: text, cache: {} };
  ui.meta.textContent = `Identity from ${result.image_count} photos (${result.aggregation}, mode ${result.mode}), ` +
    `model ${result.face_model}.`;
  ui.photosBody.replaceChildren(...result.items.map((item) => photoRow(item, files[item.index])));
  ui.photosList.hidden = false;
  await selectItem(result.items[0]);
  if (viewer && result.identity_mesh) {
    await viewer.setGeometry(base64Bytes(result.identity_mesh.data).buffer, { alsoColoured: true });
  }
}

function photoRow(item, file) {
  const row = document.createElement("tr");
  row.dataset.index = item.index;
  const name = document.createElement("td");
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = `${item.index + 1}. ${file ? file.name : "photo"}`;
  button.title = "Show this photo's overlay and pose";
  button.addEventListener("click", () => selectItem(item));
  name.append(button);
  row.append(name);
  for (const key of ["pitch", "yaw", "roll"]) {
    const cell = document.createElement("td");
    cell.textContent = `${item.pose_degrees[key].toFixed(1)}°`;
    row.append(cell);
  }
  row._item = item;
  return row;
}

async function selectItem(item) {
  for (const row of ui.photosBody.children) row.setAttribute("aria-selected", String(row._item === item));
  showPose(item.pose_degrees);
  showDetection(item.detection);
  await showOverlay(item.overlay, item.landmarks68);
}

// -- downloads -------------------------------------------------------------------------------------------------------
const MEDIA = { obj: "model/obj", glb: "model/gltf-binary", ply: "application/ply", json: "application/json" };

async function download(format) {
  if (!current) return;
  const { path, files, fields, cache } = current;
  try {
    if (!cache[format]) {
      if (format === "json") {
        cache.json = new Blob([current.json], { type: MEDIA.json });
      } else {
        say(`Preparing the ${format.toUpperCase()} file…`);
        const response = await post(path, files, { ...fields, format });
        cache[format] = new Blob([await response.arrayBuffer()], { type: MEDIA[format] });
      }
    }
    const stem = files.length > 1 ? "identity" : files[0].name.replace(/\.[^.]*$/, "") || "face";
    const url = URL.createObjectURL(cache[format]);
    const link = document.createElement("a");
    link.href = url;
    link.download = `${stem}.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    say(`Downloaded ${link.download}.`);
  } catch (err) {
    showError(err instanceof ApiError ? err.message : `Download failed: ${err.message || err}`);
  }
}

// -- wiring ----------------------------------------------------------------------------------------------------------
function setMode(mode) {
  ui.coloured.setAttribute("aria-pressed", String(mode === "coloured"));
  ui.shaded.setAttribute("aria-pressed", String(mode === "shaded"));
  viewer?.show(mode);
}

ui.input.addEventListener("change", () => reconstruct([...ui.input.files]));
ui.coloured.addEventListener("click", () => setMode("coloured"));
ui.shaded.addEventListener("click", () => setMode("shaded"));
ui.reset.addEventListener("click", () => viewer?.reset());
ui.landmarks.addEventListener("change", drawOverlay);
ui.downloads.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-format]");
  if (button) download(button.dataset.format);
});
ui.form.addEventListener("submit", (event) => event.preventDefault());
for (const type of ["dragenter", "dragover"]) {
  ui.form.addEventListener(type, (event) => {
    event.preventDefault();
    ui.form.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  ui.form.addEventListener(type, () => ui.form.classList.remove("dragging"));
}
ui.form.addEventListener("drop", (event) => {
  event.preventDefault();
  reconstruct([...event.dataTransfer.files]);
});
document.body.dataset.ready = "true";
