// What every view shares: the view contract, the live indicator in the top bar and the
// optional tile URL.

/** A mounted view; `dispose` closes its streams and timers. */
export interface View {
  title: string;
  dispose(): void;
}

/** Shows the state of the live stream in the top bar (`data-state` for tests and CSS). */
export function setLiveStatus(state: string, text: string): void {
  const el = document.querySelector<HTMLElement>("[data-testid=live-status]");
  if (!el) return;
  if (el.dataset["state"] !== state) el.dataset["state"] = state;
  if (el.textContent !== text) el.textContent = text;
}

/** The map tile URL template, if the page configures one; by default there is none. */
export function tileUrl(): string {
  const meta = document.querySelector<HTMLMetaElement>('meta[name="fleetpipe-tile-url"]');
  return (window.FLEETPIPE_TILE_URL || meta?.content || "").trim();
}
