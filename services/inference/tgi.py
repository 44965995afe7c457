"""A backend that fronts a text-generation-inference (TGI) server.

TGI serves the base model and the adapters it was started with (``LORA_ADAPTERS``); it
cannot load or unload adapters at run time, so ``load_adapter``/``unload_adapter`` are
refused (400) and the served adapters are the ``tgi_adapters`` setting.

The ``text-generation`` client (0.7) cannot choose an adapter (no ``adapter_id`` in its
``Parameters``), and its aiohttp client times out after 10 s by default. So requests go to
TGI's own HTTP API with httpx — ``POST /generate`` (non-streamed) and
``POST /generate_stream`` (SSE) — with ``parameters.adapter_id`` set in the body (TGI >= 2);
the client package still supplies the response types (``Response``, ``StreamResponse``)
and the mapping of TGI's error payloads (``parse_error``).

Stop sequences: TGI ends at the first ``stop`` (at most 4 are sent; TGI's default limit)
and keeps the stop text in its output; ``StopMatcher`` cuts the text before it, as the
local engine does, and applies every stop sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from airoboros.contracts import AdapterPublished
from airoboros.errors import (
    ApiError,
    BackendFailure,
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    Unsupported,
)
from airoboros.inference.backend import (
    ChoiceStream,
    Chunk,
    FinishReason,
    GenerationRequest,
    ServedAdapter,
    unknown_model,
)
from airoboros.inference.settings import InferenceSettings
from airoboros.inference.text import StopMatcher

log = logging.getLogger(__name__)

MAX_TGI_STOPS = 4  # TGI's default --max-stop-sequences
FINISH: dict[str, FinishReason] = {
    "length": "length",
    "eos_token": "stop",
    "stop_sequence": "stop",
}


def _error(status: int, payload: Any) -> ApiError:
    """TGI's ``{"error", "error_type"}`` (or anything else) as one of our errors."""
    from text_generation import errors as tgi_errors

    if not isinstance(payload, dict) or "error" not in payload:
        return BackendFailure(f"TGI answered {status}: {str(payload)[:300]}")
    message = str(payload["error"])
    exc = tgi_errors.parse_error(status, payload)
    if isinstance(exc, tgi_errors.ValidationError | tgi_errors.BadRequestError) or status in (
        400,
        422,
    ):
        lowered = message.lower()
        if "must be <=" in lowered or "max_total_tokens" in lowered or "too long" in lowered:
            return ContextLengthExceeded(f"TGI: {message}")
        return InvalidRequest(f"TGI refused the request: {message}")
    if isinstance(exc, tgi_errors.OverloadedError | tgi_errors.RateLimitExceededError):
        return Overloaded(f"TGI is overloaded: {message}")
    return BackendFailure(f"TGI failed: {message}")


