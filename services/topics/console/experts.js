// #/experts: the adapter registry (every version the trainer registered that this key may
// see) and the inference pods the router knows, with the adapters each holds.

import { json } from "./api.js";
import { errorBox, fill, h, num, statusBadge, tableWrap, thead, timeEl } from "./dom.js";

export function experts(root) {
  let alive = true;
  const registry = h("div");
  const pods = h("div");
  const routerLine = h("p", { class: "muted" });
  root.append(
    h("h1", {}, "Experts"),
    h(
      "section",
      { "aria-labelledby": "registry-heading" },
      h(
        "div",
        { class: "section-head" },
        h("h2", { id: "registry-heading" }, "Adapter registry"),
        h("button", { type: "button", onclick: () => load() }, "Refresh"),
      ),
      registry,
    ),
    h(
      "section",
      { "aria-labelledby": "pods-heading" },
      h("h2", { id: "pods-heading" }, "Inference pods"),
      routerLine,
      pods,
    ),
  );

  async function load() {
    fill(registry, h("p", { class: "muted" }, "Loading…"));
    try {
      const body = await json("/v1/experts");
      if (!alive) return;
      renderRegistry(body.data || []);
      renderPods(body);
    } catch (err) {
      if (alive) fill(registry, errorBox(err, "Cannot read the experts"));
    }
  }

  function renderRegistry(list) {
    if (!list.length) {
      fill(
        registry,
        h("p", {}, "No adapter registered yet: train experts on a finished job (docs/trainer.md)."),
      );
      return;
    }
    fill(
      registry,
      tableWrap(
        "Adapter registry",
        h(
          "table",
          { class: "experts-table" },
          h("caption", { class: "visually-hidden" }, "Registered adapter versions"),
          thead(["Expert", "Version", "Status", "Dataset", "Metrics", "Failure / detail", "Created"]),
          h(
            "tbody",
            {},
            list.map((e) =>
              h(
                "tr",
                { dataset: { expert: e.expert } },
                h("th", { scope: "row" }, e.expert),
                h("td", {}, h("code", {}, e.version)),
                h("td", {}, statusBadge(e.status)),
                h(
                  "td",
                  { class: "wrap" },
                  e.job_id ? h("a", { href: `#/jobs/${encodeURIComponent(e.job_id)}` }, e.job_id) : null,
                  e.dataset_uri ? h("div", {}, h("code", { class: "uri" }, e.dataset_uri)) : null,
                  !e.job_id && !e.dataset_uri ? "—" : null,
                ),
                h("td", {}, metrics(e.metrics)),
                h("td", { class: "wrap" }, e.detail || "—"),
                h("td", {}, timeEl(e.created_at)),
              ),
            ),
          ),
        ),
      ),
    );
  }

  function renderPods(body) {
    const router = body.router;
    fill(
      routerLine,
      router ? ["Router: ", h("code", {}, router)] : "No router configured (AIROBOROS_ROUTER_URL).",
    );
    const list = body.pods || [];
    const out = [];
    if (body.pods_error) out.push(errorBox(body.pods_error, "The router cannot be read"));
    if (!list.length) {
      if (router && !body.pods_error) out.push(h("p", {}, "The router lists no pods."));
      fill(pods, out);
      return;
    }
    out.push(
      tableWrap(
        "Inference pods",
        h(
          "table",
          { class: "pods-table" },
          h("caption", { class: "visually-hidden" }, "Inference pods and their adapters"),
          thead(["Pod", "Health", ["Outstanding", "num"], "Adapters", "Error"]),
          h(
            "tbody",
            {},
            list.map((p) =>
              h(
                "tr",
                {},
                h("th", { scope: "row" }, h("code", {}, p.url)),
                h("td", {}, statusBadge(p.healthy ? "healthy" : "down")),
                h("td", { class: "num" }, num(p.outstanding)),
                h(
                  "td",
                  {},
                  (p.adapters || []).length
                    ? h("ul", { class: "chips" }, p.adapters.map((a) => h("li", {}, a)))
                    : "—",
                ),
                h("td", { class: "wrap" }, p.error || "—"),
              ),
            ),
          ),
        ),
      ),
    );
    fill(pods, out);
  }

  load();
  return {
    destroy() {
      alive = false;
    },
  };
}

function metrics(m) {
  const entries = Object.entries(m || {});
  if (!entries.length) return "—";
  return h(
    "dl",
    { class: "metrics" },
    entries.map(([k, v]) =>
      h(
        "div",
        {},
        h("dt", {}, k),
        h("dd", {}, typeof v === "number" ? String(Math.round(v * 1e4) / 1e4) : JSON.stringify(v)),
      ),
    ),
  );
}
