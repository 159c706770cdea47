// The device page (`#/device/<id>`): latest value of every series, a live chart per series
// (the last ten minutes from the series endpoint, then the live stream) and the track.
// Series are keyed by their label, as the API keys a device's `sensors`: `speed`, or
// `cpu.usage_idle{cpu=cpu0,host=h1}` for one of several tag sets of a sensor.

import * as api from "./api";
import { LiveChart } from "./chart";
import { every, h, setAttr, setText, Throttle } from "./dom";
import { ago, isoTime, ms, sensorLabel, sortSensors, withUnit } from "./format";
import { MapView } from "./map";
import { setLiveStatus, tileUrl, type View } from "./shell";

const WINDOW_MS = 10 * 60 * 1000;
/** GPS latitude and longitude are separate readings; fixes closer than this pair up. */
const PAIR_MS = 1000;

interface Latest {
  v: number;
  t: number;
  unit: string | null | undefined;
}

/** Pairs latitude and longitude readings into fixes by nearest timestamp. */
function pairFixes(lat: api.Point[], lon: api.Point[]): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  let j = 0;
  for (const p of lat) {
    const t = ms(p.ts);
    while (j < lon.length && ms(lon[j]?.ts) < t - PAIR_MS) j++;
    const q = lon[j];
    if (q && Math.abs(ms(q.ts) - t) <= PAIR_MS) {
      out.push([p.value, q.value, t]);
      j++;
    }
  }
  return out;
}

/** The GPS axis a series is of, whatever its tags. */
function gpsAxis(key: string): "gps.lat" | "gps.lon" | undefined {
  const sensor = api.sensorOf(key);
  return sensor === "gps.lat" || sensor === "gps.lon" ? sensor : undefined;
}

