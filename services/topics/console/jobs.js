// #/jobs: the jobs with their status and progress, and a new job from a YAML config.

import { ApiError, enc, json, request } from "./api.js";
import {
  announce,
  errorBox,
  fill,
  finished,
  h,
  num,
  setText,
  statusBadge,
  tableWrap,
  thead,
  timeEl,
} from "./dom.js";
import { keyLines, lineOf, splitProblem } from "./yamlkeys.js";

// how many of the newest jobs get their progress fetched (one status call each)
const PROGRESS_OF = 25;
const REFRESH_MS = 4000;
// the largest config file the form reads (the API caps bodies too)
const MAX_FILE_BYTES = 1024 * 1024;

// what the job page shows once, after a job is created (warnings, skipped instructors)
export const created = { id: null, warnings: [], skipped: {} };

const PLACEHOLDER = `model: gpt-4
base_url: http://llm.internal/v1
topics: [space, cooking, history]
instructors:
  general:
    count: 20
  trivia:
    count: 10`;

export function jobs(root) {
  let timer = null;
  let alive = true;
  const listStatus = h("p", { class: "muted", "aria-live": "polite" });
  const listBox = h("div", { class: "jobs-list" });
  const refresh = h("button", { type: "button", onclick: () => load() }, "Refresh");

  root.append(
    h("h1", {}, "Jobs"),
    h(
      "section",
      { "aria-labelledby": "jobs-heading" },
      h(
        "div",
        { class: "section-head" },
        h("h2", { id: "jobs-heading" }, "Recent jobs"),
        refresh,
      ),
      listStatus,
      listBox,
    ),
    newJobForm(),
  );

  async function progressOf(summary) {
    if (typeof summary.rows === "number" && typeof summary.target === "number") return summary;
    try {
      const s = await json(`/v1/jobs/${enc(summary.id)}`);
      const target = Object.values(s.instructors || {}).reduce((a, i) => a + (i.target || 0), 0);
      const accepted = Object.values(s.instructors || {}).reduce(
        (a, i) => a + Math.min(i.accepted || 0, i.target || 0),
        0,
      );
      return { ...summary, status: s.status, accepted, target, rows: s.rows };
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
      return summary;
    }
  }

  async function load() {
    clearTimeout(timer);
    try {
      const list = await json("/v1/jobs");
      const data = list.data || [];
      const withProgress = await Promise.all(
        data.map((j, i) => (i < PROGRESS_OF ? progressOf(j) : j)),
      );
      if (!alive) return;
      render(withProgress);
      setText(listStatus, data.length ? `${data.length} job${data.length === 1 ? "" : "s"}` : "");
      if (withProgress.some((j) => !finished(j.status)) && alive) {
        timer = setTimeout(tick, REFRESH_MS);
      }
    } catch (err) {
      if (!alive) return;
      fill(listBox, errorBox(err, "Cannot list the jobs"));
    }
  }

  function tick() {
    if (document.visibilityState === "visible") load();
    else timer = setTimeout(tick, REFRESH_MS);
  }

  function render(list) {
    if (!list.length) {
      fill(listBox, h("p", {}, "No jobs yet. Create one below."));
      return;
    }
    const table = h(
      "table",
      { class: "jobs-table" },
      h("caption", { class: "visually-hidden" }, "Jobs, newest first"),
      thead([
        ["Job", "col-id"],
        ["Status", "col-status"],
        ["Progress", "col-progress"],
        ["Rows", "col-num"],
        ["Created", "col-time"],
      ]),
      h(
        "tbody",
        {},
        list.map((j) =>
          h(
            "tr",
            { dataset: { job: j.id } },
            h("th", { scope: "row" }, h("a", { href: `#/jobs/${enc(j.id)}` }, j.id)),
            h("td", {}, statusBadge(j.status)),
            h("td", { class: "progress-cell" }, progressBar(j.accepted, j.target)),
            h("td", { class: "num" }, num(j.rows)),
            h("td", {}, timeEl(j.created_at)),
          ),
        ),
      ),
    );
    fill(listBox, tableWrap("Jobs", table));
  }

  load();
  return {
    destroy() {
      alive = false;
      clearTimeout(timer);
    },
  };
}

export function progressBar(accepted, target) {
  if (typeof target !== "number" || !target) return h("span", { class: "muted" }, "—");
  const done = Math.min(accepted || 0, target);
  return h(
    "span",
    { class: "progress" },
    h("progress", { max: String(target), value: String(done), "aria-hidden": "true" }),
    h("span", { class: "progress-text" }, `${num(done)} / ${num(target)}`),
  );
}

