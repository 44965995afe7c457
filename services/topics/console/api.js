// The topics API, called with the key the person entered. The key lives in sessionStorage
// (this tab only) or, when they ask for it, localStorage (this device); it is sent only as
// an Authorization header, never put in a URL and never logged.

const KEY_NAME = "airoboros.console.key";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

export function setKey(key, remember) {
  sessionStorage.setItem(KEY_NAME, key);
  if (remember) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
}

/** An answer other than 2xx, with the API's error envelope read. */
export class ApiError extends Error {
  constructor(status, message, { code = null, problems = [], param = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.problems = problems;
    this.param = param;
  }
}

/** The key was refused (or none is set): the shell shows the key form again. */
export class AuthRequired extends ApiError {}

function authRequired(message) {
  forgetKey();
  const err = new AuthRequired(401, message);
  window.dispatchEvent(new CustomEvent("console:auth-required", { detail: { message } }));
  return err;
}

/** The error of a response that is not ok, from its envelope when it has one. */
export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status text says what there is to say
  }
  const e = body && typeof body === "object" ? body.error || body : {};
  const message =
    (typeof e.message === "string" && e.message) ||
    (typeof e.detail === "string" && e.detail) ||
    `${response.status} ${response.statusText || "error"}`;
  const problems = Array.isArray(e.problems)
    ? e.problems
    : e.details && Array.isArray(e.details.problems)
      ? e.details.problems
      : [];
  if (response.status === 401) return authRequired(message);
  return new ApiError(response.status, message, {
    code: e.code || null,
    problems: problems.map(String),
    param: e.param || null,
  });
}

/**
 * fetch(path) with the key. Returns the Response (ok) for raw use, or throws ApiError.
 * ``options.body`` that is not a string/Blob is sent as JSON.
 */
export async function request(path, options = {}) {
  const key = getKey();
  if (!key) throw authRequired("Enter an API key");
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", `Bearer ${key}`);
  let body = options.body;
  if (body !== undefined && !(typeof body === "string" || body instanceof Blob)) {
    body = JSON.stringify(body);
    headers.set("Content-Type", "application/json");
  }
  let response;
  try {
    response = await fetch(path, {
      method: options.method || "GET",
      headers,
      body,
      signal: options.signal,
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "the topics service cannot be reached (network error)");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** request() and the JSON of its answer. */
export async function json(path, options = {}) {
  const response = await request(path, options);
  return response.json();
}

/** "/v1/jobs?x=1" from a path and the params that are set. */
export function url(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

export const enc = encodeURIComponent;

/** Download an answer as a file: fetch with the header, Blob, object URL, click. */
export async function download(path, fallbackName) {
  const response = await request(path);
  const blob = await response.blob();
  const name = filenameOf(response.headers.get("content-disposition")) || fallbackName;
  const href = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = href;
  a.download = name;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  // Give the browser time to start the download before the URL goes.
  setTimeout(() => URL.revokeObjectURL(href), 10000);
  return { name, bytes: blob.size };
}

export function filenameOf(disposition) {
  if (!disposition) return null;
  const star = /filename\*=UTF-8''([^;]+)/i.exec(disposition);
  if (star) {
    try {
      return decodeURIComponent(star[1]);
    } catch {
      // fall through to the plain name
    }
  }
  const plain = /filename="?([^";]+)"?/i.exec(disposition);
  return plain ? plain[1] : null;
}
