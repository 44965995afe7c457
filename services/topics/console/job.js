// #/jobs/<id>: live progress per instructor (polled while the page is visible and the job
// runs), cancel and resume, dead letters, the quality report and the exports.

import { ApiError, download, enc, json, url } from "./api.js";
import {
  errorBox,
  fill,
  finished,
  h,
  money,
  num,
  percent,
  ratio,
  setText,
  statusBadge,
  tableWrap,
  thead,
  timeEl,
  duration,
} from "./dom.js";
import { created } from "./jobs.js";

const POLL_MS = 1500;
// the accept rate is measured over this much of the recent past (seconds)
const RATE_WINDOW_S = 60;
export const FORMATS = [
  ["airoboros", "airoboros JSONL"],
  ["sharegpt", "ShareGPT JSONL"],
  ["alpaca", "Alpaca JSONL"],
  ["openai", "OpenAI chat JSONL"],
  ["parquet", "Parquet"],
];
const RESUMABLE = new Set(["incomplete", "failed", "cancelled"]);

/** ETA from the accept rate of recent samples [{t (s), accepted}], or null. */
export function eta(samples, accepted, target) {
  if (accepted >= target) return 0;
  if (samples.length < 2) return null;
  const first = samples[0];
  const last = samples[samples.length - 1];
  const dt = last.t - first.t;
  const rate = dt > 0 ? (last.accepted - first.accepted) / dt : 0;
  if (rate <= 0) return null;
  return (target - accepted) / rate;
}

