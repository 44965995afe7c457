// The console's shell: the key form, the hash router and the views it mounts.
//   #/jobs                 jobs, and a new job from YAML
//   #/jobs/<id>            a job's live progress, report, dead letters, exports
//   #/jobs/<id>/rows       its rows (?category=&q=)
//   #/experts              the adapter registry and the inference pods
//   #/playground           chat with the router

import { ApiError, forgetKey, getKey, json, setKey } from "./api.js";
import { errorBox, fill, h } from "./dom.js";
import { experts } from "./experts.js";
import { job } from "./job.js";
import { jobs } from "./jobs.js";
import { playground } from "./playground.js";
import { rows } from "./rows.js";

const main = document.getElementById("main");
const signOut = document.getElementById("sign-out");
let current = null; // the mounted view: {destroy()}
let authMessage = "";

/** "#/jobs/abc/rows?q=x" -> {parts: ["jobs", "abc", "rows"], query: URLSearchParams}. */
export function parseHash(hash) {
  const raw = (hash || "").replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?", 2);
  const parts = path
    .split("/")
    .filter(Boolean)
    .map((p) => {
      try {
        return decodeURIComponent(p);
      } catch {
        return p;
      }
    });
  return { parts, query: new URLSearchParams(query) };
}

function resolve({ parts, query }) {
  const [top, id, sub] = parts;
  if (top === "jobs" && id && sub === "rows" && parts.length === 3) {
    return { nav: "jobs", view: rows, args: { id, query } };
  }
  if (top === "jobs" && id && parts.length === 2) return { nav: "jobs", view: job, args: { id } };
  if (top === "jobs" && parts.length === 1) return { nav: "jobs", view: jobs, args: {} };
  if (top === "experts" && parts.length === 1) return { nav: "experts", view: experts, args: {} };
  if (top === "playground" && parts.length === 1) {
    return { nav: "playground", view: playground, args: {} };
  }
  return null;
}

function setNav(name) {
  for (const a of document.querySelectorAll("nav [data-nav]")) {
    if (a.dataset.nav === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function unmount() {
  if (current && current.destroy) current.destroy();
  current = null;
}

function focusHeading() {
  // Where a screen reader or the keyboard starts on a new page: its heading.
  const heading = main.querySelector("h1");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: true });
  }
}

function render(focus = true) {
  unmount();
  if (!getKey()) {
    showKeyForm();
    return;
  }
  signOut.hidden = false;
  const route = resolve(parseHash(location.hash));
  if (!route) {
    if (!location.hash || location.hash === "#" || location.hash === "#/") {
      location.replace("#/jobs");
      return;
    }
    setNav(null);
    fill(
      main,
      h("h1", {}, "Not found"),
      h("p", {}, "There is no such page. ", h("a", { href: "#/jobs" }, "Go to the jobs")),
    );
    if (focus) focusHeading();
    return;
  }
  setNav(route.nav);
  const container = h("div", { class: "view" });
  fill(main, container);
  current = route.view(container, route.args) || null;
  document.title = `${container.querySelector("h1")?.textContent || "airoboros"} · airoboros console`;
  if (focus) focusHeading();
}

function showKeyForm() {
  setNav(null);
  signOut.hidden = true;
  document.title = "API key · airoboros console";
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "api-key-help",
  });
  const remember = h("input", { id: "remember-key", name: "remember", type: "checkbox" });
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  if (authMessage) status.append(errorBox(authMessage));
  const submit = h("button", { type: "submit", class: "primary" }, "Continue");
  const form = h(
    "form",
    { class: "key-form card", novalidate: true },
    h("h1", {}, "API key"),
    h(
      "p",
      { id: "api-key-help", class: "hint" },
      "The key of the topics API (AIROBOROS_API_KEYS). It is sent only in the Authorization " +
        "header and kept for this tab unless you ask to remember it.",
    ),
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input),
    h(
      "div",
      { class: "field checkbox" },
      remember,
      h("label", { for: "remember-key" }, "Remember on this device"),
    ),
    submit,
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      fill(status, errorBox("Enter the key."));
      input.focus();
      return;
    }
    submit.disabled = true;
    setKey(key, remember.checked);
    try {
      await json("/v1/jobs"); // the key is good when the API answers with it
      authMessage = "";
      input.value = "";
      render();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) forgetKey();
      fill(status, errorBox(err.status === 401 ? "That key was refused." : err));
      submit.disabled = false;
      input.focus();
    }
  });
  fill(main, form);
  input.focus();
}

window.addEventListener("console:auth-required", (event) => {
  authMessage = event.detail?.message
    ? `The key was refused (${event.detail.message}). Enter it again.`
    : "Enter an API key.";
  unmount();
  showKeyForm();
});

window.addEventListener("hashchange", () => render());

signOut.addEventListener("click", () => {
  forgetKey();
  authMessage = "";
  unmount();
  showKeyForm();
});

document.getElementById("skip-link").addEventListener("click", (event) => {
  event.preventDefault(); // the hash is the router's: focus main without touching it
  main.focus();
});

render(false);
