// The facerecon page: send the photo(s) to the API, show the 3D face, the overlay with landmarks, the pose, and
// offer the mesh and the JSON as downloads. Every API error is shown as its human `message`.
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("upload"), input: $("photos"), refine: $("refine"), status: $("status"), error: $("error"),
  viewerBox: $("viewer"), coloured: $("view-coloured"), shaded: $("view-shaded"), reset: $("view-reset"),
  overlay: $("overlay"), landmarks: $("landmarks"), photosList: $("photos-list"), photosBody: $("photos-body"),
  pitch: $("pitch"), yaw: $("yaw"), roll: $("roll"), meta: $("meta"), downloads: $("downloads"),
  facesList: $("faces-list"), facesBody: $("faces-body"),
};

let viewer = null;
try {
  viewer = new Viewer(ui.viewerBox);
} catch (err) {
  ui.viewerBox.querySelector(".placeholder").textContent = `3D view unavailable: ${err.message || err}`;
}

/** The current result: the photos, the JSON, its faces (a group photo has several), the one shown, downloads. */
let current = null;
/** Each reconstruction has a number; choosing another photo aborts the one running and supersedes it. */
let run = 0;
let controller = null;

// -- talking to the API --------------------------------------------------------------------------------------------
class ApiError extends Error {}
/** A reconstruction another photo replaced: dropped without a word. */
class Superseded extends Error {}

