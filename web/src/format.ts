// Number, time and sensor formatting shared by the views. Sensors may be series labels
// (`speed{site=munich}`, `cpu.usage_idle{cpu=cpu0}`): they format as their sensor does.

import { sensorOf } from "./api";

/** Display order of the simulator's sensors; others follow alphabetically. */
const SENSOR_ORDER = ["speed", "soc", "torque", "gps.lat", "gps.lon"];

const LABELS: Record<string, string> = {
  speed: "Speed",
  soc: "State of charge",
  torque: "Torque",
  "gps.lat": "Latitude",
  "gps.lon": "Longitude",
};

/** Units for the simulator's sensors, used when a reading carries none. */
const UNITS: Record<string, string> = { speed: "km/h", soc: "%", torque: "Nm", "gps.lat": "°", "gps.lon": "°" };

export function sensorLabel(key: string): string {
  const sensor = sensorOf(key);
  const name = LABELS[sensor];
  return name ? `${name}${key.slice(sensor.length) ? ` ${key.slice(sensor.length)}` : ""}` : key;
}

export function sensorUnit(key: string, unit?: string | null): string {
  return unit || UNITS[sensorOf(key)] || "";
}

export function sortSensors(sensors: Iterable<string>): string[] {
  const rank = (s: string) => {
    const i = SENSOR_ORDER.indexOf(sensorOf(s));
    return i < 0 ? SENSOR_ORDER.length : i;
  };
  return [...sensors].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

const intFmt = new Intl.NumberFormat("en-US");

export function int(n: number): string {
  return intFmt.format(n);
}

/** A value with sensible precision: coordinates to 5 decimals, the rest to 1. */
export function value(sensor: string, v: number | null | undefined): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  if (sensorOf(sensor).startsWith("gps.")) return v.toFixed(5);
  return Math.abs(v) >= 1000 ? intFmt.format(Math.round(v)) : v.toFixed(1);
}

export function withUnit(sensor: string, v: number | null | undefined, unit?: string | null): string {
  const u = sensorUnit(sensor, unit);
  const s = value(sensor, v);
  if (s === "–" || !u) return s;
  return u === "%" || u === "°" ? `${s}${u}` : `${s} ${u}`;
}

/** Milliseconds since the epoch, or NaN. */
export function ms(ts: string | undefined): number {
  return ts ? Date.parse(ts) : NaN;
}

/** "4 s ago", "3 min ago", "2 h ago", or a date for older times. */
export function ago(t: number, now = Date.now()): string {
  if (!Number.isFinite(t)) return "never";
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(t).toISOString().slice(0, 10);
}

export function isoTime(t: number): string {
  return Number.isFinite(t) ? new Date(t).toISOString() : "";
}
