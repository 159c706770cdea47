import type UPlot from "uplot";

declare global {
  /** uPlot, from assets/vendor/uPlot.iife.min.js (loaded before app.js). */
  const uPlot: typeof UPlot;

  interface Window {
    /** Optional map tile URL template, `…/{z}/{x}/{y}.png`. */
    FLEETPIPE_TILE_URL?: string;
  }
}
