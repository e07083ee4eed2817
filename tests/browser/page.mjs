// Drive the facerecon page in Debian's chromium with playwright-core (from web/node_modules; never a downloaded
// browser). Used by tests/test_page.py:
//   node tests/browser/page.mjs BASE_URL PHOTO OUT_DIR [--screenshot PAGE.png] [--set A.jpg,B.jpg,...]
//     [--doubted PROFILE.jpg]  (a photo whose face the detector flags as unreliable: the page must say so)
//     [--group GROUP.jpg] [--other OTHER.jpg]  (a photo with several faces; a second single photo)
// Writes into OUT_DIR: empty.png and face.png / shaded.png / orbited.png / reset.png (the viewer canvas before the
// upload and after it), the four downloads (face.obj, face.glb, face.ply, face.json), set.png (the identity of a
// set, with --set), back.png (the head seen from behind), group_obj (with --group) and result.json (what the page
// showed, and the API requests it sent with their `refine` field).
import { createRequire } from "node:module";
import { parseArgs } from "node:util";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

const require = createRequire(new URL("../../web/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    screenshot: { type: "string" }, set: { type: "string" }, doubted: { type: "string" }, group: { type: "string" },
    other: { type: "string" },
  },
});
const [base, photo, out] = positionals;
if (!base || !photo || !out) {
  console.error("usage: node page.mjs BASE_URL PHOTO OUT_DIR [--screenshot PAGE.png] [--set A.jpg,B.jpg,...]");
  process.exit(2);
}
const TIMEOUT = 90_000;
const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  // WebGL without a GPU: SwiftShader, which newer Chromium only uses when asked
  "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
];