export function job(root, { id }) {
  let alive = true;
  let timer = null;
  let last = null; // the last status
  let reportLoaded = false;
  const samples = new Map(); // instructor -> [{t, accepted}]
  const rowsOf = new Map(); // instructor -> {tr, cells}

  const summary = h("p", { class: "job-summary" });
  // What a screen reader hears while the job runs: its status and progress in tenths, not
  // every count of every poll.
  const live = h("p", { class: "visually-hidden", "aria-live": "polite", "aria-atomic": "true" });
  const statusEl = h("span", { class: "job-status" });
  const facts = h("dl", { class: "facts" });
  const flash = h("div", { class: "flash" });
  const actionsStatus = h("div", { class: "form-status", "aria-live": "polite" });
  const cancelBtn = h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel job");
  const resumeBtn = h("button", { type: "button", onclick: resume }, "Resume job");
  cancelBtn.hidden = resumeBtn.hidden = true; // until the job's status is known
  const progressBody = h("tbody");
  const progressTable = h(
    "table",
    { class: "progress-table" },
    h("caption", { class: "visually-hidden" }, "Progress per instructor"),
    h(
      "colgroup",
      {},
      h("col", { class: "w-name" }),
      h("col", { class: "w-progress" }),
      h("col", { class: "w-num" }),
      h("col", { class: "w-num" }),
      h("col", { class: "w-num" }),
      h("col", { class: "w-num" }),
      h("col", { class: "w-money" }),
      h("col", { class: "w-eta" }),
      h("col", { class: "w-state" }),
    ),
    thead([
      "Instructor",
      "Accepted / target",
      ["Duplicates", "num"],
      ["Filtered", "num"],
      ["Refusals", "num"],
      ["In flight", "num"],
      ["Cost", "num"],
      ["ETA", "num"],
      "State",
    ]),
    progressBody,
  );
  const deadBox = h("div");
  const reportBox = h("div");
  const expertsBox = h("div");
  const exportStatus = h("div", { class: "form-status", "aria-live": "polite" });
  const pollError = h("div", { "aria-live": "assertive" });

  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", h("span", {}, id)),
    h("h1", {}, "Job ", h("code", { class: "job-id" }, id), " ", statusEl),
    flash,
    summary,
    live,
    pollError,
    facts,
    h(
      "div",
      { class: "actions" },
      cancelBtn,
      resumeBtn,
      h("a", { class: "button", href: `#/jobs/${enc(id)}/rows` }, "Browse rows"),
    ),
    actionsStatus,
    h(
      "section",
      { "aria-labelledby": "progress-heading" },
      h("h2", { id: "progress-heading" }, "Progress"),
      tableWrap("Progress per instructor", progressTable),
    ),
    h(
      "section",
      { "aria-labelledby": "export-heading" },
      h("h2", { id: "export-heading" }, "Export"),
      h(
        "p",
        { class: "hint" },
        "Rows marked bad are left out. Each download is the job's rows in that format.",
      ),
      h(
        "div",
        { class: "actions export-buttons" },
        FORMATS.map(([fmt, label]) =>
          h(
            "button",
            {
              type: "button",
              dataset: { format: fmt },
              onclick: (e) => exportAs(fmt, e.currentTarget),
            },
            `Download ${label}`,
          ),
        ),
      ),
      exportStatus,
    ),
    h(
      "section",
      { "aria-labelledby": "report-heading" },
      h(
        "div",
        { class: "section-head" },
        h("h2", { id: "report-heading" }, "Quality report"),
        h("button", { type: "button", onclick: () => loadReport() }, "Refresh report"),
      ),
      reportBox,
    ),
    h(
      "section",
      { "aria-labelledby": "dead-heading" },
      h("h2", { id: "dead-heading" }, "Dead letters"),
      deadBox,
    ),
    expertsBox,
  );

  if (created.id === id && (created.warnings.length || Object.keys(created.skipped).length)) {
    fill(
      flash,
      h(
        "div",
        { class: "notice", role: "status" },
        h("p", {}, "Created, with notes:"),
        h(
          "ul",
          {},
          created.warnings.map((w) => h("li", {}, w)),
          Object.entries(created.skipped).map(([k, v]) => h("li", {}, h("code", {}, k), `: ${v}`)),
        ),
      ),
    );
    created.id = null;
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const s = await json(`/v1/jobs/${enc(id)}`);
      if (!alive) return;
      fill(pollError);
      update(s);
    } catch (err) {
      if (!alive) return;
      if (err instanceof ApiError && err.status === 404) {
        fill(root, h("h1", {}, "No such job"), h("p", {}, `There is no job ${id} for this key.`));
        alive = false;
        return;
      }
      if (err instanceof ApiError && err.status === 401) return;
      fill(pollError, errorBox(err, "Cannot read the job (retrying)"));
    }
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    if (!alive || !last || finished(last.status)) return;
    if (document.visibilityState === "visible") timer = setTimeout(poll, POLL_MS);
  }

  function onVisibility() {
    if (document.visibilityState === "visible" && alive && last && !finished(last.status)) poll();
    else clearTimeout(timer);
  }
  document.addEventListener("visibilitychange", onVisibility);

  function update(s) {
    const before = last;
    last = s;
    const now = performance.now() / 1000;
    fill(statusEl, statusBadge(s.status));
    const instructors = Object.entries(s.instructors || {}).sort(([a], [b]) => a.localeCompare(b));
    let accepted = 0;
    let target = 0;
    for (const [, i] of instructors) {
      accepted += Math.min(i.accepted, i.target);
      target += i.target;
    }
    setText(
      summary,
      `${s.status}: ${num(accepted)} of ${num(target)} accepted, ${num(s.rows)} rows` +
        (finished(s.status) ? "" : ", updating every 1.5 s"),
    );
    const tenth = target ? Math.floor((10 * accepted) / target) * 10 : 0;
    setText(live, `Job ${s.status}, ${tenth}% of the target accepted`);
    fill(
      facts,
      fact("Created", timeEl(s.created_at)),
      fact("Finished", timeEl(s.finished_at)),
      fact("Rows", num(s.rows)),
      typeof s.bad_rows === "number" ? fact("Marked bad", num(s.bad_rows)) : null,
      fact("Cost", money(s.cost)),
      fact("Tokens", `${num(s.tokens?.prompt)} in / ${num(s.tokens?.completion)} out`),
      s.detail ? fact("Detail", s.detail, "wide") : null,
      s.cancel_requested && !finished(s.status) ? fact("Cancel", "requested") : null,
      s.export ? fact("Exported to", h("code", {}, s.export), "wide") : null,
      s.export_error ? fact("Export error", s.export_error, "wide") : null,
    );
    cancelBtn.hidden = finished(s.status);
    cancelBtn.disabled = Boolean(s.cancel_requested);
    resumeBtn.hidden = !RESUMABLE.has(s.status);

    for (const [name, i] of instructors) {
      const list = samples.get(name) || [];
      list.push({ t: now, accepted: i.accepted });
      while (list.length > 2 && now - list[0].t > RATE_WINDOW_S) list.shift();
      samples.set(name, list);
      let row = rowsOf.get(name);
      if (!row) {
        row = progressRow(name);
        rowsOf.set(name, row);
        progressBody.append(row.tr);
      }
      const done = Math.min(i.accepted, i.target);
      row.bar.max = Math.max(i.target, 1);
      row.bar.value = done;
      setText(row.count, `${num(done)} / ${num(i.target)}`);
      setText(row.dup, num(i.duplicates));
      setText(row.filtered, num(i.filtered));
      setText(row.refused, num(i.refused));
      setText(row.inflight, num(i.in_flight));
      setText(row.cost, money(i.cost));
      const left = finished(s.status) ? null : eta(list, i.accepted, i.target);
      setText(
        row.eta,
        i.accepted >= i.target ? "done" : finished(s.status) ? "—" : duration(left),
      );
      const state = i.skipped
        ? `skipped: ${i.skipped}`
        : i.stopped
          ? `stopped: ${i.stopped}`
          : done >= i.target
            ? "done"
            : finished(s.status)
              ? s.status
              : "running";
      setText(row.state, state);
      row.state.title = state; // the whole reason, where the column cuts it
    }

    renderDead(s.dead_letters || []);
    renderExperts(s.experts || []);
    if (finished(s.status) && (!reportLoaded || (before && !finished(before.status)))) {
      loadReport();
    }
  }

  function progressRow(name) {
    const cell = (cls = "num") => h("td", { class: cls });
    const bar = h("progress", { max: "1", value: "0", "aria-label": `${name} progress` });
    const count = h("span", { class: "progress-text" });
    const tr = h(
      "tr",
      { dataset: { instructor: name } },
      h("th", { scope: "row" }, name),
      h("td", { class: "progress-cell" }, h("span", { class: "progress" }, bar, count)),
    );
    const cells = {
      dup: cell(),
      filtered: cell(),
      refused: cell(),
      inflight: cell(),
      cost: cell(),
      eta: cell(),
      state: cell("state"),
    };
    tr.append(...Object.values(cells));
    return { tr, bar, count, ...cells };
  }

  function renderDead(letters) {
    if (!letters.length) {
      fill(deadBox, h("p", { class: "muted" }, "None: every message of this job was handled."));
      return;
    }
    fill(
      deadBox,
      tableWrap(
        "Dead letters",
        h(
          "table",
          { class: "dead-table" },
          thead(["When", "Queue", "Kind", "Reason", "Message"]),
          h(
            "tbody",
            {},
            letters.map((d) =>
              h(
                "tr",
                {},
                h("td", {}, timeEl(d.created_at)),
                h("td", {}, h("code", {}, d.queue)),
                h("td", {}, d.kind || "—"),
                h("td", { class: "wrap" }, d.reason || "—"),
                h("td", {}, h("code", {}, d.message_id || "—")),
              ),
            ),
          ),
        ),
      ),
    );
  }

  function renderExperts(list) {
    if (!list.length) {
      fill(expertsBox);
      return;
    }
    fill(
      expertsBox,
      h(
        "section",
        { "aria-labelledby": "job-experts-heading" },
        h("h2", { id: "job-experts-heading" }, "Experts trained on this job"),
        tableWrap(
          "Experts trained on this job",
          h(
            "table",
            {},
            thead(["Expert", "Version", "Status", "Detail"]),
            h(
              "tbody",
              {},
              list.map((e) =>
                h(
                  "tr",
                  {},
                  h("th", { scope: "row" }, e.expert),
                  h("td", {}, e.version),
                  h("td", {}, statusBadge(e.status)),
                  h("td", { class: "wrap" }, e.detail || "—"),
                ),
              ),
            ),
          ),
        ),
      ),
    );
  }

  async function loadReport() {
    fill(reportBox, h("p", { class: "muted" }, "Loading the report…"));
    try {
      const r = await json(`/v1/jobs/${enc(id)}/report`);
      if (!alive) return;
      reportLoaded = true;
      renderReport(r);
    } catch (err) {
      if (alive) fill(reportBox, errorBox(err, "Cannot load the report"));
    }
  }

  function renderReport(r) {
    const rowOf = (label, c, header) =>
      h(
        "tr",
        { class: header ? "totals" : undefined },
        h("th", { scope: "row" }, label),
        h("td", { class: "num" }, num(c.target)),
        h("td", { class: "num" }, num(c.proposed)),
        h("td", { class: "num" }, num(c.kept)),
        h("td", { class: "num" }, num(c.rows)),
        h("td", { class: "num" }, num(c.duplicates)),
        h("td", { class: "num" }, num(c.filtered)),
        h("td", { class: "num" }, num(c.refused)),
        h("td", { class: "num" }, num(c.unparseable)),
        h("td", { class: "num" }, percent(c.dedupe_yield)),
        h("td", { class: "num" }, money(c.cost_per_kept)),
        h("td", { class: "num" }, ratio(c.diversity?.distinct_2)),
        h("td", { class: "num" }, ratio(c.diversity?.nn_cosine)),
        h("td", { class: "num" }, num(c.wasted_tokens)),
      );
    fill(
      reportBox,
      h("p", { class: "muted" }, "Generated ", timeEl(r.generated_at), ` (job ${r.status}).`),
      tableWrap(
        "Quality report",
        h(
          "table",
          { class: "report-table" },
          h("caption", { class: "visually-hidden" }, "Quality report per category"),
          thead([
            "Category",
            ["Target", "num"],
            ["Proposed", "num"],
            ["Kept", "num"],
            ["Rows", "num"],
            ["Duplicates", "num"],
            ["Filtered", "num"],
            ["Refused", "num"],
            ["Unparseable", "num"],
            ["Dedupe yield", "num"],
            ["Cost / kept", "num"],
            ["Distinct-2", "num"],
            ["NN cosine", "num"],
            ["Wasted tokens", "num"],
          ]),
          h("tbody", {}, (r.categories || []).map((c) => rowOf(c.category, c, false))),
          h("tfoot", {}, rowOf("Total", r.totals || {}, true)),
        ),
      ),
    );
  }

  async function cancel() {
    cancelBtn.disabled = true;
    fill(actionsStatus, h("p", { class: "muted" }, "Cancelling…"));
    try {
      const s = await json(`/v1/jobs/${enc(id)}/cancel`, { method: "POST" });
      fill(actionsStatus, h("p", {}, `Cancel requested; the job is ${s.status}.`));
      update(s);
      schedule();
    } catch (err) {
      fill(actionsStatus, errorBox(err, "Cannot cancel"));
      cancelBtn.disabled = false;
    }
  }

  async function resume() {
    resumeBtn.disabled = true;
    fill(actionsStatus, h("p", { class: "muted" }, "Resuming…"));
    try {
      const s = await json(`/v1/jobs/${enc(id)}/resume`, { method: "POST" });
      samples.clear();
      fill(actionsStatus, h("p", {}, `Resumed; the job is ${s.status}.`));
      update(s);
      schedule();
    } catch (err) {
      fill(actionsStatus, errorBox(err, "Cannot resume"));
    } finally {
      resumeBtn.disabled = false;
    }
  }

  async function exportAs(fmt, button) {
    button.disabled = true;
    fill(exportStatus, h("p", { class: "muted" }, `Preparing the ${fmt} export…`));
    try {
      const ext = fmt === "parquet" ? "parquet" : fmt === "airoboros" ? "jsonl" : `${fmt}.jsonl`;
      const got = await download(url(`/v1/jobs/${enc(id)}/export`, { format: fmt }), `${id}.${ext}`);
      fill(exportStatus, h("p", {}, `Downloaded ${got.name} (${num(got.bytes)} bytes).`));
    } catch (err) {
      fill(exportStatus, errorBox(err, `Cannot export ${fmt}`));
    } finally {
      button.disabled = false;
    }
  }

  poll();
  return {
    destroy() {
      alive = false;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisibility);
    },
  };
}

function fact(label, value, cls = "") {
  return h("div", { class: `fact ${cls}`.trim() }, h("dt", {}, label), h("dd", {}, value));
}