async function post(path, files, fields, signal) {
  const form = new FormData();
  const field = path.endsWith("/set") ? "images" : "image";
  for (const file of files) form.append(field, file, file.name);
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  let response;
  try {
    response = await fetch(path, { method: "POST", body: form, signal });
  } catch (err) {
    if (signal?.aborted) throw new Superseded();
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

// Always sent, so that unchecking it turns fitting off (an absent field would leave the service's default).
function options() {
  return { refine: ui.refine.checked ? "true" : "false" };
}

// The checkbox starts as the service's default mode; without an R-Net fitting is the only mode.
async function loadDefaults() {
  try {
    const info = await (await fetch("/v1/models")).json();
    ui.refine.checked = info.default_mode.includes("fit");
    ui.refine.disabled = info.default_mode === "fit";
    if (ui.refine.disabled) ui.refine.parentElement.title = "No R-Net installed: fitting is always on.";
  } catch {
    // not ready yet: keep the page's default
  }
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
  if (!files.length) return;
  controller?.abort(); // a photo chosen while another runs replaces it
  const mine = ++run;
  controller = new AbortController();
  const { signal } = controller;
  const live = () => {
    if (mine !== run) throw new Superseded();
  };
  const isSet = files.length > 1;
  showError("");
  setEnabled(false);
  ui.form.setAttribute("aria-busy", "true");
  current = null;
  viewer?.clear();
  ui.viewerBox.dataset.state = "empty";
  ui.photosList.hidden = true;
  ui.facesList.hidden = true;
  showPose(null);
  await showOverlay(null, null);
  ui.meta.textContent = "";
  say(isSet ? `Reconstructing one identity from ${files.length} photos…` : `Reconstructing ${files[0].name}…`);
  try {
    if (isSet) await reconstructSet(files, signal, live);
    else await reconstructOne(files[0], signal, live);
    live();
    ui.viewerBox.dataset.state = "ready";
    setEnabled(true);
    say(isSet ? `Done: one identity from ${files.length} photos.` : `Done: ${files[0].name}.`);
  } catch (err) {
    if (err instanceof Superseded || mine !== run) return;
    say("");
    showError(err instanceof ApiError ? err.message : `Something went wrong: ${err.message || err}`);
  } finally {
    if (mine === run) {
      controller = null;
      ui.form.removeAttribute("aria-busy");
    }
  }
}

async function reconstructOne(file, signal, live) {
  const fields = { ...options(), format: "json", faces: "all", include: "mesh,overlay", mesh_format: "glb" };
  // The textured mesh (of the largest face) is a second request, sent at once; the JSON's result shows meanwhile.
  const texturedRequest = post("/v1/reconstruct", [file], { ...options(), format: "glb", texture: "photo" }, signal)
    .then((r) => r.arrayBuffer());
  texturedRequest.catch(() => {}); // reported below, after the JSON's own errors
  const response = await post("/v1/reconstruct", [file], fields, signal);
  const text = await response.text();
  live();
  const result = JSON.parse(text);
  current = { files: [file], json: text, result, faces: result.faces, face: 0, textured: null };
  ui.facesBody.replaceChildren(...result.faces.map((face, k) => faceButton(face, k)));
  ui.facesList.hidden = result.faces.length < 2;
  await selectFace(0, live);
  if (viewer) {
    try {
      current.textured = await texturedRequest;
      live();
      if (current.face === 0) await viewer.setColoured(current.textured);
    } catch (err) {
      if (err instanceof Superseded) throw err;
      // No photo texture (e.g. a face model without UVs): the mesh keeps its vertex colours.
      ui.meta.textContent += ` No photo texture: ${err.message || err}`;
    }
  }
}

function faceButton(face, k) {
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.face = String(k);
  button.textContent = k === 0 ? "Face 1 (largest)" : `Face ${k + 1}`;
  button.title = "Show this face: 3D, overlay, pose and downloads";
  button.addEventListener("click", () => selectFace(k).catch((err) => showError(String(err.message || err))));
  return button;
}

/** Show face `k` of the photo: its mesh, overlay, pose and detection; the downloads are this face's. */
async function selectFace(k, live = () => {}) {
  const face = current.faces[k];
  const result = current.result;
  current.face = k;
  for (const b of ui.facesBody.children) b.setAttribute("aria-pressed", String(b.dataset.face === String(k)));
  showPose(face.pose_degrees);
  await showOverlay(face.overlay, face.landmarks68);
  const count = result.faces_detected ?? result.face_count;
  ui.meta.textContent = `Mode ${face.mode}, model ${result.face_model}, face ${k + 1} of ${count} found, ` +
    `landmark error ${face.landmark_error_crop_px.toFixed(2)} px (crop).`;
  showDetection(face.detection);
  if (viewer) {
    const geometry = base64Bytes(face.mesh.data).buffer;
    viewer.clear();
    await viewer.setGeometry(geometry, { alsoColoured: !(k === 0 && current.textured) });
    live();
    if (k === 0 && current.textured) await viewer.setColoured(current.textured);
  }
}

async function reconstructSet(files, signal, live) {
  const fields = { ...options(), format: "json", include: "mesh,overlay", mesh_format: "glb" };
  const response = await post("/v1/reconstruct/set", files, fields, signal);
  const text = await response.text();
  live();
  const result = JSON.parse(text);
  current = { files, json: text, result, faces: null, face: 0, textured: null };
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
// Every download is made from what the page already has (no second reconstruction): the JSON, the textured GLB,
// and the shown face's GLB (or the set's identity mesh) converted to OBJ or PLY as the service writes them: in the
// face model's units (GLB is in metres), colours as uint8.
const MEDIA = { obj: "model/obj", glb: "model/gltf-binary", ply: "application/ply", json: "application/json" };
const METRES_PER_UNIT = { metre: 1, decimetre: 0.1, centimetre: 0.01, millimetre: 0.001 };

function shownMesh() {
  const { result, faces, face } = current;
  if (faces) return { glb: base64Bytes(faces[face].mesh.data).buffer, units: faces[face].units.model };
  return { glb: base64Bytes(result.identity_mesh.data).buffer, units: result.items[0]?.units.model || "decimetre" };
}

/** The single mesh of one of our GLBs: positions (metres), uint8 RGBA colours or null, triangle indices. */
function readGlb(buffer) {
  const view = new DataView(buffer);
  const jsonLength = view.getUint32(12, true);
  const gltf = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 20, jsonLength)));
  const binStart = 20 + jsonLength + 8;
  const accessor = (index, Type, size) => {
    const a = gltf.accessors[index];
    const bv = gltf.bufferViews[a.bufferView];
    return new Type(buffer.slice(binStart + (bv.byteOffset || 0) + (a.byteOffset || 0),
      binStart + (bv.byteOffset || 0) + (a.byteOffset || 0) + a.count * size * Type.BYTES_PER_ELEMENT));
  };
  const prim = gltf.meshes[0].primitives[0];
  const positions = accessor(prim.attributes.POSITION, Float32Array, 3);
  const colors = prim.attributes.COLOR_0 === undefined ? null : accessor(prim.attributes.COLOR_0, Uint8Array, 4);
  const indices = accessor(prim.indices, Uint32Array, 1);
  return { positions, colors, indices, count: positions.length / 3 };
}

