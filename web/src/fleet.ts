// The fleet view (`#/`): fleet summary, a searchable, sortable, paginated device table and a
// map of positions. The whole fleet is held in memory (the map needs every position); the
// live stream updates it, and a throttled renderer redraws at most twice a second.

import * as api from "./api";
import { every, h, setAttr, setText, Throttle } from "./dom";
import { ago, int, isoTime, ms, withUnit } from "./format";
import { MapView, type Marker } from "./map";
import { setLiveStatus, tileUrl, type View } from "./shell";

/**
 * Above this many devices the fleet view polls instead of streaming every change: a
 * simulated vehicle sends about four events a second on the streamed sensors, and a
 * browser tab stays responsive up to a few thousand events a second.
 */
const LIVE_MAX_DEVICES = 1000;
const PAGE_SIZE = 100;
/** What the table and the map show; torque (5 Hz) would more than double the stream. */
const LIVE_SENSORS = ["speed", "soc", "gps.lat", "gps.lon"];

type SortKey = "id" | "last_seen" | "speed" | "soc";

interface Row {
  id: string;
  online: boolean;
  lastSeen: number;
  /** Latest value and its time (ms) per sensor. */
  sensors: Map<string, { v: number; t: number }>;
}

/** Search, sort and page survive a visit to a device page. */
const table = { query: "", sort: "id" as SortKey, desc: false, page: 0 };

const COLUMNS: Array<{ key: SortKey | "status"; label: string; numeric?: boolean }> = [
  { key: "id", label: "Device" },
  { key: "status", label: "Status" },
  { key: "last_seen", label: "Last seen" },
  { key: "speed", label: "Speed", numeric: true },
  { key: "soc", label: "State of charge", numeric: true },
];

function toRow(d: api.Device): Row {
  const sensors = new Map<string, { v: number; t: number }>();
  // By sensor, as live events name them: with tags in the subject template every series has
  // tags (`speed{site=munich}`), and the table and map still want `speed` and `gps.lat`.
  for (const [key, s] of Object.entries(d.sensors ?? {})) {
    const name = s.sensor ?? key;
    const t = ms(s.ts);
    if (!((sensors.get(name)?.t ?? -Infinity) > t)) sensors.set(name, { v: s.value, t });
  }
  return { id: d.id, online: d.online, lastSeen: ms(d.last_seen), sensors };
}

function sortValue(r: Row, key: SortKey): number | string {
  if (key === "id") return r.id;
  if (key === "last_seen") return r.lastSeen;
  return r.sensors.get(key)?.v ?? NaN;
}