def _sse_events(line: str) -> Any:
    """The JSON of one SSE ``data:`` line, or None for other lines."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


class TGIBackend:
    """Same surface as ``LocalEngine``, generation done by a TGI server at ``tgi_url``."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        tokenizer: Any = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self._model_id = settings.served_model_id()
        self._tok = tokenizer
        self._http = http
        self._own_http = http is None
        self._ready = False
        self._tasks: set[asyncio.Task[None]] = set()
        # LORA_ADAPTERS entries are "org/id[@rev]" or "name=/path": the id a request
        # names is the part before "=" (TGI's adapter_id).
        self._adapters = {
            entry.split("=", 1)[0].strip(): ServedAdapter(
                name=entry.split("=", 1)[0].strip(), source=entry, resident=True
            )
            for entry in settings.tgi_adapter_list()
        }

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def ready(self) -> bool:
        return self._ready

    def adapters(self) -> list[ServedAdapter]:
        return [self._adapters[k] for k in sorted(self._adapters)]

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    async def start(self) -> None:
        if self._ready:
            return
        if self._tok is None and self.settings.base_model:
            from transformers import AutoTokenizer

            self._tok = await asyncio.to_thread(
                AutoTokenizer.from_pretrained,
                self.settings.base_model,
                local_files_only=True,
                trust_remote_code=False,
            )
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.settings.tgi_url.rstrip("/"),
                timeout=httpx.Timeout(self.settings.tgi_timeout, connect=10.0),
            )
        try:
            info = await self._http.get("/info", timeout=5.0)
            if info.status_code == 200:
                log.info("TGI at %s serves %s", self.settings.tgi_url, info.json().get("model_id"))
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("TGI at %s is not answering yet: %s", self.settings.tgi_url, exc)
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None and self._own_http:
            await self._http.aclose()

    async def load_adapter(
        self, name: str, source: str, *, replace: bool = False, description: str = ""
    ) -> ServedAdapter:
        raise Unsupported(
            "the TGI backend cannot load adapters at run time: TGI loads them only at start "
            "(LORA_ADAPTERS); add it there, restart TGI and list it in AIROBOROS_TGI_ADAPTERS"
        )

    async def unload_adapter(self, name: str) -> None:
        raise Unsupported(
            "the TGI backend cannot unload adapters at run time (TGI has no such API)"
        )

    async def on_adapter_published(self, msg: AdapterPublished) -> None:
        if msg.expert in self._adapters:
            log.warning(
                "adapter %s version %s was published; TGI serves the version it started with "
                "until it is restarted",
                msg.expert,
                msg.version,
            )
        else:
            log.warning(
                "adapter %s was published but TGI does not serve it (add it to LORA_ADAPTERS)",
                msg.expert,
            )

    # --- generation ---------------------------------------------------------------------------

    def _parameters(self, req: GenerationRequest, i: int, max_new: int | None) -> dict[str, Any]:
        s = req.sampling
        params: dict[str, Any] = {"max_new_tokens": max_new, "details": True}
        if s.temperature > 0:
            params["do_sample"] = True
            params["temperature"] = s.temperature
            if s.top_p < 1:
                params["top_p"] = s.top_p
            if s.top_k > 0:
                params["top_k"] = s.top_k
            if s.seed is not None:
                params["seed"] = s.seed + i
        else:
            params["do_sample"] = False
        if req.stop:
            params["stop"] = list(req.stop[:MAX_TGI_STOPS])
        if req.adapter is not None:
            params["adapter_id"] = req.adapter
        return params

    async def submit(self, request: GenerationRequest) -> list[ChoiceStream]:
        if not self._ready or self._http is None:
            raise BackendFailure("the TGI backend is not started")
        if not isinstance(request.prompt, str):
            raise Unsupported(
                "token-id prompts are not supported with the TGI backend", param="prompt"
            )
        if request.adapter is not None and request.adapter not in self._adapters:
            raise unknown_model(request.adapter)
        if request.response_format is not None:
            raise Unsupported(
                "response_format (json) is not supported with the TGI backend",
                param="response_format",
            )
        prompt_tokens = 0
        if self._tok is not None:
            prompt_tokens = len(self._tok(request.prompt)["input_ids"])
        cap = self.settings.max_new_tokens
        max_new = min(request.max_tokens or cap, cap)
        if request.stream:
            gens = []
            try:
                for i in range(request.n):
                    gens.append(await self._open_stream(request, i, max_new, prompt_tokens))
            except BaseException:
                for g in gens:
                    g.cancel()
                raise
            return gens
        return list(
            await asyncio.gather(
                *(self._generate(request, i, max_new, prompt_tokens) for i in range(request.n))
            )
        )

    async def _post(self, request: GenerationRequest, i: int, max_new: int) -> dict[str, Any]:
        """``POST /generate``; retried once without a length when TGI finds the server's
        cap too long for this prompt and the client asked for no particular length."""
        assert self._http is not None
        params = self._parameters(request, i, max_new)
        if self._tok is None:
            params["decoder_input_details"] = True  # the prompt's tokens: usage
        body = {"inputs": request.prompt, "parameters": params}
        try:
            resp = await self._http.post("/generate", json=body)
        except httpx.HTTPError as exc:
            raise BackendFailure(f"cannot reach TGI at {self.settings.tgi_url}: {exc}") from exc
        if resp.status_code >= 400:
            err = _error(resp.status_code, _json(resp))
            if isinstance(err, ContextLengthExceeded) and request.max_tokens is None and max_new:
                params["max_new_tokens"] = None  # TGI: whatever the context leaves
                resp = await self._http.post("/generate", json=body)
                if resp.status_code < 400:
                    return dict(resp.json())
                err = _error(resp.status_code, _json(resp))
            raise err
        return dict(resp.json())

    async def _generate(
        self, request: GenerationRequest, i: int, max_new: int, prompt_tokens: int
    ) -> ChoiceStream:
        from text_generation.types import Response

        raw = await self._post(request, i, max_new)
        parsed = Response.model_validate(raw)
        details = raw.get("details") or {}
        if not prompt_tokens:
            prompt_tokens = int(details.get("input_length") or len(parsed.details.prefill))
        gen = ChoiceStream(prompt_tokens, index=i)
        stops = StopMatcher(request.stop)
        text, stopped = stops.push(parsed.generated_text)
        if not stopped:
            text += stops.flush()
        finish = "stop" if stopped else FINISH.get(parsed.details.finish_reason.value, "stop")
        gen.put(Chunk(text, finish, parsed.details.generated_tokens))
        return gen

    async def _open_stream(
        self, request: GenerationRequest, i: int, max_new: int, prompt_tokens: int
    ) -> ChoiceStream:
        """Start ``/generate_stream`` and read up to its first event, so that a refused
        request raises here (an HTTP status for the client) rather than mid-stream."""
        assert self._http is not None
        params = self._parameters(request, i, max_new)
        body = {"inputs": request.prompt, "parameters": params}
        for attempt in range(2):
            try:
                resp = await self._http.send(
                    self._http.build_request("POST", "/generate_stream", json=body), stream=True
                )
            except httpx.HTTPError as exc:
                raise BackendFailure(f"cannot reach TGI at {self.settings.tgi_url}: {exc}") from exc
            lines = resp.aiter_lines()
            try:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error(resp.status_code, _json(resp))
                first = await _next_event(lines)
                if isinstance(first, dict) and "error" in first:
                    raise _error(422 if first.get("error_type") == "validation" else 500, first)
            except ContextLengthExceeded:
                await resp.aclose()
                if attempt == 0 and request.max_tokens is None:
                    params["max_new_tokens"] = None
                    continue
                raise
            except BaseException:
                await resp.aclose()
                raise
            gen = ChoiceStream(prompt_tokens, index=i)
            task = asyncio.create_task(self._pump(gen, resp, lines, first, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return gen
        raise AssertionError("unreachable")

    async def _pump(
        self,
        gen: ChoiceStream,
        resp: httpx.Response,
        lines: AsyncIterator[str],
        first: Any,
        request: GenerationRequest,
    ) -> None:
        from text_generation.types import StreamResponse

        stops = StopMatcher(request.stop)
        count = 0
        event = first
        try:
            while event is not None and not gen.cancelled:
                if "error" in event:
                    gen.put(Chunk("", error=_error(500, event), completion_tokens=count))
                    return
                parsed = StreamResponse.model_validate(event)
                count += 1
                if parsed.details is not None:
                    count = parsed.details.generated_tokens
                    input_length = (event.get("details") or {}).get("input_length")
                    if not gen.prompt_tokens and input_length:
                        gen.prompt_tokens = int(input_length)
                piece = "" if parsed.token.special else parsed.token.text
                text, stopped = stops.push(piece)
                if stopped:
                    gen.put(Chunk(text, "stop", count))
                    return
                if parsed.details is not None:
                    text += stops.flush()
                    finish = FINISH.get(parsed.details.finish_reason.value, "stop")
                    gen.put(Chunk(text, finish, count))
                    return
                if text:
                    gen.put(Chunk(text, None, count))
                event = await _next_event(lines)
            if not gen.cancelled and not gen.done:
                gen.put(
                    Chunk(
                        "",
                        error=BackendFailure("TGI ended the stream before the generation finished"),
                        completion_tokens=count,
                    )
                )
        except (httpx.HTTPError, ValueError) as exc:
            gen.put(
                Chunk(
                    "", error=BackendFailure(f"TGI stream failed: {exc}"), completion_tokens=count
                )
            )
        finally:
            with contextlib.suppress(Exception):
                await resp.aclose()


async def _next_event(lines: AsyncIterator[str]) -> Any:
    async for line in lines:
        event = _sse_events(line)
        if event is not None:
            return event
    return None


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text
