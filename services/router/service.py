"""The router's use case, free of the web framework: check an OpenAI request, decide which
expert answers it, and forward it to a backend with ``model`` set to that expert.

Which expert:
1. the request's ``expert`` field (the original server's extension), or a ``model`` that
   names an expert (or any model a backend serves): that one;
2. ``model: "auto"`` (or one of the ``base_models`` names): with ``agent_router``, the
   function expert's choice; otherwise, or when that fails, the embedding rule over the
   system prompt and the last user turn;
3. nothing to route on (a prompt of token ids) or no routing samples: ``default_expert``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from airoboros import metrics
from airoboros.errors import InvalidRequest, ServiceUnavailable, UnknownModel
from airoboros.protocol import (
    AUTO,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelCard,
    has_lone_surrogate,
)
from airoboros.router.agent import AgentRouter
from airoboros.router.backends import BackendPool, BackendReply, Stream
from airoboros.router.routing import (
    Router,
    RoutingDecision,
    chat_routing_text,
    prompt_routing_text,
)

Kind = Literal["chat", "completions"]
PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}
#: what the router reads of a request (``airoboros.protocol``; every field goes on untouched)
Request = ChatCompletionRequest | CompletionRequest


def _problems(exc: ValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = "required" if e["type"] == "missing" else e["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    param = ".".join(str(p) for p in errs[0]["loc"]) if errs else None
    return "; ".join(parts), param


def check_roles(messages: list[ChatMessage]) -> None:
    """The orders a chat prompt can be built from: system (or developer) messages only at
    the start, at least one user message, and the last message from the user (or a tool
    result the assistant asked for)."""
    seen_other = False
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            if seen_other:
                raise InvalidRequest(
                    f"messages[{i}]: a {m.role} message may only come before the conversation "
                    "(at the start)",
                    param=f"messages.{i}.role",
                )
        else:
            seen_other = True
    if not any(m.role == "user" for m in messages):
        raise InvalidRequest("messages: there is no user message to answer", param="messages")
    last = messages[-1].role
    if last not in ("user", "tool", "function"):
        raise InvalidRequest(
            f"messages: the last message must be from the user (or a tool result), not {last!r}",
            param=f"messages.{len(messages) - 1}.role",
        )


@dataclass
class Prepared:
    """A checked request: where it goes and the body to send."""

    kind: Kind
    expert: str
    decision: RoutingDecision
    body: bytes
    stream: bool

    def headers(self) -> dict[str, str]:
        return {
            "x-airoboros-expert": self.expert,
            "x-airoboros-route": self.decision.method,
            "x-airoboros-routing-ms": f"{self.decision.seconds * 1000:.2f}",
        }


class RouterService:
    """Requests in, expert chosen, answer out. ``router`` may be None while the routing
    index is being built: named experts are served, ``auto`` gets a 503 until then."""

    def __init__(
        self,
        backends: BackendPool,
        router: Router | None = None,
        *,
        agent: AgentRouter | None = None,
        base_models: list[str] | None = None,
        default_expert: str = "",
        routing_max_chars: int = 2000,
    ) -> None:
        self.backends = backends
        self.router = router
        self.agent = agent
        self.base_models = list(base_models or [])
        self.default_expert = default_expert
        self.routing_max_chars = routing_max_chars
        self.loading_error: str | None = None
        self.created = int(time.time())

    # --- models ---------------------------------------------------------------------------

    def experts(self) -> list[str]:
        return self.router.experts() if self.router is not None else []

    def models(self) -> list[ModelCard]:
        """``auto``, then every expert, then any other model a backend serves."""
        out = [self._model(AUTO, "airoboros-router")]
        experts = self.experts()
        out += [self._model(e, "airoboros") for e in experts]
        seen = {AUTO, *experts}
        out += [self._model(m, "backend") for m in sorted(self.backends.models() - seen)]
        return out

    def model(self, name: str) -> ModelCard:
        for m in self.models():
            if m.id == name:
                return m
        raise UnknownModel(f"The model `{name}` does not exist", param="model")

    def _model(self, name: str, owner: str) -> ModelCard:
        card = ModelCard(id=name, created=self.created, owned_by=owner)
        if self.router is not None and name in self.router.index.experts:
            card.description = self.router.index.experts[name].description
        return card

    def known(self, name: str) -> bool:
        return (self.router is not None and self.router.has(name)) or name in self.backends.models()

    # --- requests -------------------------------------------------------------------------

    def parse(self, kind: Kind, raw: bytes) -> tuple[dict[str, Any], Request]:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(f"the body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the body must be a JSON object")
        if has_lone_surrogate(raw, data):
            raise InvalidRequest(
                "the body is not valid JSON: a string holds a lone surrogate (\\ud800-\\udfff), "
                "which is no Unicode text"
            )
        try:
            req: Request = (
                ChatCompletionRequest.model_validate(data)
                if kind == "chat"
                else CompletionRequest.model_validate(data)
            )
        except ValidationError as exc:
            message, param = _problems(exc)
            raise InvalidRequest(message, param=param) from None
        if isinstance(req, ChatCompletionRequest):
            check_roles(req.messages)
        return data, req

    def _explicit(self, req: Request) -> str | None:
        """The expert the request names, or None when the router should choose."""
        model = req.model
        routed = model is None or model == AUTO or model in self.base_models
        if req.expert is not None:
            if not self.known(req.expert):
                raise UnknownModel(
                    f"The expert `{req.expert}` does not exist; GET /v1/models lists them",
                    param="expert",
                )
            if not routed and model != req.expert:
                raise InvalidRequest(
                    f"`model` ({req.model}) and `expert` ({req.expert}) disagree; give one, or "
                    'set model to "auto"',
                    param="expert",
                )
            return req.expert
        if model is None or routed:
            return None
        if not self.known(model):
            raise UnknownModel(
                f"The model `{model}` does not exist; GET /v1/models lists the experts "
                '(or use "auto")',
                param="model",
            )
        return model

    def routing_text(self, req: Request) -> str | None:
        if isinstance(req, ChatCompletionRequest):
            return chat_routing_text(
                [
                    m.model_dump(include={"role", "content"}, exclude_none=True)
                    for m in req.messages
                ],
                self.routing_max_chars,
            )
        prompt = req.prompt
        if isinstance(prompt, list):
            if not prompt or not isinstance(prompt[0], str):
                return None  # token ids: nothing to embed
            prompt = prompt[0]
        assert isinstance(prompt, str)
        return prompt_routing_text(prompt, self.routing_max_chars)

    async def decide(self, text: str | None) -> RoutingDecision:
        """Choose for ``text`` (None: nothing to route on)."""
        start = time.perf_counter()
        router = self.router
        if text is not None and router is not None:
            if self.agent is not None:
                choice = await self.agent.choose(text, router.descriptions())
                if choice is not None:
                    return RoutingDecision(choice, "agent", time.perf_counter() - start)
            decision = await router.route(text)
            if decision is not None:
                return decision
        if self.default_expert:
            return RoutingDecision(self.default_expert, "default", time.perf_counter() - start)
        if text is None:
            raise InvalidRequest(
                "a prompt of token ids cannot be routed: name the expert in `model`",
                param="prompt",
            )
        if router is None:
            raise ServiceUnavailable(
                "the routing index is still loading"
                + (f" ({self.loading_error})" if self.loading_error else "")
                + '; name an expert in `model` or retry "auto" shortly',
                headers={"retry-after": "5"},
            )
        raise ServiceUnavailable(
            "no expert has routing samples yet: name an expert in `model`",
            headers={"retry-after": "5"},
        )

    async def prepare(self, kind: Kind, raw: bytes) -> Prepared:
        data, req = self.parse(kind, raw)
        explicit = self._explicit(req)
        if explicit is not None:
            decision = RoutingDecision(explicit, "explicit")
        else:
            decision = await self.decide(self.routing_text(req))
        metrics.ROUTING.labels(decision.expert, decision.method).inc()
        if explicit is None:
            metrics.ROUTING_SECONDS.observe(decision.seconds)
        # Backends know the adapter by name in `model`; `expert` is ours alone.
        data["model"] = decision.expert
        data.pop("expert", None)
        return Prepared(
            kind, decision.expert, decision, json.dumps(data).encode(), bool(req.stream)
        )

    async def complete(self, p: Prepared) -> BackendReply:
        """Forward a non-streamed request; the answer gets a top-level ``expert`` field."""
        reply = await self.backends.post(PATHS[p.kind], p.body, p.expert)
        try:
            data = reply.json()
        except ValueError:
            return reply
        if isinstance(data, dict):
            data["expert"] = p.expert
            reply.content = json.dumps(data).encode()
        return reply

    async def stream(self, p: Prepared) -> Stream:
        """Open a streamed request; the expert travels in the response headers only (the
        chunks pass through as the backend wrote them)."""
        return await self.backends.open_stream(PATHS[p.kind], p.body, p.expert)
