// #/playground: chat with the router through the topics service (POST
// /v1/playground/chat/completions), streamed; shows the expert the router chose and the
// usage of each answer.

import { ApiError, errorOf, getKey, json } from "./api.js";
import { announce, errorBox, fill, h, num, setText } from "./dom.js";
import { events } from "./sse.js";

const CHAT_PATH = "/v1/playground/chat/completions";

export function playground(root) {
  let alive = true;
  let controller = null;
  const history = []; // [{role, content}] of this chat

  const model = h(
    "select",
    { id: "pg-model", name: "model" },
    h("option", { value: "auto" }, "auto (the router picks the expert)"),
  );
  const system = h("input", {
    id: "pg-system",
    name: "system",
    type: "text",
    value: "A chat.",
    autocomplete: "off",
  });
  const maxTokens = h("input", {
    id: "pg-max-tokens",
    name: "max_tokens",
    type: "number",
    min: "1",
    max: "4096",
    value: "128",
    inputmode: "numeric",
  });
  const message = h("textarea", {
    id: "pg-message",
    name: "message",
    rows: "3",
    required: true,
    "aria-describedby": "pg-message-help",
  });
  const send = h("button", { type: "submit", class: "primary" }, "Send");
  const stop = h("button", { type: "button", disabled: true, onclick: () => controller?.abort() }, "Stop");
  const reset = h("button", { type: "button", onclick: clearChat }, "New chat");
  const log = h("ol", { class: "chat-log", "aria-label": "Conversation" });
  const expertEl = h("output", { id: "pg-expert", class: "pg-expert" }, "—");
  const usageEl = h("output", { id: "pg-usage", class: "pg-usage" }, "—");
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  const modelsNote = h("p", { class: "hint" });

  const form = h(
    "form",
    { class: "card chat-form", novalidate: true },
    h(
      "div",
      { class: "row-fields" },
      h("div", { class: "field" }, h("label", { for: "pg-model" }, "Model"), model),
      h("div", { class: "field grow" }, h("label", { for: "pg-system" }, "System prompt"), system),
      h("div", { class: "field small" }, h("label", { for: "pg-max-tokens" }, "Max tokens"), maxTokens),
    ),
    modelsNote,
    h("div", { class: "field" }, h("label", { for: "pg-message" }, "Message"), message),
    h(
      "p",
      { id: "pg-message-help", class: "hint" },
      "Ctrl+Enter sends. The answer streams from the router; the key goes in the header only.",
    ),
    h("div", { class: "actions" }, send, stop, reset),
    status,
  );

  root.append(
    h("h1", {}, "Playground"),
    form,
    h(
      "section",
      { "aria-labelledby": "pg-answer-heading", class: "chat" },
      h("h2", { id: "pg-answer-heading" }, "Chat"),
      h(
        "dl",
        { class: "facts chat-facts" },
        h("div", { class: "fact" }, h("dt", {}, "Expert"), h("dd", {}, expertEl)),
        h("div", { class: "fact" }, h("dt", {}, "Usage"), h("dd", {}, usageEl)),
      ),
      log,
    ),
  );

  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });

  async function loadModels() {
    try {
      const body = await json("/v1/experts");
      if (!alive) return;
      const names = new Set();
      for (const e of body.data || []) names.add(e.expert);
      for (const p of body.pods || []) for (const a of p.adapters || []) names.add(a);
      for (const n of [...names].sort()) model.append(h("option", { value: n }, n));
      setText(
        modelsNote,
        names.size
          ? `${names.size} expert${names.size === 1 ? "" : "s"} from the registry and the pods.`
          : body.pods_error
            ? `The router cannot be read (${body.pods_error}); auto still works if it comes back.`
            : "No experts known yet; auto asks the router to choose.",
      );
    } catch (err) {
      if (alive && !(err instanceof ApiError && err.status === 401)) {
        setText(modelsNote, `Experts unavailable: ${err.message}`);
      }
    }
  }

  function clearChat() {
    controller?.abort();
    history.length = 0;
    fill(log);
    setText(expertEl, "—");
    setText(usageEl, "—");
    fill(status);
    message.focus();
  }

  function bubble(role, text, label) {
    const p = h("p", { class: "text" }, text);
    const meta = h("span", { class: "speaker" }, label || role);
    const li = h("li", { class: `turn ${role}` }, meta, p);
    log.append(li);
    return { li, p, meta };
  }

  async function ask() {
    const text = message.value.trim();
    if (!text) {
      fill(status, errorBox("Write a message first."));
      message.focus();
      return;
    }
    if (!getKey()) return;
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    messages.push(...history, { role: "user", content: text });
    const body = {
      model: model.value,
      messages,
      stream: true,
      stream_options: { include_usage: true },
    };
    const max = Number.parseInt(maxTokens.value, 10);
    if (Number.isFinite(max) && max > 0) body.max_tokens = max;

    bubble("user", text, "You");
    message.value = "";
    const answer = bubble("assistant", "", "Assistant");
    answer.li.setAttribute("aria-busy", "true");
    send.disabled = true;
    stop.disabled = false;
    fill(status, h("p", { class: "muted" }, "Streaming…"));
    controller = new AbortController();
    let content = "";
    let expert = null;
    try {
      const response = await fetch(CHAT_PATH, {
        method: "POST",
        headers: {
          Authorization: `Bearer ${getKey()}`,
          "Content-Type": "application/json",
          Accept: "text/event-stream",
        },
        body: JSON.stringify(body),
        signal: controller.signal,
        cache: "no-store",
        credentials: "omit",
      });
      if (!response.ok) throw await errorOf(response);
      expert = response.headers.get("x-airoboros-expert");
      if (expert) showExpert(expert, answer);
      const type = response.headers.get("content-type") || "";
      if (!type.includes("text/event-stream")) {
        // A server that answered without streaming: one completion.
        const done = await response.json();
        content = done.choices?.[0]?.message?.content || "";
        setText(answer.p, content);
        if (!expert && (done.expert || done.model)) showExpert(done.expert || done.model, answer);
        if (done.usage) showUsage(done.usage);
      } else {
        for await (const ev of events(response.body)) {
          if (ev.data === "[DONE]") break;
          let chunk;
          try {
            chunk = JSON.parse(ev.data);
          } catch {
            continue;
          }
          if (chunk.error) {
            throw new ApiError(500, chunk.error.message || "the stream ended with an error");
          }
          if (!expert && (chunk.expert || chunk.model)) {
            expert = chunk.expert || chunk.model;
            showExpert(expert, answer);
          }
          for (const choice of chunk.choices || []) {
            const piece = choice.delta?.content;
            if (piece) {
              content += piece;
              setText(answer.p, content);
            }
          }
          if (chunk.usage) showUsage(chunk.usage);
        }
      }
      history.push({ role: "user", content: text }, { role: "assistant", content });
      fill(status, h("p", { class: "muted" }, "Done."));
      announce(`Answer from ${expert || "the router"} complete`);
    } catch (err) {
      if (err && err.name === "AbortError") {
        fill(status, h("p", { class: "muted" }, "Stopped."));
      } else if (!(err instanceof ApiError && err.status === 401)) {
        fill(status, errorBox(err, "The chat failed"));
        if (!content) answer.li.remove();
      }
    } finally {
      answer.li.removeAttribute("aria-busy");
      if (!content && !answer.p.textContent) setText(answer.p, "(no text)");
      send.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  }

  function showExpert(name, answer) {
    setText(expertEl, name);
    setText(answer.meta, `Assistant · ${name}`);
  }

  function showUsage(u) {
    setText(
      usageEl,
      `${num(u.prompt_tokens)} prompt + ${num(u.completion_tokens)} completion = ${num(u.total_tokens)} tokens`,
    );
  }

  loadModels();
  return {
    destroy() {
      alive = false;
      controller?.abort();
    },
  };
}
