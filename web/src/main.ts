// fleetpipe's built-in dashboard: a hash-routed single-page app.
//   #/             fleet view (fleet.ts)
//   #/device/<id>  device page (device.ts)

import { setLoginHandler, updateLogout } from "./auth";
import { deviceView } from "./device";
import { fleetView } from "./fleet";
import type { View } from "./shell";

const app = document.getElementById("app");
let current: View | undefined;

function route(): void {
  if (!app) return;
  current?.dispose();
  app.replaceChildren();
  const m = /^#\/device\/(.+)$/.exec(location.hash);
  const id = m?.[1] ? decode(m[1]) : undefined;
  current = id ? deviceView(app, id) : fleetView(app);
  document.title = `${current.title} · fleetpipe`;
  window.scrollTo(0, 0);
  app.focus({ preventScroll: true });
}

function decode(s: string): string | undefined {
  try {
    return decodeURIComponent(s);
  } catch {
    return undefined; // a malformed link: show the fleet instead
  }
}

window.addEventListener("hashchange", route);
setLoginHandler(route);
updateLogout();
route();