/** Code-unit order, as the API sorts ids (and fast: the table sorts on every render). */
function byId(a: Row, b: Row): number {
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/** Compares rows by the table's sort; missing values always go last. */
function compare(a: Row, b: Row): number {
  const x = sortValue(a, table.sort);
  const y = sortValue(b, table.sort);
  if (typeof x === "string" || typeof y === "string") {
    const c = byId(a, b);
    return table.desc ? -c : c;
  }
  if (Number.isNaN(x) || Number.isNaN(y)) return Number.isNaN(x) ? (Number.isNaN(y) ? 0 : 1) : -1;
  const c = x - y || byId(a, b);
  return table.desc ? -c : c;
}

export function fleetView(root: HTMLElement): View {
  const rows = new Map<string, Row>();
  const abort = new AbortController();
  let loaded = false;
  let error = "";

  // Summary cards.
  const summary = h("section", { class: "cards", "aria-label": "Fleet summary" });
  const card = (testid: string, label: string) => {
    const v = h("span", { class: "card-value", "data-testid": testid }, "–");
    summary.append(h("div", { class: "card" }, h("span", { class: "card-label" }, label), v));
    return v;
  };
  const cards = {
    devices: card("summary-devices", "Devices"),
    online: card("summary-online", "Online"),
    offline: card("summary-offline", "Offline"),
    speed: card("summary-speed", "Average speed"),
    soc: card("summary-soc", "Average charge"),
    dead: card("dead-letters", "Dead letters"),
  };
  const banner = h("p", { class: "banner", role: "alert", hidden: true });
  root.append(summary, banner);

  // Table.
  const search = h("input", {
    type: "search",
    placeholder: "Search by device id prefix",
    "aria-label": "Search devices by id prefix",
    "data-testid": "search",
    value: table.query,
    oninput: () => {
      table.query = search.value.trim();
      table.page = 0;
      render.now();
    },
  });
  const count = h("span", { class: "count", "data-testid": "device-count", "data-count": 0, "aria-live": "polite" });
  const head = h("tr");
  for (const c of COLUMNS) {
    const th = h("th", { scope: "col", class: c.numeric ? "num" : undefined });
    if (c.key === "status") th.textContent = c.label;
    else {
      const key = c.key;
      th.append(h("button", { type: "button", "data-sort": key, onclick: () => setSort(key) }, c.label));
    }
    head.append(th);
  }
  const body = h("tbody", {
    onclick: (e: Event) => {
      const tr = (e.target as Element).closest("tr[data-device]");
      if (tr && !(e.target as Element).closest("a")) location.hash = deviceHref(tr.getAttribute("data-device") ?? "");
    },
  });
  const prev = h("button", { type: "button", "data-testid": "page-prev", onclick: () => turn(-1) }, "← Previous");
  const next = h("button", { type: "button", "data-testid": "page-next", onclick: () => turn(1) }, "Next →");
  const pageInfo = h("span", { "data-testid": "page-info" });
  const map = new MapView({
    testid: "map",
    label: "Map of vehicle positions",
    onPick: (id) => (location.hash = deviceHref(id)),
    ...(tileUrl() ? { tileUrl: tileUrl() } : {}),
  });
  root.append(
    h(
      "div",
      { class: "fleet-grid" },
      h(
        "section",
        { class: "panel", "aria-labelledby": "devices-h" },
        h("div", { class: "toolbar" }, h("h2", { id: "devices-h" }, "Devices"), search, count),
        h("table", { class: "devices", "data-testid": "fleet-table" }, h("thead", {}, head), body),
        h("div", { class: "pager" }, prev, pageInfo, next),
      ),
      h("section", { class: "panel map-panel", "aria-labelledby": "map-h" }, h("h2", { id: "map-h" }, "Positions"), map.el),
    ),
  );

  function setSort(key: SortKey): void {
    if (table.sort === key) table.desc = !table.desc;
    else {
      table.sort = key;
      table.desc = key !== "id";
    }
    render.now();
  }

  function turn(delta: number): void {
    table.page = Math.max(0, table.page + delta);
    render.now();
  }

  const render = new Throttle(500, () => {
    const now = Date.now();
    const q = table.query.toLowerCase();
    const matches = (r: Row) => !q || r.id.toLowerCase().startsWith(q);
    const all = [...rows.values()];
    const shown = q ? all.filter(matches) : all;
    shown.sort(compare);
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    table.page = Math.min(table.page, pages - 1);
    const first = table.page * PAGE_SIZE;
    renderBody(shown.slice(first, first + PAGE_SIZE), now);

    setAttr(count, "data-count", String(shown.length));
    setAttr(count, "data-total", String(rows.size));
    setText(count, q ? `${int(shown.length)} of ${int(rows.size)} devices` : `${int(rows.size)} devices`);
    setText(pageInfo, shown.length ? `${int(first + 1)}–${int(Math.min(first + PAGE_SIZE, shown.length))} of ${int(shown.length)}` : "");
    prev.disabled = table.page === 0;
    next.disabled = table.page >= pages - 1;
    for (const th of head.children) {
      const key = th.querySelector("button")?.dataset["sort"];
      if (key === table.sort) th.setAttribute("aria-sort", table.desc ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    }

    const markers: Marker[] = [];
    for (const r of all) {
      const lat = r.sensors.get("gps.lat")?.v;
      const lon = r.sensors.get("gps.lon")?.v;
      if (lat === undefined || lon === undefined) continue;
      markers.push({ id: r.id, lat, lon, online: r.online, dim: !matches(r) });
    }
    map.set(markers);
  });

  function renderBody(page: Row[], now: number): void {
    if (!page.length) {
      const msg = !loaded
        ? error || "Loading devices…"
        : table.query
          ? `No device id starts with “${table.query}”.`
          : "No devices yet. Start some: fleetpipe simulate --devices 100";
      body.replaceChildren(h("tr", {}, h("td", { colspan: COLUMNS.length, class: "empty" }, msg)));
      return;
    }
    // Reuse row elements: only changed text touches the DOM.
    while (body.rows.length > page.length || (body.rows[0] && !body.rows[0].dataset["device"])) body.deleteRow(-1);
    while (body.rows.length < page.length) body.append(newRow());
    page.forEach((r, i) => {
      const tr = body.rows[i];
      if (tr) fillRow(tr, r, now);
    });
  }

  function newRow(): HTMLTableRowElement {
    const tr = h("tr", { "data-device": "" });
    tr.append(
      h("td", {}, h("a", { href: "#/" })),
      h("td", {}, h("span", { class: "badge" })),
      h("td", {}, h("time")),
      h("td", { class: "num" }),
      h("td", { class: "num" }),
    );
    return tr;
  }

  function fillRow(tr: HTMLTableRowElement, r: Row, now: number): void {
    setAttr(tr, "data-device", r.id);
    setAttr(tr, "data-online", String(r.online));
    const [idCell, statusCell, seenCell, speedCell, socCell] = [...tr.cells];
    const link = idCell?.firstElementChild;
    if (link) {
      setAttr(link, "href", deviceHref(r.id));
      setText(link, r.id);
    }
    const badge = statusCell?.firstElementChild;
    if (badge) {
      setAttr(badge, "class", r.online ? "badge online" : "badge offline");
      setText(badge, r.online ? "online" : "offline");
    }
    const time = seenCell?.firstElementChild;
    if (time) {
      setAttr(time, "datetime", isoTime(r.lastSeen));
      setText(time, ago(r.lastSeen, now));
    }
    const cell = (el: HTMLTableCellElement | undefined, sensor: string) => {
      if (el) setText(el, withUnit(sensor, r.sensors.get(sensor)?.v));
    };
    cell(speedCell, "speed");
    cell(socCell, "soc");
  }

  // Data: the full list, refreshed periodically; the live stream in between.
  let fetching = false;
  let stopLive: (() => void) | undefined;
  const refreshDevices = async () => {
    if (fetching) return;
    fetching = true;
    try {
      const list = await api.allDevices(abort.signal);
      const fresh = new Map<string, Row>();
      for (const d of list) {
        const row = toRow(d);
        // Keep live values newer than the snapshot the server just sent.
        for (const [name, s] of rows.get(d.id)?.sensors ?? []) {
          if (s.t > (row.sensors.get(name)?.t ?? -Infinity)) row.sensors.set(name, s);
        }
        fresh.set(d.id, row);
      }
      rows.clear();
      for (const [id, r] of fresh) rows.set(id, r);
      loaded = true;
      error = "";
      updateLive();
    } catch (e) {
      if (!abort.signal.aborted) error = `Cannot load devices: ${(e as Error).message}`;
    } finally {
      fetching = false;
      render.request();
    }
  };

  /** How often the full list is re-read: for online flags when streaming, for everything otherwise. */
  function pollMs(): number {
    return rows.size <= LIVE_MAX_DEVICES ? 15_000 : rows.size <= 10_000 ? 5_000 : 30_000;
  }

  /** Streams changes for fleets small enough to follow event by event; polls otherwise. */
  function updateLive(): void {
    if (rows.size <= LIVE_MAX_DEVICES) {
      stopLive ??= api.live(
        { sensors: LIVE_SENSORS },
        onState,
        (s) => setLiveStatus(s, s === "live" ? "live" : `${s}…`),
        () => void refreshDevices(), // missed events: catch up from the full list
      );
    } else {
      stopLive?.();
      stopLive = undefined;
      setLiveStatus("polling", `${int(rows.size)} devices: refreshing every ${pollMs() / 1000} s`);
    }
  }

  function onState(s: api.LiveState): void {
    let r = rows.get(s.device);
    if (!r) {
      r = { id: s.device, online: true, lastSeen: NaN, sensors: new Map() };
      rows.set(s.device, r);
    }
    const t = ms(s.ts);
    const old = r.sensors.get(s.sensor);
    if (!old || !(old.t > t)) r.sensors.set(s.sensor, { v: s.value, t });
    if (!(r.lastSeen >= t)) r.lastSeen = t;
    r.online = true;
    render.request();
  }

  const refreshSummary = async () => {
    try {
      const s = await api.fleetSummary(abort.signal);
      setText(cards.devices, int(s.devices));
      setText(cards.online, int(s.online));
      setText(cards.offline, int(s.offline));
      setText(cards.speed, withUnit("speed", s.sensors["speed"]?.avg));
      setText(cards.soc, withUnit("soc", s.sensors["soc"]?.avg));
      setText(cards.dead, int(s.dead_letters));
      setAttr(cards.dead.parentElement ?? cards.dead, "class", s.dead_letters > 0 ? "card warn" : "card");
      banner.hidden = true;
    } catch (e) {
      if (abort.signal.aborted) return;
      banner.textContent = `The API does not answer: ${(e as Error).message}. Retrying…`;
      banner.hidden = false;
    }
  };

  const timers = [
    every(5000, () => void refreshSummary()),
    every(1000, () => render.request()), // "… s ago" moves on even without events
  ];
  let deviceTimer: ReturnType<typeof setTimeout> | undefined;
  const scheduleDevices = async () => {
    await refreshDevices();
    if (abort.signal.aborted) return;
    deviceTimer = setTimeout(() => void scheduleDevices(), pollMs());
  };
  void scheduleDevices();
  render.request();

  return {
    title: "Fleet",
    dispose() {
      abort.abort();
      stopLive?.();
      clearTimeout(deviceTimer);
      for (const stop of timers) stop();
      render.cancel();
      map.dispose();
    },
  };
}

export function deviceHref(id: string): string {
  return `#/device/${encodeURIComponent(id)}`;
}
