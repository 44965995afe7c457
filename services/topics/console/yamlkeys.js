// Where a config key is in a YAML text: the API names each problem by its dotted key path
// ("instructors.general.count: ..."), and the form marks the line that holds that key.
// This reads block mappings by indentation; that is all a config needs (flow mappings and
// multi-line scalars are skipped over, and a path not found falls back to its parent).

const KEY_LINE = /^(\s*)(-\s+)?(?:"([^"]*)"|'([^']*)'|([^\s#'"{[\]][^:#]*?))\s*:(?:\s|$)/;

/** [{line (0-based), path: "a.b.c"}] for every key of the text. */
export function keyLines(text) {
  const out = [];
  const stack = []; // [{indent, key}]
  const lines = text.split("\n");
  let blockIndent = -1; // inside a literal/folded scalar: lines indented deeper than this
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].replace(/\r$/, "");
    const indent = line.length - line.trimStart().length;
    if (!line.trim() || line.trimStart().startsWith("#")) continue;
    if (blockIndent >= 0) {
      if (indent > blockIndent) continue;
      blockIndent = -1;
    }
    if (/^(---|\.\.\.)\s*$/.test(line)) {
      stack.length = 0;
      continue;
    }
    const m = KEY_LINE.exec(line);
    if (!m) continue;
    // a "- key:" item: the key sits after the dash
    const keyIndent = indent + (m[2] ? m[2].length : 0);
    const key = m[3] ?? m[4] ?? m[5].trim();
    while (stack.length && stack[stack.length - 1].indent >= keyIndent) stack.pop();
    stack.push({ indent: keyIndent, key });
    out.push({ line: i, path: stack.map((s) => s.key).join(".") });
    const rest = line.slice(m[0].length).trim();
    if (/^[|>][-+0-9]*\s*(#.*)?$/.test(rest)) blockIndent = keyIndent;
  }
  return out;
}

/**
 * "instructors.general.count: must be > 0" -> {key: "instructors.general.count",
 * message: "must be > 0"}; a problem not about a key -> {key: null, message}.
 */
export function splitProblem(problem) {
  const m = /^([A-Za-z0-9_.\-[\]]+): (.*)$/s.exec(problem);
  if (!m || m[1].startsWith("(")) return { key: null, message: problem };
  return { key: m[1], message: m[2] };
}

/** The 0-based line of ``path`` in the text (or of its nearest parent), or -1. */
export function lineOf(text, path, keys = keyLines(text)) {
  const parts = path.split(".").filter(Boolean);
  for (let n = parts.length; n > 0; n--) {
    const want = parts.slice(0, n).join(".");
    const hit = keys.find((k) => k.path === want);
    if (hit) return hit.line;
  }
  return -1;
}