function toObj({ positions, colors, indices, count }, units, scale) {
  const lines = [`# facerecon reconstruction; units: ${units}s; y up, z towards the camera`];
  for (let i = 0; i < count; i++) {
    const v = [0, 1, 2].map((c) => (positions[3 * i + c] * scale).toFixed(6));
    if (colors) v.push(...[0, 1, 2].map((c) => (colors[4 * i + c] / 255).toFixed(6)));
    lines.push(`v ${v.join(" ")}`);
  }
  for (let t = 0; t < indices.length; t += 3) {
    lines.push(`f ${indices[t] + 1} ${indices[t + 1] + 1} ${indices[t + 2] + 1}`);
  }
  return new Blob([lines.join("\n") + "\n"], { type: MEDIA.obj });
}

function toPly({ positions, colors, indices, count }, units, scale) {
  const faces = indices.length / 3;
  const header = "ply\nformat binary_little_endian 1.0\n" +
    `comment facerecon reconstruction; units: ${units}s; y up, z towards the camera\n` +
    `element vertex ${count}\nproperty float x\nproperty float y\nproperty float z\n` +
    "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n" +
    `element face ${faces}\nproperty list uchar int vertex_indices\nend_header\n`;
  const body = new DataView(new ArrayBuffer(count * 16 + faces * 13));
  let o = 0;
  for (let i = 0; i < count; i++, o += 16) {
    for (let c = 0; c < 3; c++) body.setFloat32(o + 4 * c, positions[3 * i + c] * scale, true);
    for (let c = 0; c < 4; c++) body.setUint8(o + 12 + c, colors ? (c < 3 ? colors[4 * i + c] : 255) : 255);
  }
  for (let t = 0; t < indices.length; t += 3, o += 13) {
    body.setUint8(o, 3);
    for (let c = 0; c < 3; c++) body.setInt32(o + 1 + 4 * c, indices[t + c], true);
  }
  return new Blob([header, body.buffer], { type: MEDIA.ply });
}

function fileFor(format) {
  if (format === "json") return new Blob([current.json], { type: MEDIA.json });
  if (format === "glb" && current.faces && current.face === 0 && current.textured) {
    return new Blob([current.textured], { type: MEDIA.glb });
  }
  const { glb, units } = shownMesh();
  if (format === "glb") return new Blob([glb], { type: MEDIA.glb });
  const scale = 1 / (METRES_PER_UNIT[units] || 0.1);
  return (format === "obj" ? toObj : toPly)(readGlb(glb), units, scale);
}

function download(format) {
  if (!current) return;
  try {
    const { files, faces, face } = current;
    let stem = files.length > 1 ? "identity" : files[0].name.replace(/\.[^.]*$/, "") || "face";
    if (faces && face > 0) stem += `_face${face}`;
    const url = URL.createObjectURL(fileFor(format));
    const link = document.createElement("a");
    link.href = url;
    link.download = `${stem}.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    say(`Downloaded ${link.download}.`);
  } catch (err) {
    showError(`Download failed: ${err.message || err}`);
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
loadDefaults().finally(() => {
  document.body.dataset.ready = "true";
});
