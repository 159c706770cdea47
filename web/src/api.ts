// The HTTP API under /api/v1, typed as the server serves it. URLs are relative to the page so
// the dashboard also works behind a reverse proxy that mounts fleetpipe under a path.

import { authHeaders, token, unauthorized } from "./auth";

/**
 * The latest reading of one series. A device's `sensors` are keyed by series label: the
 * sensor name for a series without tags (`speed`), `sensor{k=v,…}` for one with tags, whose
 * entry then also has `sensor` and `tags`.
 */
export interface SensorValue {
  value: number;
  ts: string;
  unit?: string | null;
  sensor?: string;
  tags?: Record<string, string>;
}

export interface Device {
  id: string;
  last_seen: string;
  online: boolean;
  tags: Record<string, string>;
  sensors: Record<string, SensorValue>;
}

export interface DevicePage {
  total: number;
  limit: number;
  offset: number;
  items: Device[];
}

export interface Point {
  ts: string;
  value: number;
}

export interface Series {
  device: string;
  sensor: string;
  tags?: Record<string, string>;
  source: "raw" | "rollup_1m" | "rollup_1h";
  from: string;
  to: string;
  points: Point[];
}

export interface SensorSummary {
  count: number;
  min: number | null;
  avg: number | null;
  max: number | null;
}

export interface FleetSummary {
  devices: number;
  online: number;
  offline: number;
  sensors: Record<string, SensorSummary>;
  dead_letters: number;
}

/** One `state` event of the live stream; `tags` only for a series with tags. */
export interface LiveState {
  device: string;
  sensor: string;
  tags?: Record<string, string>;
  value: number;
  ts: string;
  unit?: string | null;
}

/** Escapes what a label's tags cannot hold bare, as the server does. */
function escapeTag(s: string): string {
  return s.replace(/[\\,={}]/g, (c) => `\\${c}`);
}

/**
 * The label of a series, as the server keys a device's `sensors` with it: the sensor for a
 * series without tags, `sensor{k=v,…}` (tags sorted by name) otherwise.
 */
export function seriesKey(sensor: string, tags?: Record<string, string>): string {
  const names = Object.keys(tags ?? {}).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  if (!tags || names.length === 0) return sensor;
  return `${sensor}{${names.map((k) => `${escapeTag(k)}=${escapeTag(tags[k] ?? "")}`).join(",")}}`;
}

/** The sensor of a series label (`cpu.usage_idle{cpu=cpu0}` → `cpu.usage_idle`). */
export function sensorOf(key: string): string {
  const i = key.indexOf("{");
  return i < 0 ? key : key.slice(0, i);
}

/** An HTTP error with the server's own message (`{"error": …}`). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

async function get<T>(path: string, signal?: AbortSignal): Promise<T> {
  const res = await fetch(`api/v1/${path}`, {
    headers: { accept: "application/json", ...authHeaders() },
    ...(signal ? { signal } : {}),
  });
  if (res.status === 401) unauthorized();
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try {
      const body: unknown = await res.json();
      if (body && typeof body === "object" && "error" in body) message = String(body.error);
    } catch {
      // Not JSON: keep the status line.
    }
    throw new ApiError(res.status, message);
  }
  return (await res.json()) as T;
}

const MAX_PAGE = 10_000;

/** Every device, fetched in pages of the largest size the API allows. */
export async function allDevices(signal?: AbortSignal): Promise<Device[]> {
  const out: Device[] = [];
  for (let offset = 0; ; offset += MAX_PAGE) {
    const page = await get<DevicePage>(`devices?sort=id&limit=${MAX_PAGE}&offset=${offset}`, signal);
    out.push(...page.items);
    if (page.items.length === 0 || out.length >= page.total) return out;
  }
}

export function device(id: string, signal?: AbortSignal): Promise<Device> {
  return get<Device>(`devices/${encodeURIComponent(id)}`, signal);
}

/** The history of one series: `sensor` is a name or a series label (`cpu{cpu=cpu0}`), encoded here. */
export function series(id: string, sensor: string, from: string, signal?: AbortSignal): Promise<Series> {
  const q = new URLSearchParams({ sensor, from });
  return get<Series>(`devices/${encodeURIComponent(id)}/series?${q}`, signal);
}

export function fleetSummary(signal?: AbortSignal): Promise<FleetSummary> {
  return get<FleetSummary>("fleet/summary", signal);
}

export type LiveStatus = "connecting" | "live" | "reconnecting";

/**
 * Subscribes to the live stream. `onState` runs for every event, so it should only record
 * the value and leave rendering to a throttled renderer. EventSource reconnects by itself;
 * `onStatus` reports it. `onLagged` runs when the server dropped events for this client.
 * Returns a function that closes the stream.
 */
export function live(
  filter: { device?: string; sensors?: string[] },
  onState: (s: LiveState) => void,
  onStatus: (s: LiveStatus) => void,
  onLagged?: () => void,
): () => void {
  const q = new URLSearchParams();
  if (filter.device) q.set("device", filter.device);
  if (filter.sensors?.length) q.set("sensor", filter.sensors.join(","));
  // EventSource cannot send headers: the live route alone takes the token in its query.
  const t = token();
  if (t) q.set("access_token", t);
  let es: EventSource | undefined;
  let retry: ReturnType<typeof setTimeout> | undefined;
  const connect = () => {
    const source = new EventSource(`api/v1/live?${q}`);
    es = source;
    onStatus("connecting");
    source.onopen = () => onStatus("live");
    source.onerror = () => {
      onStatus("reconnecting");
      // EventSource retries network errors itself but gives up on an HTTP error status.
      if (source.readyState === EventSource.CLOSED) retry = setTimeout(connect, 3000);
    };
    source.addEventListener("state", (e) => {
      try {
        const s = JSON.parse((e as MessageEvent<string>).data) as LiveState;
        if (typeof s.device === "string" && typeof s.sensor === "string" && Number.isFinite(s.value)) onState(s);
      } catch {
        // A malformed event is dropped; the next one carries a newer value anyway.
      }
    });
    // The server skipped events because this client read too slowly.
    source.addEventListener("lagged", () => onLagged?.());
  };
  connect();
  return () => {
    clearTimeout(retry);
    es?.close();
  };
}
