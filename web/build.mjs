// Builds the dashboard into crates/api/assets, which the fleetpipe binary embeds:
//   index.html, app.js (bundled TypeScript), app.css, vendor/uPlot.* (copied from npm).
// The output is committed, so `cargo build` never needs Node.js.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const web = dirname(fileURLToPath(import.meta.url));
const out = join(web, "..", "crates", "api", "assets");
const uplot = join(web, "node_modules", "uplot");

mkdirSync(join(out, "vendor"), { recursive: true });

await build({
  entryPoints: [join(web, "src", "main.ts")],
  outfile: join(out, "app.js"),
  bundle: true,
  format: "iife",
  target: "es2020",
  minify: true,
  legalComments: "none",
  logLevel: "warning",
});
await build({
  entryPoints: [join(web, "src", "style.css")],
  outfile: join(out, "app.css"),
  minify: true,
  logLevel: "warning",
});

copyFileSync(join(web, "src", "index.html"), join(out, "index.html"));
copyFileSync(join(uplot, "dist", "uPlot.iife.min.js"), join(out, "vendor", "uPlot.iife.min.js"));
copyFileSync(join(uplot, "dist", "uPlot.min.css"), join(out, "vendor", "uPlot.min.css"));
const version = JSON.parse(readFileSync(join(uplot, "package.json"), "utf8")).version;
writeFileSync(
  join(out, "vendor", "uPlot.LICENSE"),
  `uPlot ${version} — https://github.com/leeoniya/uPlot\n\n` + readFileSync(join(uplot, "LICENSE"), "utf8"),
);

for (const f of ["index.html", "app.js", "app.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"]) {
  console.log(`${f.padEnd(26)} ${(statSync(join(out, f)).size / 1024).toFixed(1).padStart(6)} KiB`);
}
