// Build the page into the Python package (served by facerecon/api/page.py, no CDN):
//   src/app.js (+ three.js and its addons) -> one ES module bundle, app.js
//   src/index.html, src/style.css           -> copied as they are
//   Swagger UI and ReDoc (npm's swagger-ui-dist, redoc) -> docs/, for /docs and /redoc (facerecon/api/page.py)
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
// The API documentation pages' assets (page.py's DOCS_ASSETS), with their licences.
const docs = resolve(out, "docs");
await mkdir(docs, { recursive: true });
const modules = resolve(here, "node_modules");
const assets = [
  ["swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui-bundle.js"],
  ["swagger-ui-dist/swagger-ui.css", "swagger-ui.css"],
  ["swagger-ui-dist/favicon-32x32.png", "favicon-32x32.png"],
  ["swagger-ui-dist/LICENSE", "swagger-ui.LICENSE.txt"],
  ["swagger-ui-dist/swagger-ui-bundle.js.LICENSE.txt", "swagger-ui-bundle.js.LICENSE.txt"],
  ["redoc/bundles/redoc.standalone.js", "redoc.standalone.js"],
  ["redoc/LICENSE", "redoc.LICENSE.txt"],
  ["redoc/bundles/redoc.standalone.js.LICENSE.txt", "redoc.standalone.js.LICENSE.txt"],
];
for (const [from, to] of assets) {
  await copyFile(resolve(modules, from), resolve(docs, to));
}
console.log(`page built into ${out}`);
