// Small DOM helpers. Text always goes in as text (textContent, never innerHTML), so what
// a row or an error says cannot become markup.

/**
 * h("a", {href: "#/jobs", class: "x"}, "text", child) -> element.
 * Attributes: class, dataset ({...}), on<event> (functions), boolean true/false, else set.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "value" && "value" in el) el.value = value;
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** Replace el's children. */
export function fill(el, ...children) {
  clear(el);
  return append(el, children);
}

/** Set text only when it changed (no needless reflow, nothing re-announced). */
export function setText(el, text) {
  const s = String(text);
  if (el.textContent !== s) el.textContent = s;
}

/** A table in a horizontally scrolling, focusable wrapper (small screens, keyboard). */
export function tableWrap(label, table) {
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": label }, table);
}

/** <thead> with column headers (scope=col); each column "Name" or ["Name", "class"]. */
export function thead(columns) {
  return h(
    "thead",
    {},
    h(
      "tr",
      {},
      columns.map((c) => {
        const [label, cls] = Array.isArray(c) ? c : [c, undefined];
        return h("th", { scope: "col", class: cls }, label);
      }),
    ),
  );
}

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

export function num(n) {
  return n === null || n === undefined ? "—" : integer.format(n);
}

export function money(n) {
  if (n === null || n === undefined) return "—";
  if (n === 0) return "$0";
  if (Math.abs(n) < 0.01) return `$${n.toFixed(4)}`;
  return `$${n.toFixed(2)}`;
}

export function ratio(n, digits = 2) {
  return n === null || n === undefined ? "—" : Number(n).toFixed(digits);
}

export function percent(n) {
  return n === null || n === undefined ? "—" : `${Math.round(n * 100)}%`;
}

/** 75 -> "1m 15s"; null -> "—". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const hrs = Math.floor(m / 60);
  return `${hrs}h ${String(m % 60).padStart(2, "0")}m`;
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(undefined, {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

/** A <time> element for an ISO timestamp. */
export function timeEl(iso) {
  return iso ? h("time", { datetime: iso }, when(iso)) : "—";
}

const FINISHED = new Set(["done", "incomplete", "failed", "cancelled", "budget_exhausted"]);

export function finished(status) {
  return FINISHED.has(status);
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${String(status).replace(/[^a-z_]/g, "")}` }, status);
}

/** Announce a short message to screen readers (the page's one polite live region). */
export function announce(message) {
  const el = document.getElementById("announcer");
  if (!el) return;
  el.textContent = "";
  // A new text node in a fresh task is what screen readers reliably announce.
  setTimeout(() => {
    el.textContent = message;
  }, 30);
}

/** An error message block (role=alert) for an ApiError or any Error. */
export function errorBox(err, prefix = "") {
  const message = err && err.message ? err.message : String(err);
  return h("p", { class: "error", role: "alert" }, prefix ? `${prefix}: ${message}` : message);
}