function newJobForm() {
  const textarea = h("textarea", {
    id: "job-yaml",
    name: "config",
    rows: "16",
    wrap: "off",
    spellcheck: "false",
    autocomplete: "off",
    placeholder: PLACEHOLDER,
    "aria-describedby": "job-yaml-help job-problems",
  });
  const backdrop = h("div", { class: "yaml-backdrop", "aria-hidden": "true" });
  const file = h("input", {
    id: "job-file",
    name: "file",
    type: "file",
    accept: ".yaml,.yml,.json,application/yaml,application/json,text/yaml,text/plain",
  });
  const submit = h("button", { type: "submit", class: "primary" }, "Create job");
  const status = h("div", { id: "job-problems", class: "form-status", "aria-live": "polite" });
  let marked = new Set();

  function paintBackdrop() {
    const lines = textarea.value.split("\n");
    fill(
      backdrop,
      lines.map((line, i) =>
        h("div", { class: marked.has(i) ? "yaml-line marked" : "yaml-line" }, line || " "),
      ),
    );
    backdrop.scrollTop = textarea.scrollTop;
    backdrop.scrollLeft = textarea.scrollLeft;
  }

  textarea.addEventListener("scroll", () => {
    backdrop.scrollTop = textarea.scrollTop;
    backdrop.scrollLeft = textarea.scrollLeft;
  });
  textarea.addEventListener("input", () => {
    if (marked.size) {
      marked = new Set();
      textarea.removeAttribute("aria-invalid");
    }
    paintBackdrop();
  });

  file.addEventListener("change", async () => {
    const f = file.files && file.files[0];
    if (!f) return;
    if (f.size > MAX_FILE_BYTES) {
      fill(status, errorBox(`${f.name} is larger than 1 MiB`));
      return;
    }
    textarea.value = await f.text();
    marked = new Set();
    paintBackdrop();
    fill(status, h("p", { class: "muted" }, `Loaded ${f.name}; check it, then create the job.`));
  });

  function selectLine(line) {
    const lines = textarea.value.split("\n");
    const start = lines.slice(0, line).reduce((a, l) => a + l.length + 1, 0);
    textarea.focus();
    textarea.setSelectionRange(start, start + (lines[line] || "").length);
    // Bring the line into view: its offset in the box's line height.
    const lineHeight = parseFloat(getComputedStyle(textarea).lineHeight) || 20;
    textarea.scrollTop = Math.max(0, line * lineHeight - textarea.clientHeight / 3);
  }

  function showProblems(err) {
    const text = textarea.value;
    const keys = keyLines(text);
    const problems = err.problems.length ? err.problems : [err.message];
    const items = problems.map((p) => ({ ...splitProblem(p), raw: p }));
    marked = new Set();
    for (const item of items) {
      item.line = item.key ? lineOf(text, item.key, keys) : -1;
      if (item.line >= 0) marked.add(item.line);
    }
    paintBackdrop();
    textarea.setAttribute("aria-invalid", "true");
    const list = h(
      "ul",
      { class: "problems" },
      items.map((item) =>
        h(
          "li",
          { dataset: { key: item.key || "" } },
          item.key
            ? item.line >= 0
              ? h(
                  "button",
                  {
                    type: "button",
                    class: "problem-key",
                    title: `Go to line ${item.line + 1}`,
                    onclick: () => selectLine(item.line),
                  },
                  h("code", {}, item.key),
                  h("span", { class: "line-no" }, ` (line ${item.line + 1})`),
                )
              : h("code", { class: "problem-key" }, item.key)
            : null,
          h("span", { class: "problem-message" }, item.key ? item.message : item.raw),
        ),
      ),
    );
    const n = items.length;
    fill(
      status,
      h(
        "div",
        { class: "error-block", role: "alert" },
        h("p", {}, `The config has ${n} problem${n === 1 ? "" : "s"} (${err.status}):`),
        list,
      ),
    );
  }

  const form = h(
    "form",
    { class: "card new-job", novalidate: true },
    h("h2", { id: "new-job-heading" }, "New job"),
    h(
      "p",
      { id: "job-yaml-help", class: "hint" },
      "Paste an airoboros config (YAML or JSON) or load a file; it is posted as is to " +
        "POST /v1/jobs. Problems are listed by key and their lines marked.",
    ),
    h(
      "div",
      { class: "field" },
      h("label", { for: "job-file" }, "Config file"),
      file,
    ),
    h(
      "div",
      { class: "field" },
      h("label", { for: "job-yaml" }, "Config (YAML)"),
      h("div", { class: "yaml-editor" }, backdrop, textarea),
    ),
    h("div", { class: "actions" }, submit),
    status,
  );
  form.setAttribute("aria-labelledby", "new-job-heading");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!textarea.value.trim()) {
      fill(status, errorBox("Paste a config or load a file first."));
      textarea.focus();
      return;
    }
    submit.disabled = true;
    fill(status, h("p", { class: "muted" }, "Creating…"));
    try {
      const response = await request("/v1/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/yaml" },
        body: textarea.value,
      });
      const body = await response.json();
      created.id = body.id;
      created.warnings = body.warnings || [];
      created.skipped = body.skipped || {};
      announce(`Job ${body.id} created`);
      location.hash = `#/jobs/${enc(body.id)}`;
    } catch (err) {
      if (err instanceof ApiError && (err.status === 422 || err.status === 400)) {
        showProblems(err);
      } else {
        fill(status, errorBox(err, "The job was not created"));
      }
    } finally {
      submit.disabled = false;
    }
  });
  paintBackdrop();
  return form;
}
