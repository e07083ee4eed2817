// Build the page into the Python package (served by facerecon/api/page.py, no CDN):
//   src/app.js (+ three.js and its addons) -> one ES module bundle, app.js
//   src/index.html, src/style.css           -> copied as they are
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(here, "../service/facerecon/api/static");

await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });
await build({
  entryPoints: [resolve(here, "src/app.js")],
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  legalComments: "linked",
  outfile: resolve(out, "app.js"),
  logLevel: "warning",
});
for (const name of ["index.html", "style.css"]) {
  await copyFile(resolve(here, "src", name), resolve(out, name));
}
console.log(`page built into ${out}`);
