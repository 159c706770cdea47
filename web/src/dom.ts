// A few DOM helpers; the dashboard needs no framework.

type Attrs = Record<string, string | number | boolean | undefined | ((e: Event) => void)>;
type Child = Node | string | null | undefined | false;

/** Creates an element: `h("a", { href: "#/", class: "x", onclick: f }, "text", child)`. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === "function") el.addEventListener(k.replace(/^on/, ""), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

/** Sets text only when it changed, so frequent re-renders do not touch the layout. */
export function setText(el: Element, text: string): void {
  if (el.textContent !== text) el.textContent = text;
}

export function setAttr(el: Element, name: string, value: string): void {
  if (el.getAttribute(name) !== value) el.setAttribute(name, value);
}

/**
 * Coalesces many `request()` calls into at most one `render()` per `ms`: live streams can
 * deliver thousands of events a second, and the page must stay responsive.
 */
export class Throttle {
  private timer: ReturnType<typeof setTimeout> | undefined;
  private last = 0;

  constructor(
    private readonly ms: number,
    private readonly render: () => void,
  ) {}

  request(): void {
    if (this.timer !== undefined) return;
    const wait = Math.max(0, this.last + this.ms - performance.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.last = performance.now();
      this.render();
    }, wait);
  }

  /** Renders right away, for user actions that should feel instant. */
  now(): void {
    this.cancel();
    this.last = performance.now();
    this.render();
  }

  cancel(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}

/** Runs `f` now and every `ms`; returns a function that stops it. */
export function every(ms: number, f: () => void): () => void {
  f();
  const t = setInterval(f, ms);
  return () => clearInterval(t);
}
