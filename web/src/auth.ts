// Bearer tokens for the API. When the server requires them (`api.auth`), a request without a
// valid one is answered 401: the dashboard then asks for a token, checks it against the API,
// keeps it in sessionStorage (gone when the tab closes, never in localStorage or a cookie)
// and sends it as `Authorization: Bearer …` — on the live stream, which EventSource cannot
// give headers, as `?access_token=`, the one route that takes it there.

import { h } from "./dom";

const KEY = "fleetpipe-token";

let onLogin: (() => void) | undefined;
let dialog: HTMLElement | undefined;

/** The token of this session, if one was given. */
export function token(): string | undefined {
  try {
    return sessionStorage.getItem(KEY) || undefined;
  } catch {
    return undefined; // storage disabled: no session
  }
}

/** Headers that authenticate a request, when the session has a token. */
export function authHeaders(): Record<string, string> {
  const t = token();
  return t ? { authorization: `Bearer ${t}` } : {};
}

/** Runs `f` once a token has been accepted (main re-renders the current view). */
export function setLoginHandler(f: () => void): void {
  onLogin = f;
}

/** The API answered 401: the token is missing, revoked or wrong. Asks for one (once). */
export function unauthorized(): void {
  if (token()) {
    forget();
    showLogin("The token was refused (revoked or expired). Enter another one.");
  } else {
    showLogin();
  }
}

function forget(): void {
  try {
    sessionStorage.removeItem(KEY);
  } catch {
    // nothing stored
  }
  updateLogout();
}

/** Shows or hides the top bar's logout control with the session's token. */
export function updateLogout(): void {
  const button = document.querySelector<HTMLButtonElement>("[data-testid=logout]");
  if (!button) return;
  button.hidden = !token();
  button.onclick = () => {
    forget();
    onLogin?.(); // re-render: a server that needs a token answers 401 and asks for one
  };
}

function showLogin(message?: string): void {
  if (dialog) {
    if (message) setError(message);
    return;
  }
  const input = h("input", {
    type: "password",
    id: "token-input",
    "data-testid": "token-input",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "fpt_…",
    required: true,
  });
  const error = h("p", { class: "login-error", "data-testid": "login-error", role: "alert" });
  const form = h(
    "form",
    { class: "login", "data-testid": "login" },
    h("h1", {}, "Sign in"),
    h(
      "p",
      {},
      "This fleetpipe API needs a token. An administrator creates one with ",
      h("code", {}, "fleetpipe token add NAME --role read"),
      ".",
    ),
    h("label", { for: "token-input" }, "API token"),
    input,
    error,
    h("button", { type: "submit", "data-testid": "login-submit" }, "Sign in"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    void tryToken(input.value.trim());
  });
  dialog = h("div", { class: "login-backdrop", role: "dialog", "aria-modal": "true", "aria-label": "Sign in" }, form);
  document.body.append(dialog);
  if (message) setError(message);
  input.focus();
}

function setError(message: string): void {
  const el = dialog?.querySelector(".login-error");
  if (el) el.textContent = message;
}

/** Checks `t` against the API; keeps it and closes the dialog when it is accepted. */
async function tryToken(t: string): Promise<void> {
  if (!t) return;
  let status = 0;
  try {
    const res = await fetch("api/v1/info", { headers: { accept: "application/json", authorization: `Bearer ${t}` } });
    status = res.status;
  } catch {
    setError("The server cannot be reached; try again.");
    return;
  }
  if (status === 401) return setError("This token is not valid (unknown, revoked or mistyped).");
  if (status !== 200) return setError(`The server answered ${status}; try again.`);
  try {
    sessionStorage.setItem(KEY, t);
  } catch {
    return setError("The browser does not allow session storage; the token cannot be kept.");
  }
  dialog?.remove();
  dialog = undefined;
  updateLogout();
  onLogin?.();
}
