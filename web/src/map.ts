// A map of positions drawn on a canvas, so it works with no tile server and no network:
// an equirectangular projection fitted to the points' bounding box, a light graticule and
// a scale bar. With a tile URL configured it switches to Web Mercator (the tiles'
// projection) and draws the tiles underneath.

import { h, setAttr } from "./dom";

export interface Marker {
  id: string;
  lat: number;
  lon: number;
  online: boolean;
  /** Drawn faintly, e.g. when a search filters the device out. */
  dim?: boolean;
}

export interface MapOptions {
  testid: string;
  label: string;
  /** Called with a marker's id when it is clicked. */
  onPick?: (id: string) => void;
  /** `https://…/{z}/{x}/{y}.png`; empty for no tiles. */
  tileUrl?: string;
}

/** World coordinates are degree-like units, x east and y south. */
interface Projection {
  x(lon: number): number;
  y(lat: number): number;
  /** Kilometres per world unit at latitude `lat`. */
  kmPerUnit(lat: number): number;
  lat(y: number): number;
}

const KM_PER_DEG = 111.32;
const RAD = Math.PI / 180;

function equirectangular(lat0: number): Projection {
  const k = Math.cos(lat0 * RAD);
  return { x: (lon) => lon * k, y: (lat) => -lat, kmPerUnit: () => KM_PER_DEG, lat: (y) => -y };
}

const mercator: Projection = {
  x: (lon) => lon,
  y: (lat) => -Math.log(Math.tan(Math.PI / 4 + (Math.max(-85, Math.min(85, lat)) * RAD) / 2)) / RAD,
  kmPerUnit: (lat) => KM_PER_DEG * Math.cos(lat * RAD),
  lat: (y) => (2 * Math.atan(Math.exp(-y * RAD)) - Math.PI / 2) / RAD,
};

/** The visible window: world point (cx, cy) at the canvas centre, `upp` world units per CSS px. */
interface View {
  cx: number;
  cy: number;
  upp: number;
}

/** 1, 2 or 5 times a power of ten, the largest not above `x`. */
function niceFloor(x: number): number {
  const p = 10 ** Math.floor(Math.log10(x));
  const m = x / p;
  return (m >= 5 ? 5 : m >= 2 ? 2 : 1) * p;
}

