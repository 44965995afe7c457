// Multi-turn rows as conversations. The rp and gtkm instructors (services/generator/
// instructors/characters.py) write one row per assistant turn: the instruction is the
// chat so far (a preamble naming the characters, then "Name: text" lines), the response
// the next turn ("Name: text"), with skip_prompt_formatting.
//   gtkm: "A chat between <character> and <user>.\nDescription of <character>: ...\n..."
//   rp:   "This is a chat between N characters: <user>, <c1>, ...\n...\nEnd of setting."
//         (then an optional "Actions should be surrounded by ..." line), a blank line, and
//         the turns; the first may be a start phrase with no name (the user's).

export const MULTI_TURN = new Set(["rp", "gtkm"]);

const GTKM_HEAD = /^A chat between (.+?) and (.+?)\.\s*$/;
const RP_HEAD = /^This is a chat between \d+ characters: (.+?)\s*$/;

/** {names, user, preambleEnd (index of the first turn line)} or null. */
function header(lines) {
  const first = lines[0] || "";
  let m = GTKM_HEAD.exec(first);
  if (m) {
    const names = [m[1], m[2]];
    const isTurn = (l) => names.some((n) => l.startsWith(`${n}: `));
    let end = lines.findIndex((l, i) => i > 0 && isTurn(l));
    if (end < 0) end = lines.length;
    return { names, user: m[2], preambleEnd: end };
  }
  m = RP_HEAD.exec(first);
  if (m) {
    const names = m[1].split(/,\s*/).filter(Boolean);
    let end = lines.findIndex((l) => l.trim() === "End of setting.");
    if (end < 0) return null;
    end += 1;
    if ((lines[end] || "").startsWith("Actions should be surrounded by")) end += 1;
    while (end < lines.length && !lines[end].trim()) end += 1;
    return { names, user: names[0], preambleEnd: end };
  }
  return null;
}

function turns(lines, names, user, into = []) {
  // The longest name first: "Ann" must not take "Anna: ..." lines.
  const byLength = [...names].sort((a, b) => b.length - a.length);
  for (const line of lines) {
    const speaker = byLength.find((n) => line.startsWith(`${n}: `) || line === `${n}:`);
    if (speaker) {
      into.push({ speaker, text: line.slice(speaker.length + 1).trim() });
    } else if (!into.length) {
      if (line.trim()) into.push({ speaker: user, text: line.trim() });
    } else {
      into[into.length - 1].text += `\n${line}`;
    }
  }
  return into;
}

/**
 * A row as a conversation: {preamble, user, turns: [{speaker, text, role, reply}]}, the
 * last turns (reply: true) from the response; null when the row is not one.
 */
export function conversation(row) {
  if (!row || typeof row.instruction !== "string") return null;
  const messages = row.conversations || row.messages;
  if (Array.isArray(messages) && messages.length) {
    // A row that carries its turns as data (ShareGPT- or OpenAI-shaped).
    const list = messages.map((m) => {
      const role = m.role || (m.from === "human" ? "user" : m.from === "gpt" ? "assistant" : m.from);
      return { speaker: role, text: String(m.content ?? m.value ?? ""), role, reply: false };
    });
    return { preamble: row.system || "", user: "user", turns: list };
  }
  if (!MULTI_TURN.has(row.category)) return null;
  const lines = row.instruction.replace(/\r\n/g, "\n").split("\n");
  const head = header(lines);
  if (!head) return null;
  const { names, user, preambleEnd } = head;
  const before = turns(lines.slice(preambleEnd), names, user);
  const reply = turns(String(row.response || "").split("\n"), names, user, []);
  if (!before.length && !reply.length) return null;
  const all = [
    ...before.map((t) => ({ ...t, reply: false })),
    ...reply.map((t) => ({ ...t, reply: true })),
  ].map((t) => ({ ...t, role: t.speaker === user ? "user" : "assistant" }));
  return { preamble: lines.slice(0, preambleEnd).join("\n").trim(), user, turns: all };
}
