// A live time-series chart of one sensor (uPlot, loaded as a global from
// assets/vendor/uPlot.iife.min.js). Points arrive at any rate through `push`; `flush`, run
// by a throttled renderer, trims the window and redraws once.

import type UPlot from "uplot";
import { sensorOf } from "./api";
import { h, setAttr, setText } from "./dom";
import { sensorLabel, sensorUnit, value } from "./format";

const COLORS: Record<string, string> = {
  speed: "#1668c7",
  soc: "#1a7f37",
  torque: "#b35900",
  "gps.lat": "#7048b6",
  "gps.lon": "#a0307a",
};

/** Most points kept per chart, whatever the rate. */
const MAX_POINTS = 20_000;

/** Tick labels with as many decimals as the tick spacing needs (GPS noise is 1e-5°). */
function ticks(splits: number[], incr: number): string[] {
  const decimals = Math.min(6, Math.max(0, -Math.floor(Math.log10(incr) + 1e-9)));
  return splits.map((v) => v.toFixed(decimals));
}

const hms = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
const hm = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

/** Time ticks as a clock: seconds only when ticks are less than a minute apart. */
function clock(seconds: number, incr: number): string {
  return (incr < 60 ? hms : hm).format(seconds * 1000);
}

export class LiveChart {
  readonly el: HTMLElement;
  private readonly plotEl: HTMLElement;
  private readonly titleEl: HTMLElement;
  private readonly note: HTMLElement;
  /** The latest value, or the one under the cursor. */
  private readonly readout: HTMLElement;
  private hovering = false;
  private readonly resize: ResizeObserver;
  private plot: UPlot | undefined;
  /** Seconds since the epoch, ascending, as uPlot wants them. */
  private xs: number[] = [];
  private ys: number[] = [];
  /** Live points that arrived before the history did. */
  private early: Array<[number, number]> | undefined = [];
  private dirty = false;

  constructor(
    readonly sensor: string,
    private unit: string,
    private readonly windowMs: number,
  ) {
    this.plotEl = h("div", { class: "chart-plot" });
    this.titleEl = h("span", {}, this.title());
    this.note = h("span", { class: "chart-note" }, "loading…");
    this.readout = h("span", { class: "chart-readout", "aria-live": "off" });
    this.el = h(
      "section",
      { class: "chart", "data-testid": `chart-${sensor}`, "data-points": 0, "aria-label": `${sensorLabel(sensor)} chart` },
      h("h3", {}, this.titleEl, " ", this.note, this.readout),
      this.plotEl,
    );
    this.resize = new ResizeObserver(() => this.fitSize());
    this.resize.observe(this.plotEl);
  }

  /** Sets the history; live points received meanwhile are kept when newer. */
  load(points: Array<[number, number]>, source: string): void {
    const sorted = points.filter(([t, v]) => Number.isFinite(t) && Number.isFinite(v)).sort((a, b) => a[0] - b[0]);
    this.xs = sorted.map(([t]) => t / 1000);
    this.ys = sorted.map(([, v]) => v);
    const early = this.early ?? [];
    this.early = undefined;
    for (const [t, v] of early) this.push(t, v);
    setText(this.note, source === "raw" ? "" : `(${source.replace("_", " ")})`);
    this.dirty = true;
  }

  /** Shows that the history could not be loaded; live points still arrive. */
  failed(message: string): void {
    this.load([], "raw");
    setText(this.note, `(history unavailable: ${message})`);
  }

  /** Appends a live point (milliseconds, value); older or repeated times are ignored. */
  push(t: number, v: number, unit?: string | null): void {
    if (unit && unit !== this.unit) {
      this.unit = unit;
      setText(this.titleEl, this.title());
    }
    if (this.early) {
      this.early.push([t, v]);
      return;
    }
    const s = t / 1000;
    const last = this.xs[this.xs.length - 1];
    if (last !== undefined && s <= last) return;
    this.xs.push(s);
    this.ys.push(v);
    this.dirty = true;
  }

  /** Drops points older than the window and redraws if anything changed. */
  flush(now = Date.now()): void {
    const cutoff = (now - this.windowMs) / 1000;
    let drop = 0;
    while (drop < this.xs.length && (this.xs[drop] ?? 0) < cutoff) drop++;
    drop = Math.max(drop, this.xs.length - MAX_POINTS);
    if (drop > 0) {
      this.xs.splice(0, drop);
      this.ys.splice(0, drop);
      this.dirty = true;
    }
    if (!this.dirty) return;
    this.dirty = false;
    const data: UPlot.AlignedData = [this.xs, this.ys];
    if (this.plot) {
      this.plot.setData(data);
    } else if (this.plotEl.clientWidth > 0) {
      this.plot = new uPlot(this.options(this.plotEl.clientWidth), data, this.plotEl);
    } else {
      this.dirty = true; // not laid out yet; draw on the next flush
    }
    setAttr(this.el, "data-points", String(this.plot ? this.xs.length : 0));
    if (!this.hovering) setText(this.readout, this.xs.length ? value(this.sensor, this.ys[this.ys.length - 1]) : "");
  }

  dispose(): void {
    this.resize.disconnect();
    this.plot?.destroy();
    this.plot = undefined;
  }

  private title(): string {
    const unit = sensorUnit(this.sensor, this.unit);
    return unit ? `${sensorLabel(this.sensor)} (${unit})` : sensorLabel(this.sensor);
  }

  private fitSize(): void {
    if (this.plot && this.plotEl.clientWidth > 0) {
      this.plot.setSize({ width: this.plotEl.clientWidth, height: 170 });
    } else {
      this.flush();
    }
  }

  private showCursor(u: UPlot): void {
    const i = u.cursor.idx;
    const x = i === null || i === undefined ? undefined : this.xs[i];
    this.hovering = x !== undefined;
    if (x === undefined) {
      setText(this.readout, this.xs.length ? value(this.sensor, this.ys[this.ys.length - 1]) : "");
      return;
    }
    const time = new Date(x * 1000).toLocaleTimeString();
    setText(this.readout, `${value(this.sensor, this.ys[i ?? 0])} at ${time}`);
  }

  private options(width: number): UPlot.Options {
    const color = COLORS[sensorOf(this.sensor)] ?? "#33404d";
    const axis: UPlot.Axis = {
      stroke: "#55606b",
      grid: { stroke: "#e6eaef", width: 1 },
      ticks: { stroke: "#e6eaef", width: 1 },
      font: "11px system-ui, sans-serif",
    };
    return {
      width,
      height: 170,
      scales: { x: { time: true } },
      series: [
        {},
        {
          label: sensorLabel(this.sensor),
          stroke: color,
          width: 1.5,
          fill: `${color}14`,
          points: { show: false },
          value: (_u, v) => (v === null ? "–" : value(this.sensor, v)),
        },
      ],
      axes: [
        { ...axis, space: 70, size: 30, values: (_u, splits, _axis, _space, incr) => splits.map((s) => clock(s, incr)) },
        { ...axis, size: 64, values: (_u, splits, _axis, _space, incr) => ticks(splits, incr) },
      ],
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      hooks: { setCursor: [(u) => this.showCursor(u)] },
    };
  }
}