const profile = await mkdtemp(join(tmpdir(), "facerecon-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: FLAGS,
  acceptDownloads: true,
  viewport: { width: 1100, height: 900 },
});
const result = { console: [], expectedErrors: [], downloads: {} };
let errors = result.console;
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  page.on("pageerror", (e) => errors.push(String(e)));
  // Every API request the page sends, with its text form fields (recorded in the page: CDP does not give
  // multipart bodies with files).
  await page.addInitScript(() => {
    window.__requests = [];
    const original = window.fetch;
    window.fetch = (input, init) => {
      if (init?.body instanceof FormData) {
        const fields = Object.fromEntries([...init.body.entries()].filter(([, v]) => typeof v === "string"));
        window.__requests.push({ path: String(input), ...fields });
      }
      return original(input, init);
    };
  });
  const requests = () => page.evaluate(() => window.__requests);
  const requestCount = async () => (await requests()).length;
  const doneWith = (name) => page.waitForFunction((n) => document.querySelector("#status").textContent === `Done: ${n}.`,
    name);

  await page.goto(base + "/");
  await page.waitForSelector("body[data-ready=true]");
  result.refineDefault = await page.isChecked("#refine");
  result.firstRequests = null;
  const canvas = page.locator("#viewer canvas");
  await canvas.screenshot({ path: join(out, "empty.png") });

  // One photo: the viewer, the overlay, the pose.
  await page.setInputFiles("#photos", photo);
  await page.waitForSelector("#viewer[data-state=ready]");
  await page.waitForFunction(() => !document.querySelector("#view-reset").disabled);
  await canvas.screenshot({ path: join(out, "face.png") });
  result.status = await page.textContent("#status");
  result.firstRequests = await requests();
  result.pose = Object.fromEntries(
    await Promise.all(["pitch", "yaw", "roll"].map(async (k) => [k, await page.textContent(`#${k}`)])));
  result.errorShown = await page.isVisible("#error");
  result.detectionWarningShown = await page.isVisible("#detection-warning");

  // The shaded geometry, then back to the coloured mesh; orbit a little and reset.
  await page.click("#view-shaded");
  await canvas.screenshot({ path: join(out, "shaded.png") });
  await page.click("#view-coloured");
  const box = await canvas.boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width / 2 + 120, box.y + box.height / 2, { steps: 5 });
  await page.mouse.up();
  await canvas.screenshot({ path: join(out, "orbited.png") });
  await page.click("#view-reset");
  await canvas.screenshot({ path: join(out, "reset.png") });
  // Half a turn (OrbitControls: a drag of the canvas height is a full turn): the back of the textured head.
  await page.mouse.move(box.x + box.width / 2 - box.height / 4, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width / 2 + box.height / 4, box.y + box.height / 2, { steps: 10 });
  await page.mouse.up();
  await canvas.screenshot({ path: join(out, "back.png") });
  await page.click("#view-reset");

  // The landmarks toggle changes the overlay canvas.
  const overlayData = () => page.evaluate(() => document.querySelector("#overlay").toDataURL());
  const withLandmarks = await overlayData();
  await page.uncheck("#landmarks");
  result.landmarksToggle = (await overlayData()) !== withLandmarks;
  await page.check("#landmarks");

  if (opts.screenshot) {
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: opts.screenshot, fullPage: true });
  }

  // Every download button gives a file, made from what the page has: no request to the service.
  const before = await requestCount();
  for (const format of ["obj", "glb", "ply", "json"]) {
    const [download] = await Promise.all([
      page.waitForEvent("download"),
      page.click(`#downloads button[data-format=${format}]`),
    ]);
    const path = join(out, `face.${format}`);
    await download.saveAs(path);
    result.downloads[format] = { path, suggested: download.suggestedFilename() };
  }
  result.downloadRequests = (await requestCount()) - before;

  // Refine unchecked is sent as refine=false; a photo chosen while one runs replaces it (the last one is shown).
  if (opts.other) {
    await page.setChecked("#refine", false);
    const first = await requestCount();
    await page.setInputFiles("#photos", opts.other);
    await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Reconstructing"));
    await page.setInputFiles("#photos", photo);
    await doneWith(photo.split("/").pop());
    await page.waitForTimeout(500); // a superseded run must not overwrite what is shown after this
    result.replaced = {
      status: await page.textContent("#status"), meta: await page.textContent("#meta"),
      yaw: await page.textContent("#yaw"), requests: (await requests()).slice(first),
      errorShown: await page.isVisible("#error"),
    };
    await page.setChecked("#refine", true);
  }

  // A group photo: one button per face; choosing one shows its pose and overlay and makes its downloads.
  if (opts.group) {
    await page.setInputFiles("#photos", opts.group);
    await doneWith(opts.group.split("/").pop());
    const buttons = page.locator("#faces-body button");
    const overlayBefore = await overlayData();
    const yawBefore = await page.textContent("#yaw");
    await buttons.nth(1).click();
    await page.waitForFunction(() => document.querySelector("#faces-body button[data-face='1'][aria-pressed=true]"));
    const [download] = await Promise.all([
      page.waitForEvent("download"), page.click("#downloads button[data-format=obj]"),
    ]);
    await download.saveAs(join(out, "group.obj"));
    result.group = {
      visible: await page.isVisible("#faces-list"), buttons: await buttons.count(),
      overlayChanged: (await overlayData()) !== overlayBefore, yaw: [yawBefore, await page.textContent("#yaw")],
      meta: await page.textContent("#meta"), download: download.suggestedFilename(), path: join(out, "group.obj"),
    };
  }

  // A set: one identity mesh, one pose per photo.
  if (opts.set) {
    const photos = opts.set.split(",");
    await page.setInputFiles("#photos", photos);
    await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Done: one identity"));
    await canvas.screenshot({ path: join(out, "set.png") });
    result.set = {
      rows: await page.locator("#photos-body tr").count(),
      poses: await page.locator("#photos-body tr td:nth-child(3)").allTextContents(),
      errorShown: await page.isVisible("#error"),
    };
  }

  // A face the detector doubts (a true profile the face mesh is unsure of): reconstructed, and the page says so.
  if (opts.doubted) {
    await page.setInputFiles("#photos", opts.doubted);
    await page.waitForSelector("#detection-warning:not([hidden])");
    await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Done"));
    result.doubted = { warning: await page.textContent("#detection-warning"), errorShown: await page.isVisible("#error") };
  }

  // An error: a text file is not a photo; the page shows the API's message (the failed request is expected).
  errors = result.expectedErrors;
  await page.setInputFiles("#photos", {
    name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("this is not a photo\n"),
  });
  await page.waitForSelector("#error:not([hidden])");
  result.errorText = await page.textContent("#error");
} finally {
  await writeFile(join(out, "result.json"), JSON.stringify(result, null, 2));
  await context.close();
  await rm(profile, { recursive: true, force: true });
}
