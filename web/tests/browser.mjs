#!/usr/bin/env node
// Browser test of the dashboard in headless Chromium (Debian's, driven by playwright-core).
//
//   node web/tests/browser.mjs <base-url> <screenshot-dir>
//
// Against `fleetpipe up --simulate 200`: with FLEETPIPE_TOKEN set (a server requiring
// tokens), the page asks for a token, refuses a bad one and signs in with the good one;
// then the fleet table lists every device (across pages), the map shows positions, a device
// page's speed chart receives new points live (the live stream authenticated by its query),
// and the page makes no request off the server; finally "Log out" asks for a token again.
// Writes login.png, fleet.png and device.png (failure.png when something fails) into
// <screenshot-dir>; exits non-zero with the reason on failure.
//
// Environment: FLEETPIPE_CHROMIUM (default /usr/bin/chromium), FLEETPIPE_EXPECT_DEVICES
// (default 200), FLEETPIPE_TOKEN (a read token; unset for a server without tokens).

import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const [baseArg, shotsArg] = process.argv.slice(2);
if (!baseArg || !shotsArg) {
  console.error("usage: node web/tests/browser.mjs <base-url> <screenshot-dir>");
  process.exit(2);
}
const base = new URL(baseArg);
const shots = resolve(shotsArg);
const chromiumPath = process.env.FLEETPIPE_CHROMIUM || "/usr/bin/chromium";
const expectDevices = Number(process.env.FLEETPIPE_EXPECT_DEVICES || 200);
const apiToken = process.env.FLEETPIPE_TOKEN || "";
const SETUP = "run `eval \"$(scripts/setup.sh test)\"` (installs Debian's chromium and runs npm ci in web/)";

if (!existsSync(chromiumPath)) fail(`no Chromium at ${chromiumPath}: ${SETUP}`);
let chromium;
try {
  ({ chromium } = await import("playwright-core"));
} catch {
  fail(`playwright-core is not installed in web/node_modules: ${SETUP}`);
}

const ROWS = "[data-testid=fleet-table] tr[data-device]";
const log = (msg) => console.log(`browser: ${msg}`);

function fail(msg) {
  console.error(`browser test failed: ${msg}`);
  process.exit(1);
}

/** Polls `probe` until it returns a truthy value; fails with `what` after `ms`. */
async function until(what, ms, probe) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms / 1000} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const intAttr = (page, selector, attr) =>
  page.locator(selector).first().getAttribute(attr, { timeout: 1000 }).then(
    (v) => Number(v ?? NaN),
    () => NaN,
  );

