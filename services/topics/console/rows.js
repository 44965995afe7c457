// #/jobs/<id>/rows: a job's rows by category, paged, searched; multi-turn rows as
// conversations; a row marked bad is left out of the exports (and can be unmarked).

import { ApiError, enc, json, url } from "./api.js";
import { announce, errorBox, fill, h, num, setText } from "./dom.js";
import { conversation } from "./conversation.js";

const PAGE = 20;

export function rows(root, { id, query }) {
  let alive = true;
  let category = query.get("category") || "";
  let q = query.get("q") || "";
  let after = 0;
  const earlier = []; // the `after` of each earlier page
  let page = 1;

  const select = h(
    "select",
    { id: "rows-category", name: "category" },
    h("option", { value: "" }, "All categories"),
  );
  const search = h("input", {
    id: "rows-q",
    name: "q",
    type: "search",
    maxlength: "200",
    value: q,
    autocomplete: "off",
    placeholder: "instruction, response or system",
  });
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter rows" },
    h("div", { class: "field" }, h("label", { for: "rows-category" }, "Category"), select),
    h("div", { class: "field grow" }, h("label", { for: "rows-q" }, "Search"), search),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Search")),
  );
  const status = h("p", { class: "muted rows-status", "aria-live": "polite" });
  const list = h("div", { class: "rows-list" });
  const prev = h("button", { type: "button", onclick: () => go(-1) }, "Previous page");
  const next = h("button", { type: "button", onclick: () => go(1) }, "Next page");
  const pager = h("nav", { class: "pager", "aria-label": "Pages of rows" }, prev, next);
  const badCount = h("span");
  let badRows = null; // the job's rows marked bad (JobStatus.bad_rows), kept current here
  const showBad = () => {
    if (badRows !== null) setText(badCount, `${num(badRows)} marked bad in this job.`);
  };

  root.append(
    h(
      "p",
      { class: "crumbs" },
      h("a", { href: "#/jobs" }, "Jobs"),
      " / ",
      h("a", { href: `#/jobs/${enc(id)}` }, id),
      " / rows",
    ),
    h("h1", {}, "Rows of ", h("code", { class: "job-id" }, id)),
    form,
    h("p", { class: "hint" }, "Rows marked bad stay in the store and are left out of every export. ", badCount),
    status,
    list,
    pager,
  );

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    apply();
  });
  select.addEventListener("change", () => apply());

  function apply() {
    category = select.value;
    q = search.value.trim();
    after = 0;
    earlier.length = 0;
    page = 1;
    // The filters in the address (bookmarkable), without a hashchange re-render.
    const params = new URLSearchParams();
    if (category) params.set("category", category);
    if (q) params.set("q", q);
    const hash = `#/jobs/${enc(id)}/rows${params.toString() ? `?${params}` : ""}`;
    replaceHash(hash);
    load();
  }

  function go(step) {
    if (step > 0 && next.dataset.after) {
      earlier.push(after);
      after = Number(next.dataset.after);
      page += 1;
    } else if (step < 0 && earlier.length) {
      after = earlier.pop();
      page -= 1;
    } else return;
    load().then(() => list.querySelector("article")?.focus());
  }

  async function categories() {
    try {
      const s = await json(`/v1/jobs/${enc(id)}`);
      const names = Object.keys(s.instructors || {}).sort();
      if (category && !names.includes(category)) names.push(category);
      for (const n of names) select.append(h("option", { value: n }, n));
      select.value = category;
      if (typeof s.bad_rows === "number") {
        badRows = s.bad_rows;
        showBad();
      }
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) select.value = category;
    }
  }

  async function load() {
    setText(status, "Loading…");
    try {
      const page_ = await json(
        url(`/v1/jobs/${enc(id)}/items`, { category, q, after: after || undefined, limit: PAGE }),
      );
      if (!alive) return;
      render(page_);
    } catch (err) {
      if (!alive) return;
      setText(status, "");
      fill(list, errorBox(err, "Cannot load the rows"));
      prev.disabled = next.disabled = true;
    }
  }

  function render(data) {
    const items = data.items || [];
    const what = [category && `category ${category}`, q && `matching “${q}”`].filter(Boolean);
    setText(
      status,
      items.length
        ? `Page ${page}: rows ${items[0].seq}–${items[items.length - 1].seq}` +
            (what.length ? ` (${what.join(", ")})` : "")
        : `No rows${what.length ? ` ${what.join(", ")}` : ""}.`,
    );
    fill(list, items.map((row) => rowCard(row)));
    prev.disabled = earlier.length === 0;
    next.disabled = data.next_after === null || data.next_after === undefined;
    if (next.disabled) delete next.dataset.after;
    else next.dataset.after = String(data.next_after);
  }

  function rowCard(row) {
    const card = h("article", {
      class: row.bad ? "row-card is-bad" : "row-card",
      tabindex: "-1",
      dataset: { seq: String(row.seq), category: row.category },
      "aria-labelledby": `row-${row.seq}-title`,
    });
    const badge = h("span", { class: "badge bad-badge" }, "bad");
    badge.hidden = !row.bad;
    const toggle = h(
      "button",
      {
        type: "button",
        class: "mark-bad",
        "aria-pressed": row.bad ? "true" : "false",
      },
      row.bad ? "Unmark bad" : "Mark bad",
    );
    toggle.addEventListener("click", async () => {
      const want = toggle.getAttribute("aria-pressed") !== "true";
      toggle.disabled = true;
      try {
        const updated = await json(`/v1/jobs/${enc(id)}/items/${row.seq}/bad`, {
          method: "POST",
          body: { bad: want },
        });
        const bad = Boolean(updated.bad);
        if (badRows !== null && bad === want) {
          badRows += bad ? 1 : -1;
          showBad();
        }
        toggle.setAttribute("aria-pressed", bad ? "true" : "false");
        toggle.textContent = bad ? "Unmark bad" : "Mark bad";
        badge.hidden = !bad;
        card.classList.toggle("is-bad", bad);
        announce(`Row ${row.seq} ${bad ? "marked bad: left out of exports" : "unmarked"}`);
      } catch (err) {
        card.append(errorBox(err, "Cannot change the mark"));
      } finally {
        toggle.disabled = false;
      }
    });

    const convo = conversation(row);
    const body = [];
    if (row.system) {
      body.push(block("System prompt", row.system, "system"));
    }
    if (convo) {
      if (convo.preamble) body.push(block("Setting", convo.preamble, "preamble"));
      body.push(
        h(
          "ol",
          { class: "conversation", "aria-label": "Conversation" },
          convo.turns.map((t) =>
            h(
              "li",
              { class: `turn ${t.role}${t.reply ? " reply" : ""}` },
              h("span", { class: "speaker" }, t.speaker, t.reply ? " (response)" : ""),
              h("p", { class: "text" }, t.text),
            ),
          ),
        ),
      );
    } else {
      body.push(block("Instruction", row.instruction, "instruction"));
      body.push(block("Response", row.response, "response"));
    }
    card.append(
      h(
        "header",
        { class: "row-head" },
        h(
          "h2",
          { id: `row-${row.seq}-title`, class: "row-title" },
          `Row ${row.seq}`,
          " ",
          h("span", { class: "badge category" }, row.category),
          " ",
          badge,
        ),
        toggle,
      ),
      ...body,
    );
    return card;
  }

  function replaceHash(hash) {
    window.history.replaceState(null, "", hash);
  }

  categories();
  load();
  return {
    destroy() {
      alive = false;
    },
  };
}

function block(label, text, cls) {
  return h(
    "div",
    { class: `field-block ${cls}` },
    h("h3", { class: "block-label" }, label),
    h("p", { class: "text" }, text),
  );
}
