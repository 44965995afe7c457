"""Reading a config from a stranger: YAML and JSON with limits enforced while reading.

The bodies posted to the services are read with these (the CLI reads a user's own file
with the plain safe loader). Limits: the body's size is capped before it is read
(airoboros.web.read_body); YAML aliases are refused (an alias expands to the node it
names, so a few hundred bytes of them can stand for gigabytes, the "billion laughs");
nesting deeper than ``MAX_DEPTH`` and more than ``MAX_NODES`` values are refused while the
document is built, before anything large or deep exists in memory. JSON is parsed by
orjson, which refuses nesting past 1024 levels in its parser instead of recursing, and
the same depth and size limits are then checked without recursion.
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml

from airoboros.errors import ConfigError

#: a config is a mapping of mappings: instructors.<name>.api_params.<key> is four deep
MAX_DEPTH = 32
MAX_NODES = 200_000


class _LimitedLoader(yaml.SafeLoader):
    """The safe loader, refusing aliases and documents too deep or too large while it
    composes them (the composer is the recursive part of PyYAML)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def _mark(self) -> str:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        return _where(event.start_mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _Refused(
                "YAML aliases (*name) are not accepted in a posted config" + self._mark()
            )
        self._depth += 1
        self._nodes += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels" + self._mark())
        if self._nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} values")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Refused(Exception):
    pass


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def load_yaml(text: str | bytes) -> Any:
    """One YAML document, within the limits; ConfigError naming the problem otherwise."""
    loader = _LimitedLoader(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise ConfigError([f"(body): {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError([f"(body): not valid YAML{_where(mark)}"]) from None
    finally:
        loader.dispose()


def load_json(data: str | bytes) -> Any:
    """One JSON document, within the limits; ConfigError naming the problem otherwise."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError([f"(body): not valid JSON ({exc})"]) from None
    check_shape(value)
    return value


def check_shape(value: Any) -> None:
    """Raise ConfigError when ``value`` nests deeper than MAX_DEPTH or holds more than
    MAX_NODES values (checked with a stack, not recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise ConfigError([f"(body): nested deeper than {MAX_DEPTH} levels"])
        if nodes > MAX_NODES:
            raise ConfigError([f"(body): more than {MAX_NODES} values"])
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def load_config_body(body: bytes, content_type: str) -> Any:
    """A posted config: JSON when the content type says so, else YAML (JSON is YAML)."""
    if not body.strip():
        raise ConfigError(["(body): empty; send the config as YAML or JSON"])
    if "json" in content_type:
        return load_json(body)
    return load_yaml(body)