mkdirSync(shots, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "fleetpipe-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: chromiumPath,
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const page = context.pages()[0] ?? (await context.newPage());

// Everything must come from fleetpipe itself: no CDN, no tiles by default.
const offsite = [];
await page.route("**/*", (route) => {
  const url = new URL(route.request().url());
  if (url.protocol === "data:" || url.host === base.host) return route.continue();
  offsite.push(url.href);
  return route.abort();
});
const pageErrors = [];
page.on("pageerror", (e) => pageErrors.push(e.message));
page.on("console", (m) => m.type() === "error" && pageErrors.push(`console: ${m.text()}`));

let status = 0;
try {
  await run();
  log("passed");
} catch (e) {
  status = 1;
  console.error(`browser test failed: ${e.message}`);
  await page.screenshot({ path: join(shots, "failure.png") }).catch(() => {});
  console.error(`browser: page at failure: ${page.url()} (screenshot ${join(shots, "failure.png")})`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(status);

/** Clicks a pager button unless it is disabled; waits for the page to change. */
async function turnPage(testid) {
  const button = page.locator(`[data-testid=${testid}]`);
  if (await button.isDisabled()) return false;
  const first = await page.locator(ROWS).first().getAttribute("data-device");
  await button.click();
  await until(`${testid} to turn the page`, 5000, async () => (await page.locator(ROWS).first().getAttribute("data-device")) !== first);
  return true;
}

/** Signs in through the dialog the page shows on a 401. */
async function signIn() {
  const dialog = page.locator("[data-testid=login]");
  await dialog.waitFor({ state: "visible", timeout: 15_000 });
  await page.screenshot({ path: join(shots, "login.png") });
  await page.fill("[data-testid=token-input]", "fpt_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
  await page.click("[data-testid=login-submit]");
  await until("the bad token to be refused", 5000, async () =>
    /not valid/.test((await page.locator("[data-testid=login-error]").textContent()) ?? ""),
  );
  await page.fill("[data-testid=token-input]", apiToken);
  await page.click("[data-testid=login-submit]");
  await dialog.waitFor({ state: "detached", timeout: 5000 });
  if (!(await page.locator("[data-testid=logout]").isVisible())) throw new Error("no logout control after signing in");
  log("signed in with a token (a bad one was refused)");
}

async function run() {
  // Fleet view: every device in the table, positions on the map.
  await page.goto(new URL("#/", base).href);
  if (apiToken) await signIn();
  const count = await until(`the table to count ${expectDevices} devices`, 30_000, async () => {
    const n = await intAttr(page, "[data-testid=device-count]", "data-count");
    return n === expectDevices ? n : 0;
  });
  const ids = new Set();
  for (let pages = 0; ; pages++) {
    if (pages > 1000) throw new Error("the pager never ends");
    for (const id of await page.locator(ROWS).evaluateAll((rows) => rows.map((r) => r.dataset.device))) ids.add(id);
    if (!(await turnPage("page-next"))) break;
  }
  if (ids.size !== expectDevices) throw new Error(`the table lists ${ids.size} distinct devices across its pages, want ${expectDevices}`);
  log(`table lists ${count} devices (${ids.size} distinct ids across pages)`);
  while (await turnPage("page-prev"));

  const markers = await until("positions on the map", 15_000, async () => {
    const n = await intAttr(page, "[data-testid=map]", "data-points");
    return n > 0 ? n : 0;
  });
  log(`map shows ${markers} positions`);
  await until("the fleet summary", 10_000, async () => {
    const t = await page.locator("[data-testid=summary-devices]").textContent();
    return t && t !== "–";
  });
  const dead = await page.locator("[data-testid=dead-letters]").textContent();
  log(`summary: ${await page.locator("[data-testid=summary-devices]").textContent()} devices, ${dead} dead letters`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.waitForTimeout(1500); // let the live stream move things a little
  await page.screenshot({ path: join(shots, "fleet.png") });

  // Sorting: fastest first, which is also a moving vehicle for the device page.
  await page.locator("[data-testid=fleet-table] th button[data-sort=speed]").click();
  await until("the table sorted by speed", 5000, async () =>
    (await page.locator("[data-testid=fleet-table] th[aria-sort]").getAttribute("aria-sort")) === "descending" &&
    (await page.locator("[data-testid=fleet-table] th[aria-sort] button").getAttribute("data-sort")) === "speed",
  );
  const speeds = await page.locator(ROWS).evaluateAll((rows) => rows.map((r) => parseFloat(r.cells[3]?.textContent ?? "")));
  const known = speeds.filter((v) => Number.isFinite(v));
  if (known.some((v, i) => i > 0 && v > known[i - 1])) throw new Error(`speeds not in descending order: ${known.slice(0, 10).join(", ")}…`);
  log(`sorted by speed: ${known.slice(0, 3).join(", ")}… km/h`);

  // Device page: the speed chart gets new points from the live stream.
  const row = page.locator(ROWS).first();
  const id = await row.getAttribute("data-device");
  await row.locator("a").click();
  await until(`the device page of ${id}`, 5000, async () => decodeURIComponent(new URL(page.url()).hash) === `#/device/${id}`);
  const chart = "[data-testid=chart-speed]";
  const before = await until("the speed chart's first points", 15_000, async () => {
    const n = await intAttr(page, chart, "data-points");
    return n > 0 ? n : 0;
  });
  const after = await until("new live points on the speed chart", 10_000, async () => {
    const n = await intAttr(page, chart, "data-points");
    return n > before ? n : 0;
  });
  log(`${id}: speed chart went from ${before} to ${after} points`);
  const track = await until("the device's position", 10_000, async () => {
    const n = await intAttr(page, "[data-testid=device-map]", "data-points");
    return n > 0 ? n : 0;
  });
  log(`${id}: device map shows ${track} position`);
  await page.waitForTimeout(1000);
  await page.screenshot({ path: join(shots, "device.png"), fullPage: true });
  log(`screenshots in ${shots}`);

  if (apiToken) {
    await page.click("[data-testid=logout]");
    await page.locator("[data-testid=login]").waitFor({ state: "visible", timeout: 10_000 });
    const kept = await page.evaluate(() => sessionStorage.getItem("fleetpipe-token"));
    if (kept) throw new Error("the token is still in sessionStorage after logging out");
    log("logged out: the page asks for a token again");
  }

  if (offsite.length) throw new Error(`requests off the server (blocked): ${[...new Set(offsite)].join(", ")}`);
  // A 401 is how the page learns it needs a token: the browser reports it as a failed load.
  const errors = pageErrors.filter((e) => !(apiToken && /\b401\b/.test(e)));
  if (errors.length) throw new Error(`errors in the page:\n  ${errors.join("\n  ")}`);
}