/** 1, 2 or 5 times a power of ten, the smallest not below `x`. */
function niceCeil(x: number): number {
  const p = 10 ** Math.floor(Math.log10(x));
  const m = x / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

export class MapView {
  readonly el: HTMLElement;
  private readonly canvas: HTMLCanvasElement;
  private readonly caption: HTMLElement;
  private readonly ctx: CanvasRenderingContext2D;
  private readonly resize: ResizeObserver;
  private markers: Marker[] = [];
  private track: Array<[number, number]> = [];
  private proj: Projection;
  private view: View | undefined;
  private width = 0;
  private height = 0;
  /** Screen positions of the markers as drawn, for picking. */
  private screen = new Float32Array(0);
  private readonly tiles: Map<string, HTMLImageElement> = new Map();
  private frame = 0;

  constructor(private readonly opts: MapOptions) {
    this.proj = opts.tileUrl ? mercator : equirectangular(0);
    this.canvas = h("canvas", { "data-testid": opts.testid, "data-points": 0, role: "img", "aria-label": opts.label });
    this.caption = h("p", { class: "map-caption" });
    this.el = h("figure", { class: "map" }, this.canvas, this.caption);
    const ctx = this.canvas.getContext("2d");
    if (!ctx) throw new Error("canvas 2D context unavailable");
    this.ctx = ctx;
    this.resize = new ResizeObserver(() => this.fitCanvas());
    this.resize.observe(this.canvas);
    if (opts.onPick) {
      this.canvas.addEventListener("click", (e) => {
        const id = this.pick(e);
        if (id) opts.onPick?.(id);
      });
      this.canvas.addEventListener("mousemove", (e) => {
        const id = this.pick(e);
        this.canvas.style.cursor = id ? "pointer" : "";
        this.canvas.title = id ?? "";
      });
    }
  }

  /** Replaces what is drawn; `track` is a list of [lat, lon]. */
  set(markers: Marker[], track: Array<[number, number]> = []): void {
    this.markers = markers;
    this.track = track;
    this.requestDraw();
  }

  dispose(): void {
    this.resize.disconnect();
    cancelAnimationFrame(this.frame);
    for (const img of this.tiles.values()) img.onload = null;
    this.tiles.clear();
  }

  private requestDraw(): void {
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.draw();
      });
    }
  }

  private fitCanvas(): void {
    const r = this.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    this.width = r.width;
    this.height = r.height;
    this.canvas.width = Math.round(r.width * dpr);
    this.canvas.height = Math.round(r.height * dpr);
    this.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    this.view = undefined;
    this.draw();
  }

  /**
   * Fits the view to the data, keeping the current one while everything is inside it and
   * still fills a fair part of it, so the map does not jitter as vehicles move.
   */
  private fit(points: Array<[number, number]>): void {
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    let latSum = 0;
    for (const [lat] of points) latSum += lat;
    if (!this.opts.tileUrl && !this.view && points.length) this.proj = equirectangular(latSum / points.length);
    for (const [lat, lon] of points) {
      const x = this.proj.x(lon);
      const y = this.proj.y(lat);
      x0 = Math.min(x0, x);
      x1 = Math.max(x1, x);
      y0 = Math.min(y0, y);
      y1 = Math.max(y1, y);
    }
    const minSpan = 0.01; // about a kilometre
    const w = Math.max(x1 - x0, minSpan) * 1.15;
    const hgt = Math.max(y1 - y0, minSpan) * 1.15;
    const upp = Math.max(w / this.width, hgt / this.height);
    const v = this.view;
    if (v) {
      // Inside the view with a margin, so markers are never cut by the edge.
      const halfW = (v.upp * this.width) / 2 - 10 * v.upp;
      const halfH = (v.upp * this.height) / 2 - 10 * v.upp;
      const inside = x0 >= v.cx - halfW && x1 <= v.cx + halfW && y0 >= v.cy - halfH && y1 <= v.cy + halfH;
      if (inside && upp > v.upp * 0.5) return;
    }
    this.view = { cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, upp };
  }

  private draw(): void {
    const { ctx, width: W, height: H } = this;
    if (W <= 0 || H <= 0) return;
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "#f7f9fb";
    ctx.fillRect(0, 0, W, H);

    const positions: Array<[number, number]> = this.markers.map((m) => [m.lat, m.lon]);
    for (const p of this.track) positions.push(p);
    if (positions.length) this.fit(positions);
    const v = this.view;
    setAttr(this.canvas, "data-points", String(v ? this.markers.length : 0));
    setAttr(this.canvas, "data-track", String(v ? this.track.length : 0));
    if (!v) {
      this.caption.textContent = "No positions yet.";
      return;
    }
    const sx = (lon: number) => (this.proj.x(lon) - v.cx) / v.upp + W / 2;
    const sy = (lat: number) => (this.proj.y(lat) - v.cy) / v.upp + H / 2;

    if (this.opts.tileUrl) this.drawTiles(v);
    this.drawGrid(v, sx, sy);
    this.drawTrack(sx, sy);
    this.drawMarkers(sx, sy);
    this.drawScale(v);

    const online = this.markers.filter((m) => m.online).length;
    const what = this.markers.length === 1 ? "position" : "positions";
    this.caption.textContent =
      `${this.markers.length} ${what}` +
      (this.markers.length > 1 ? ` · ${online} online, ${this.markers.length - online} offline` : "") +
      (this.track.length ? ` · track of ${this.track.length} fixes` : "") +
      (this.opts.tileUrl ? ` · tiles from ${new URL(this.opts.tileUrl, location.href).host}` : "");
    setAttr(this.canvas, "aria-label", `${this.opts.label}: ${this.caption.textContent}`);
  }

  private drawGrid(v: View, sx: (lon: number) => number, sy: (lat: number) => number): void {
    const { ctx, width: W, height: H } = this;
    const latTop = this.proj.lat(v.cy - (v.upp * H) / 2);
    const latBottom = this.proj.lat(v.cy + (v.upp * H) / 2);
    const k = this.proj.x(1) - this.proj.x(0);
    const lonLeft = (v.cx - (v.upp * W) / 2) / k;
    const lonRight = (v.cx + (v.upp * W) / 2) / k;
    // Lines at least ~60 px (latitude) and ~90 px (longitude, wider labels) apart.
    const latStep = niceCeil(((latTop - latBottom) * 60) / H);
    const lonStep = niceCeil(((lonRight - lonLeft) * 90) / W);
    const decimals = (step: number) => Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    ctx.strokeStyle = "#dde3ea";
    ctx.lineWidth = 1;
    ctx.fillStyle = "#6b7785";
    ctx.font = "11px system-ui, sans-serif";
    ctx.beginPath();
    for (let i = Math.ceil(latBottom / latStep); i * latStep <= latTop; i++) {
      const lat = i * latStep;
      const y = Math.round(sy(lat)) + 0.5;
      ctx.moveTo(0, y);
      ctx.lineTo(W, y);
      if (y > 14 && y < H - 20) ctx.fillText(`${lat.toFixed(decimals(latStep))}°`, 4, y - 3);
    }
    for (let i = Math.ceil(lonLeft / lonStep); i * lonStep <= lonRight; i++) {
      const lon = i * lonStep;
      const x = Math.round(sx(lon)) + 0.5;
      ctx.moveTo(x, 0);
      ctx.lineTo(x, H);
      if (x > 50 && x < W - 40) ctx.fillText(`${lon.toFixed(decimals(lonStep))}°`, x + 3, H - 4);
    }
    ctx.stroke();
  }

  private drawTrack(sx: (lon: number) => number, sy: (lat: number) => number): void {
    if (this.track.length < 2) return;
    const { ctx } = this;
    ctx.strokeStyle = "#7aa7e6";
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    this.track.forEach(([lat, lon], i) => (i ? ctx.lineTo(sx(lon), sy(lat)) : ctx.moveTo(sx(lon), sy(lat))));
    ctx.stroke();
  }

  private drawMarkers(sx: (lon: number) => number, sy: (lat: number) => number): void {
    const { ctx } = this;
    const n = this.markers.length;
    if (this.screen.length !== n * 2) this.screen = new Float32Array(n * 2);
    // Big fleets get squares: arcs cost too much at tens of thousands per frame.
    const r = n > 5000 ? 1.5 : n === 1 ? 6 : 4;
    const pass = (dim: boolean) => {
      for (let i = 0; i < n; i++) {
        const m = this.markers[i];
        if (!m || !!m.dim !== dim) continue;
        const x = sx(m.lon);
        const y = sy(m.lat);
        this.screen[2 * i] = x;
        this.screen[2 * i + 1] = y;
        ctx.fillStyle = m.online ? "#1668c7" : "#8a939d";
        ctx.globalAlpha = dim ? 0.2 : 0.9;
        if (n > 5000) {
          ctx.fillRect(x - r, y - r, 2 * r, 2 * r);
        } else {
          ctx.beginPath();
          ctx.arc(x, y, r, 0, 2 * Math.PI);
          ctx.fill();
          if (n === 1) {
            ctx.strokeStyle = "#fff";
            ctx.lineWidth = 2;
            ctx.stroke();
          }
        }
      }
    };
    pass(true);
    pass(false);
    ctx.globalAlpha = 1;
  }

  private drawScale(v: View): void {
    const { ctx, width: W, height: H } = this;
    const midLat = this.proj.lat(v.cy);
    const kmPerPx = v.upp * this.proj.kmPerUnit(midLat);
    const km = niceFloor(kmPerPx * 120);
    const px = km / kmPerPx;
    const x = W - px - 14;
    const y = H - 22;
    ctx.fillStyle = "rgba(255,255,255,0.8)";
    ctx.fillRect(x - 4, y - 16, px + 8, 24);
    ctx.strokeStyle = "#33404d";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(x, y - 4);
    ctx.lineTo(x, y);
    ctx.lineTo(x + px, y);
    ctx.lineTo(x + px, y - 4);
    ctx.stroke();
    ctx.fillStyle = "#33404d";
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText(km >= 1 ? `${km} km` : `${Math.round(km * 1000)} m`, x + 2, y - 6);
  }

  /** Slippy-map tiles (Web Mercator, 256 px), loaded lazily and cached per map. */
  private drawTiles(v: View): void {
    const template = this.opts.tileUrl;
    if (!template) return;
    const { ctx, width: W, height: H } = this;
    const z = Math.max(0, Math.min(19, Math.round(Math.log2(360 / (256 * v.upp)))));
    const n = 2 ** z;
    const size = 360 / n; // world units per tile
    const left = v.cx - (v.upp * W) / 2;
    const top = v.cy - (v.upp * H) / 2;
    const tx0 = Math.floor((left + 180) / size);
    const ty0 = Math.max(0, Math.floor((top + 180) / size));
    const tx1 = Math.floor((left + v.upp * W + 180) / size);
    const ty1 = Math.min(n - 1, Math.floor((top + v.upp * H + 180) / size));
    if (this.tiles.size > 512) this.tiles.clear();
    for (let ty = ty0; ty <= ty1; ty++) {
      for (let tx = tx0; tx <= tx1; tx++) {
        const wx = ((tx % n) + n) % n;
        const url = template.replace("{z}", String(z)).replace("{x}", String(wx)).replace("{y}", String(ty));
        let img = this.tiles.get(url);
        if (!img) {
          img = new Image();
          img.onload = () => this.requestDraw();
          img.src = url;
          this.tiles.set(url, img);
        }
        if (!img.complete || !img.naturalWidth) continue;
        const x = (tx * size - 180 - left) / v.upp;
        const y = (ty * size - 180 - top) / v.upp;
        ctx.drawImage(img, x, y, size / v.upp + 0.5, size / v.upp + 0.5);
      }
    }
  }

  private pick(e: MouseEvent): string | undefined {
    const r = this.canvas.getBoundingClientRect();
    const x = e.clientX - r.left;
    const y = e.clientY - r.top;
    let best: string | undefined;
    let bestD = 8 * 8;
    for (let i = 0; i < this.markers.length; i++) {
      const dx = (this.screen[2 * i] ?? NaN) - x;
      const dy = (this.screen[2 * i + 1] ?? NaN) - y;
      const d = dx * dx + dy * dy;
      if (d < bestD) {
        bestD = d;
        best = this.markers[i]?.id;
      }
    }
    return best;
  }
}