export function deviceView(root: HTMLElement, id: string): View {
  const abort = new AbortController();
  /** By series label. */
  const latest = new Map<string, Latest>();
  const charts = new Map<string, LiveChart>();
  /** [lat, lon, ms] fixes of the last ten minutes. */
  let track: Array<[number, number, number]> = [];
  const pending: { lat?: [number, number]; lon?: [number, number] } = {};
  /** GPS history from the series endpoint, paired into `track` once both axes are in. */
  const history: Partial<Record<"gps.lat" | "gps.lon", api.Point[]>> = {};
  let online = false;
  let lastSeen = NaN;
  let stopLive: (() => void) | undefined;

  const badge = h("span", { class: "badge", "data-testid": "device-status" });
  const seen = h("time", { "data-testid": "device-last-seen" });
  const tags = h("ul", { class: "tags", "aria-label": "Tags" });
  const values = h("tbody");
  const chartGrid = h("div", { class: "charts" });
  const map = new MapView({ testid: "device-map", label: `Track of ${id}`, ...(tileUrl() ? { tileUrl: tileUrl() } : {}) });
  const status = h("p", { class: "banner", role: "alert", hidden: true });
  root.append(
    h("nav", { class: "crumbs" }, h("a", { href: "#/", "data-testid": "back" }, "← Fleet")),
    h("div", { class: "device-head" }, h("h1", { "data-testid": "device-id" }, id), badge, h("span", { class: "muted" }, "last seen ", seen), tags),
    status,
    h(
      "div",
      { class: "device-grid" },
      h(
        "section",
        { class: "panel", "aria-labelledby": "latest-h" },
        h("h2", { id: "latest-h" }, "Latest values"),
        h(
          "table",
          { class: "latest", "data-testid": "latest" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Sensor"), h("th", { scope: "col", class: "num" }, "Value"), h("th", { scope: "col" }, "Updated"))),
          values,
        ),
      ),
      h("section", { class: "panel map-panel", "aria-labelledby": "track-h" }, h("h2", { id: "track-h" }, "Track, last 10 minutes"), map.el),
    ),
    h("section", { "aria-labelledby": "charts-h" }, h("h2", { id: "charts-h", class: "section-h" }, "Live charts, last 10 minutes"), chartGrid),
  );

  const render = new Throttle(250, () => {
    const now = Date.now();
    badge.className = online ? "badge online" : "badge offline";
    setText(badge, online ? "online" : "offline");
    setAttr(seen, "datetime", isoTime(lastSeen));
    setText(seen, ago(lastSeen, now));
    renderValues(now);
    for (const c of charts.values()) c.flush(now);
    track = track.filter(([, , t]) => t >= now - WINDOW_MS);
    const lat = latestOf("gps.lat");
    const lon = latestOf("gps.lon");
    map.set(
      lat && lon ? [{ id, lat: lat.v, lon: lon.v, online }] : [],
      track.map(([a, b]) => [a, b]),
    );
  });

  /** The latest value of a sensor's first series (a device has one position). */
  function latestOf(sensor: string): Latest | undefined {
    for (const [key, l] of latest) if (api.sensorOf(key) === sensor) return l;
    return undefined;
  }

  function renderValues(now: number): void {
    const names = sortSensors(latest.keys());
    while (values.rows.length > names.length) values.deleteRow(-1);
    names.forEach((name, i) => {
      let tr = values.rows[i];
      if (!tr) {
        tr = h("tr", {}, h("th", { scope: "row" }), h("td", { class: "num" }), h("td", {}, h("time")));
        values.append(tr);
      }
      const l = latest.get(name);
      const [label, val, upd] = [...tr.cells];
      setAttr(tr, "data-testid", `sensor-${name}`);
      if (label) setText(label, sensorLabel(name));
      if (val) setText(val, withUnit(name, l?.v, l?.unit));
      const time = upd?.firstElementChild;
      if (time && l) {
        setAttr(time, "datetime", isoTime(l.t));
        setText(time, ago(l.t, now));
      }
    });
  }

  function chartFor(sensor: string, unit: string | null | undefined): LiveChart {
    let c = charts.get(sensor);
    if (c) return c;
    c = new LiveChart(sensor, unit ?? "", WINDOW_MS);
    charts.set(sensor, c);
    // Keep the charts in the standard sensor order.
    const order = sortSensors(charts.keys());
    const before = charts.get(order[order.indexOf(sensor) + 1] ?? "");
    chartGrid.insertBefore(c.el, before?.el ?? null);
    const chart = c;
    api
      .series(id, sensor, "-10m", abort.signal)
      .then((s) => {
        chart.load(
          s.points.map((p) => [ms(p.ts), p.value]),
          s.source,
        );
        const axis = gpsAxis(sensor);
        if (axis && !history[axis]) history[axis] = s.points;
        if (history["gps.lat"] && history["gps.lon"]) {
          const older = pairFixes(history["gps.lat"], history["gps.lon"]);
          const first = track[0]?.[2] ?? Infinity;
          track = [...older.filter(([, , t]) => t < first), ...track];
        }
        render.request();
      })
      .catch((e: Error) => {
        if (!abort.signal.aborted) chart.failed(e.message);
        render.request();
      });
    return c;
  }
  function record(sensor: string, v: number, t: number, unit: string | null | undefined): void {
    const old = latest.get(sensor);
    if (!old || !(old.t > t)) latest.set(sensor, { v, t, unit: unit ?? old?.unit });
    if (!(lastSeen >= t)) lastSeen = t;
  }

  function onState(s: api.LiveState): void {
    if (s.device !== id) return;
    const t = ms(s.ts);
    const key = api.seriesKey(s.sensor, s.tags);
    record(key, s.value, t, s.unit);
    online = true;
    chartFor(key, s.unit).push(t, s.value, s.unit);
    const axis = gpsAxis(key);
    if (axis) addFix(axis === "gps.lat" ? "lat" : "lon", s.value, t);
    render.request();
  }

  function addFix(axis: "lat" | "lon", v: number, t: number): void {
    pending[axis] = [v, t];
    const { lat, lon } = pending;
    if (lat && lon && Math.abs(lat[1] - lon[1]) <= PAIR_MS) {
      const at = Math.max(lat[1], lon[1]);
      if (!(at <= (track[track.length - 1]?.[2] ?? -Infinity))) track.push([lat[0], lon[0], at]);
      delete pending.lat;
      delete pending.lon;
    }
  }

  const load = async () => {
    try {
      const d = await api.device(id, abort.signal);
      online = d.online;
      if (!(lastSeen >= ms(d.last_seen))) lastSeen = ms(d.last_seen);
      for (const [name, s] of Object.entries(d.sensors ?? {})) {
        record(name, s.value, ms(s.ts), s.unit);
        chartFor(name, s.unit);
      }
      tags.replaceChildren(...Object.entries(d.tags ?? {}).map(([k, v]) => h("li", {}, `${k}: ${v}`)));
      status.hidden = true;
      stopLive ??= api.live({ device: id }, onState, (s) => setLiveStatus(s, s === "live" ? "live" : `${s}…`));
    } catch (e) {
      if (abort.signal.aborted) return;
      const notFound = e instanceof api.ApiError && e.status === 404;
      status.textContent = notFound ? `Unknown device “${id}”: fleetpipe has no readings from it.` : `Cannot load ${id}: ${(e as Error).message}`;
      status.hidden = false;
    }
    render.request();
  };

  // The device record is re-read now and then for its online flag, which only the server knows.
  const timers = [every(10_000, () => void load()), every(1000, () => render.request())];

  return {
    title: id,
    dispose() {
      abort.abort();
      stopLive?.();
      for (const stop of timers) stop();
      render.cancel();
      for (const c of charts.values()) c.dispose();
      map.dispose();
    },
  };
}
