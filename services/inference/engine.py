"""The local backend: one base model, many LoRA adapters, one continuous-batching scheduler.

Design (docs/inference.md has the long form)
--------------------------------------------
One asyncio task, the *scheduler loop*, owns all scheduling state. The model runs in one
dedicated worker thread (a single-thread executor), so forward passes never block the event
loop and never overlap each other or an adapter load/unload, which go through the same
thread. A loop iteration:

1. **admit** waiting sequences, oldest first, while the batch has free rows
   (``max_batch_size``) and the step's prefill budget (``max_prefill_tokens``) lasts. A
   sequence whose adapter is not resident gets it loaded, evicting the least recently used
   adapter that no admitted sequence uses. If every slot is pinned by running sequences,
   that sequence waits, and so does every later adapter request (no starvation by newer
   requests for resident adapters); base-model requests, which need no slot, still pass.
2. **step** (in the worker thread): prefill the admitted sequences as one left-padded batch
   with a fresh KV cache, sample each one's first token, and merge them into the running
   batch (caches left-padded to a common length and concatenated on the batch axis); then
   one decode step for every running row, sample, and drop the rows that finished.
3. **deliver** the step's text deltas to each sequence's asyncio queue.

So new requests join between decode steps (continuous batching), and the running batch
never waits for a long generation to end. Requests for *different* adapters share every
forward pass: peft's ``adapter_names=[...]`` applies each row's LoRA to its own row only
(``"__base__"`` for base-model rows).

Shapes: the running batch keeps ``mask`` LongTensor[B, T] (1 where the cache holds a real
token, 0 for left padding) and a ``DynamicCache`` whose per-layer keys/values are
[B, kv_heads, T, head_dim]. Each row's next position id is its own token count, so left
padding never shifts RoPE positions. When rows finish, their cache rows are dropped and the
columns that became padding for every remaining row are trimmed.

Sampling is per row: temperature 0 is greedy (argmax); otherwise temperature, top-k, top-p
in sorted order, then an inverse-CDF draw with a uniform number from the sequence's own
``torch.Generator``. A seeded sequence thus consumes exactly one number per token whatever
else is in the batch, and gives the same tokens alone or batched (up to floating-point
differences between batch shapes, far below the sampling resolution).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from airoboros import metrics
from airoboros.contracts import AdapterPublished
from airoboros.errors import (
    AdapterConflict,
    AdapterRejected,
    AdapterUnavailable,
    ApiError,
    BackendFailure,
    ConfigError,
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
)
from airoboros.inference.adapters import (
    AdapterSources,
    ObjectStoreFactory,
    ResolvedAdapter,
    check_folder,
    check_name,
    package_adapters,
)
from airoboros.inference.backend import (
    ChoiceStream,
    Chunk,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    ServedAdapter,
    unknown_model,
)
from airoboros.inference.constrained import Constraint, Grammars
from airoboros.inference.lora import MixedLoRA, unsupported, variant_of
from airoboros.inference.settings import InferenceSettings
from airoboros.inference.text import IncrementalDecoder, StopMatcher
from airoboros.loading import MODEL_LOAD_LOCK

log = logging.getLogger(__name__)
T = TypeVar("T")
BASE = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass(eq=False)
class _Adapter:
    name: str
    resolved: ResolvedAdapter
    created: int
    #: the adapter's name inside the peft model while resident (peft names cannot hold
    #: '.', and a replaced adapter may still be finishing under its old slot)
    slot: str | None = None
    #: admitted sequences that use it; a pinned adapter is never evicted
    pins: int = 0
    last_used: float = 0.0
    #: unloaded or replaced: no new sequence may use it; deleted once unpinned
    removed: bool = False


@dataclass(eq=False)
class _Seq:
    gen: ChoiceStream
    adapter: _Adapter | None
    prompt: list[int]
    max_new: int
    sampling: SamplingParams
    generator: Any  # torch.Generator, for sampled sequences
    decoder: IncrementalDecoder
    stops: StopMatcher
    generated: int = 0
    last: int = -1  # the latest sampled token, fed to the next decode step
    finished: bool = False
    released: bool = False  # its adapter pin has been returned
    #: the grammar of its response_format (None: unconstrained)
    constraint: Constraint | None = None

    @property
    def slot(self) -> str:
        if self.adapter is None or self.adapter.slot is None:
            return BASE
        return self.adapter.slot


@dataclass(eq=False)
class _Batch:
    rows: list[_Seq]
    cache: Any  # transformers DynamicCache, layers [B, kv_heads, T, head_dim]
    mask: Any  # LongTensor[B, T]


Event = tuple[_Seq, Chunk | None]  # None: finished without anything to say (cancelled)


class LocalEngine:
    """The base model and its adapters in this process (see the module doc)."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        model: Any = None,
        tokenizer: Any = None,
        object_store: ObjectStoreFactory | None = None,
    ) -> None:
        self.settings = settings
        self._model_id = settings.served_model_id()
        self._base = model
        self._tok = tokenizer
        self._peft: Any = None
        #: the stacked mixed-adapter forward (None: peft's adapter_names path)
        self._mixed: MixedLoRA | None = MixedLoRA() if settings.mixed_lora == "stacked" else None
        self._sources = AdapterSources(settings, object_store)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference-model")
        self._registry: dict[str, _Adapter] = {}
        self._resident: list[_Adapter] = []
        self._slots = 0
        self._waiting: deque[_Seq] = deque()
        self._batch: _Batch | None = None
        self._lock = asyncio.Lock()  # residency changes (load, evict, delete)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self._closed = False
        self._eos: set[int] = set()
        self._pad = 0
        self._bos: int | None = None
        self._keep_logits = False
        #: constrained decoding for response_format, made on first use
        self._grammars: Grammars | None = None
        self.max_context = 0
        self.device: Any = None
        #: counters for tests and metrics: steps run, the largest batch decoded, the most
        #: distinct adapters (the base counting as one) in one forward pass
        self.stats = {"steps": 0, "max_batch": 0, "max_adapters": 0, "loads": 0, "evictions": 0}

    # --- the GenerationBackend surface -----------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def ready(self) -> bool:
        return self._ready

    def adapters(self) -> list[ServedAdapter]:
        return [
            ServedAdapter(
                name=a.name,
                source=a.resolved.source,
                description=a.resolved.description,
                resident=a.slot is not None,
                created=a.created,
            )
            for a in sorted(self._registry.values(), key=lambda a: a.name)
        ]

    def has_adapter(self, name: str) -> bool:
        return name in self._registry

    async def start(self) -> None:
        if self._task is not None:
            return
        await self._run_model(self._load_base)
        for lmoe in self.settings.lmoe_path_list():
            found = package_adapters(lmoe)
            if not found:
                log.warning("LMoE package %s has no adapters/<name>/ folders", lmoe)
            for name, folder in found:
                try:
                    check_name(name, reserved=[self._model_id])
                    resolved = check_folder(
                        folder, self._sources.roots, shown=str(folder), param="path"
                    )
                except AdapterRejected as exc:
                    log.error("skipping adapter %s of %s: %s", name, lmoe, exc)
                    continue
                if name in self._registry:
                    log.warning("adapter %s appears in two packages; keeping the first", name)
                    continue
                self._registry[name] = _Adapter(name, resolved, int(time.time()))
        # Preload as many as fit; the rest load on first use.
        for entry in list(self._registry.values())[: self.settings.max_resident_adapters]:
            try:
                await self._make_resident(entry)
            except ApiError as exc:
                log.error("adapter %s does not load and is not served: %s", entry.name, exc)
                del self._registry[entry.name]
        self._ready = True
        self._task = asyncio.create_task(self._loop(), name="inference-scheduler")
        log.info(
            "inference engine ready: %s on %s, %d adapters (%d resident)",
            self._model_id,
            self.device,
            len(self._registry),
            len(self._resident),
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        err = BackendFailure("the inference server is shutting down")
        for seq in [*self._waiting, *(self._batch.rows if self._batch else [])]:
            seq.gen.put(Chunk("", error=err, completion_tokens=seq.generated))
        self._waiting.clear()
        self._batch = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def submit(self, request: GenerationRequest) -> list[ChoiceStream]:
        if not self._ready:
            raise BackendFailure("the model is still loading; retry shortly")
        entry = None
        if request.adapter is not None:
            entry = self._registry.get(request.adapter)
            if entry is None:
                raise unknown_model(request.adapter)
        if isinstance(request.prompt, str) and len(request.prompt) > 20_000:
            ids = await asyncio.to_thread(self._encode, request)  # keep the event loop free
        else:
            ids = self._encode(request)
        n_prompt = len(ids)
        ctx = self.max_context
        if n_prompt >= ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens, but the prompt has "
                f"{n_prompt} tokens, leaving no room for a completion; shorten the prompt.",
                param="messages",
            )
        cap = self.settings.max_new_tokens
        limit = min(request.max_tokens or cap, cap)
        if request.max_tokens is not None and n_prompt + limit > ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{n_prompt + limit} tokens ({n_prompt} in the prompt, {limit} for the "
                "completion). Shorten the prompt or lower max_tokens.",
                param="max_tokens",
            )
        if len(self._waiting) + request.n > self.settings.max_waiting:
            raise Overloaded(f"{len(self._waiting)} sequences are waiting already; retry shortly")
        compiled = None
        if request.response_format is not None:
            # Compiling is CPU work of milliseconds to seconds: off the event loop, and
            # before anything is queued so that a bad schema is a 400.
            grammars = self._grammars
            if grammars is None:
                grammars = await asyncio.to_thread(self._make_grammars)
            compiled = await asyncio.to_thread(grammars.compile, request.response_format)
        import torch

        gens = []
        for i in range(request.n):
            s = request.sampling
            generator = None
            if s.temperature > 0:
                seed = s.seed + i if s.seed is not None else secrets.randbits(63)
                generator = torch.Generator().manual_seed(seed % (2**63))
            gen = ChoiceStream(n_prompt, index=i)
            self._waiting.append(
                _Seq(
                    gen=gen,
                    adapter=entry,
                    prompt=ids,
                    max_new=min(limit, ctx - n_prompt),
                    sampling=s,
                    generator=generator,
                    decoder=IncrementalDecoder(self._tok),
                    stops=StopMatcher(request.stop),
                    constraint=None
                    if compiled is None or self._grammars is None
                    else self._grammars.constraint(compiled),
                )
            )
            gens.append(gen)
        self._wake.set()
        return gens

    async def load_adapter(
        self, name: str, source: str, *, replace: bool = False, description: str = ""
    ) -> ServedAdapter:
        check_name(name, reserved=[self._model_id])
        resolved = await self._sources.resolve(source)
        if description and not resolved.description:
            resolved = ResolvedAdapter(
                resolved.source, resolved.folder, description, resolved.config
            )
        entry = _Adapter(name, resolved, int(time.time()))
        async with self._lock:
            old = self._registry.get(name)
            if old is not None and not replace:
                raise AdapterConflict(
                    f"an adapter named {name!r} is loaded already (from "
                    f"{old.resolved.source}); DELETE /v1/adapters/{name} first, or post "
                    '"replace": true',
                    param="name",
                )
            # Load now if a slot can be had without waiting: a broken adapter is then refused
            # here, not on its first request.
            if self._can_get_slot():
                await self._make_resident_locked(entry)
            if old is not None:
                old.removed = True
            self._registry[name] = entry
        await self._reap()
        self._wake.set()
        log.info("adapter %s registered from %s", name, resolved.source)
        return ServedAdapter(
            name, resolved.source, resolved.description, entry.slot is not None, entry.created
        )

    async def unload_adapter(self, name: str) -> None:
        entry = self._registry.pop(name, None)
        if entry is None:
            raise unknown_model(name)
        entry.removed = True
        await self._reap()
        self._wake.set()
        log.info("adapter %s unloaded", name)

    async def on_adapter_published(self, msg: AdapterPublished) -> None:
        """Load (or replace) the announced expert. Redelivery is harmless: an adapter with
        the same name and source is left as it is. A refused adapter is logged and the
        message acknowledged (retrying cannot help); a store that cannot deliver raises, so
        the message is redelivered."""
        current = self._registry.get(msg.expert)
        if current is not None and current.resolved.source == msg.uri.strip():
            return
        try:
            await self.load_adapter(msg.expert, msg.uri, replace=True, description=msg.description)
        except AdapterRejected as exc:
            log.error("announced adapter %s (%s) refused: %s", msg.expert, msg.uri, exc)

    # --- model and adapters (worker thread) ------------------------------------------------

    async def _run_model(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _load_base(self) -> None:
        import torch

        if self.settings.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(self.settings.device)
        if self._base is None or self._tok is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = Path(self.settings.base_model)
            if not self.settings.base_model or not path.is_dir():
                raise ConfigError(
                    [
                        f"AIROBOROS_BASE_MODEL: {self.settings.base_model!r} is not a local "
                        "model folder (models are never downloaded here)"
                    ]
                )
            if self._tok is None:
                self._tok = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
                    str(path), local_files_only=True, trust_remote_code=False
                )
            if self._base is None:
                dtype: Any = "auto"
                if self.settings.dtype != "auto":
                    dtype = getattr(torch, self.settings.dtype)
                elif self.device.type == "cpu":
                    dtype = torch.float32
                with MODEL_LOAD_LOCK:  # loads are not thread-safe (airoboros.loading)
                    self._base = AutoModelForCausalLM.from_pretrained(
                        str(path),
                        local_files_only=True,
                        trust_remote_code=False,
                        use_safetensors=True,
                        dtype=dtype,
                    )
        self._base.to(self.device)
        self._base.eval()
        self._base.requires_grad_(False)
        config = self._base.config
        self.max_context = int(
            getattr(config, "max_position_embeddings", 0)
            or getattr(self._tok, "model_max_length", 0)
            or 2048
        )
        eos: set[int] = set()
        for source in (getattr(self._base, "generation_config", None), config, self._tok):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list | tuple):
                eos.update(int(v) for v in value)
        self._eos = eos
        import inspect

        # Only the last position's logits are needed; most causal LMs can skip the rest.
        self._keep_logits = "logits_to_keep" in inspect.signature(self._base.forward).parameters
        self._bos = self._tok.bos_token_id
        pad = self._tok.pad_token_id
        if pad is None:
            pad = next(iter(eos), 0)
        self._pad = int(pad)

    def _make_grammars(self) -> Grammars:
        if self._grammars is None:
            vocab = int(getattr(self._base.config, "vocab_size", 0) or len(self._tok))
            self._grammars = Grammars(self._tok, vocab, sorted(self._eos))
        return self._grammars

    def _encode(self, request: GenerationRequest) -> list[int]:
        vocab = int(self._base.config.vocab_size)
        if isinstance(request.prompt, list):
            ids = [int(t) for t in request.prompt]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                    param="prompt",
                )
        else:
            ids = list(self._tok(request.prompt, add_special_tokens=False)["input_ids"])
            if request.add_bos and self._bos is not None:
                ids = [self._bos, *ids]
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        return ids

    def _load_slot(self, folder: Path, slot: str) -> None:
        with MODEL_LOAD_LOCK:  # loads are not thread-safe (airoboros.loading)
            self._load_slot_locked(folder, slot)

    def _load_slot_locked(self, folder: Path, slot: str) -> None:
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._base,
                    str(folder),
                    adapter_name=slot,
                    is_trainable=False,
                    torch_device=str(self.device),
                )
            else:
                self._peft.load_adapter(
                    str(folder),
                    adapter_name=slot,
                    is_trainable=False,
                    torch_device=str(self.device),
                )
            # peft's forward checks that its "active" adapter exists; after deletions it may
            # name a deleted one. Which one is active does not matter: every forward passes
            # adapter_names.
            self._peft.set_adapter(slot)
            self._peft.requires_grad_(False)
            self._peft.eval()
            variant = variant_of(self._peft, slot)
            if variant is not None:
                raise AdapterRejected(
                    f"it uses a LoRA variant ({variant}, e.g. DoRA), which cannot share a "
                    "batch with other adapters; serve plain LoRA (use_dora=False) or merge "
                    "it into a base model",
                    param="path",
                )
        except Exception:
            if self._peft is not None and slot in self._peft.peft_config:
                self._delete_slot(slot)
            raise
        self._restack()

    def _restack(self) -> None:
        """Rebuild the stacked adapters after a load or delete, or fall back to peft's path
        for good when an adapter needs what stacking cannot do."""
        if self._mixed is None or self._peft is None:
            return
        reason = unsupported(self._peft)
        if reason is not None:
            log.warning("mixed batches go through peft's adapter_names path: %s", reason)
            self._mixed.detach()
            self._mixed = None
            self._peft.requires_grad_(False)
            return
        self._mixed.rebuild(self._peft)

    def _delete_slot(self, slot: str) -> None:
        assert self._peft is not None
        others = [name for name in self._peft.peft_config if name != slot]
        if others and self._peft.active_adapter == slot:
            self._peft.set_adapter(others[0])  # keep "active" pointing at a live adapter
            self._peft.requires_grad_(False)
        self._peft.delete_adapter(slot)
        self._restack()

    def _can_get_slot(self) -> bool:
        return len(self._resident) < self.settings.max_resident_adapters or any(
            a.pins == 0 for a in self._resident
        )

    async def _make_resident(self, entry: _Adapter) -> bool:
        async with self._lock:
            return await self._make_resident_locked(entry)

    async def _make_resident_locked(self, entry: _Adapter) -> bool:
        """Load ``entry`` into the model, evicting the least recently used unpinned adapter
        if all slots are taken. False when every slot is pinned. Raises ``AdapterRejected``
        (peft refuses the weights) or ``AdapterUnavailable`` (its files are gone)."""
        if entry.slot is not None:
            return True
        if self.settings.max_resident_adapters < 1:
            raise AdapterUnavailable("max_resident_adapters is 0: no adapter can be loaded")
        while len(self._resident) >= self.settings.max_resident_adapters:
            idle = [a for a in self._resident if a.pins == 0]
            if not idle:
                return False
            victim = min(idle, key=lambda a: (not a.removed, a.last_used))
            await self._evict(victim)
        try:
            # Re-check the files: a folder may have changed or gone since it was registered.
            check_folder(
                entry.resolved.folder,
                [*self._sources.roots, self._sources.cache],
                shown=entry.resolved.source,
                param="path",
            )
        except AdapterRejected as exc:
            raise AdapterUnavailable(f"adapter {entry.name!r} cannot be reloaded: {exc}") from exc
        self._slots += 1
        slot = f"a{self._slots}"
        started = time.perf_counter()
        try:
            await self._run_model(lambda: self._load_slot(entry.resolved.folder, slot))
        except AdapterRejected as exc:
            metrics.ADAPTER_LOADS.labels("rejected").inc()
            raise AdapterRejected(f"adapter {entry.name!r} is refused: {exc}") from exc
        except Exception as exc:
            metrics.ADAPTER_LOADS.labels("rejected").inc()
            raise AdapterRejected(
                f"adapter {entry.name!r} does not fit the base model {self._model_id!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        entry.slot = slot
        entry.last_used = time.monotonic()
        self._resident.append(entry)
        self.stats["loads"] += 1
        metrics.ADAPTER_LOADS.labels("ok").inc()
        metrics.ADAPTERS_RESIDENT.set(len(self._resident))
        log.info(
            "adapter %s loaded as %s in %.0f ms",
            entry.name,
            slot,
            (time.perf_counter() - started) * 1000,
        )
        return True

    async def _evict(self, entry: _Adapter) -> None:
        slot = entry.slot
        if slot is None:
            return
        # Mark it gone before awaiting: the scheduler must not admit a sequence onto a slot
        # that is being deleted (it will find the adapter non-resident and wait for the lock).
        entry.slot = None
        self._resident.remove(entry)
        self.stats["evictions"] += 1
        if not entry.removed:  # made room, not a deletion
            metrics.ADAPTER_EVICTIONS.inc()
        metrics.ADAPTERS_RESIDENT.set(len(self._resident))
        await self._run_model(lambda: self._delete_slot(slot))
        log.info("adapter %s evicted (slot %s)", entry.name, slot)

    async def _reap(self) -> None:
        """Delete removed adapters that no sequence uses any more."""
        async with self._lock:
            for entry in [a for a in self._resident if a.removed and a.pins == 0]:
                await self._evict(entry)

    # --- the scheduler loop (event loop side) ---------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never let the scheduler die: every request would hang.
                log.exception("scheduler iteration failed")
                await asyncio.sleep(0.1)

    async def _iteration(self) -> None:
        self._wake.clear()
        admitted = await self._admit()
        if not admitted and self._batch is None:
            await self._wake.wait()
            return
        running = list(self._batch.rows) if self._batch is not None else []
        try:
            events = await self._run_model(lambda: self._step(admitted))
        except Exception as exc:
            log.exception("generation step failed; failing the running sequences")
            self._fail_all([*running, *admitted], exc)
            return
        self._deliver(events)
        if any(a.removed and a.pins == 0 for a in self._resident):
            await self._reap()

    async def _admit(self) -> list[_Seq]:
        free = self.settings.max_batch_size - (len(self._batch.rows) if self._batch else 0)
        admitted: list[_Seq] = []
        tokens = 0
        blocked = False
        for seq in list(self._waiting):
            if len(admitted) >= free:
                break
            if seq.finished:  # failed by _fail_waiting in this pass
                continue
            if seq.gen.cancelled:
                self._waiting.remove(seq)
                continue
            entry = seq.adapter
            if entry is not None and entry.removed:
                replacement = self._registry.get(entry.name)
                if replacement is None:
                    self._waiting.remove(seq)
                    seq.finished = True
                    seq.gen.put(Chunk("", error=unknown_model(entry.name)))
                    continue
                seq.adapter = entry = replacement
            if blocked and entry is not None:
                continue
            if admitted and tokens + len(seq.prompt) > self.settings.max_prefill_tokens:
                break
            if entry is not None and entry.slot is None:
                try:
                    got = await self._make_resident(entry)
                except Exception as exc:
                    err = (
                        exc
                        if isinstance(exc, ApiError)
                        else AdapterUnavailable(f"adapter {entry.name!r} failed to load: {exc}")
                    )
                    self._fail_waiting(entry, err)
                    continue
                if not got:
                    blocked = True
                    continue
            if entry is not None:
                entry.pins += 1
                entry.last_used = time.monotonic()
            self._waiting.remove(seq)
            admitted.append(seq)
            tokens += len(seq.prompt)
        return admitted

    def _fail_waiting(self, entry: _Adapter, exc: ApiError) -> None:
        log.error("adapter %s failed to load: %s", entry.name, exc)
        for seq in [s for s in self._waiting if s.adapter is entry]:
            self._waiting.remove(seq)
            seq.finished = True
            seq.gen.put(Chunk("", error=exc))

    def _fail_all(self, seqs: Sequence[_Seq], exc: Exception) -> None:
        """A step raised: fail every sequence it had (its events are lost) and start over
        with an empty batch (the cache may be half-updated)."""
        err = BackendFailure(f"generation failed: {type(exc).__name__}: {exc}")
        self._batch = None
        for seq in seqs:
            seq.finished = True
            if not seq.gen.done:
                seq.gen.put(Chunk("", error=err, completion_tokens=seq.generated))
            self._unpin(seq)

    def _deliver(self, events: list[Event]) -> None:
        for seq, chunk in events:
            if chunk is not None:
                seq.gen.put(chunk)
            if seq.finished:
                self._unpin(seq)

    def _unpin(self, seq: _Seq) -> None:
        if seq.released:
            return
        seq.released = True
        if seq.adapter is not None:
            seq.adapter.pins -= 1
            seq.adapter.last_used = time.monotonic()

    # --- one step (worker thread) ----------------------------------------------------------

    def _step(self, admitted: list[_Seq]) -> list[Event]:
        import torch

        events: list[Event] = []
        with torch.inference_mode():
            if self._batch is not None:
                gone = [i for i, s in enumerate(self._batch.rows) if s.gen.cancelled]
                if gone:
                    for i in gone:
                        self._batch.rows[i].finished = True
                        events.append((self._batch.rows[i], None))
                    self._batch = self._select(self._batch, gone)
            if admitted:
                new, logits = self._prefill(admitted)
                tokens = self._sample(logits, admitted)
                done = [i for i, s in enumerate(admitted) if self._accept(s, tokens[i], events)]
                joining = self._select(new, done) if done else new
                if joining is not None:
                    self._batch = (
                        joining if self._batch is None else self._merge(self._batch, joining)
                    )
            if self._batch is not None:
                rows = self._batch.rows
                self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
                distinct = len({s.slot for s in rows})
                self.stats["max_adapters"] = max(self.stats["max_adapters"], distinct)
                logits = self._decode(self._batch)
                tokens = self._sample(logits, rows)
                done = [i for i, s in enumerate(rows) if self._accept(s, tokens[i], events)]
                if done:
                    self._batch = self._select(self._batch, done)
        self.stats["steps"] += 1
        return events

    def _forward(self, rows: Sequence[_Seq], **kwargs: Any) -> Any:
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        if self._peft is None or not self._peft.peft_config:
            # No adapter loaded (any LoRA wrappers left in the model hold none): the base.
            return self._base(**kwargs)
        if self._mixed is not None:
            # peft's layers are disabled; the stacked hooks add each row's adapter.
            with self._mixed.rows([s.slot for s in rows]):
                return self._base(**kwargs)
        return self._peft(**kwargs, adapter_names=[s.slot for s in rows])

    def _prefill(self, seqs: list[_Seq]) -> tuple[_Batch, Any]:
        import torch
        from transformers import DynamicCache

        longest = max(len(s.prompt) for s in seqs)
        ids = [[self._pad] * (longest - len(s.prompt)) + s.prompt for s in seqs]
        mask = [[0] * (longest - len(s.prompt)) + [1] * len(s.prompt) for s in seqs]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [b, L]
        attention = torch.tensor(mask, dtype=torch.long, device=self.device)  # [b, L]
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [b, L], 0 on the padding
        cache = DynamicCache()
        out = self._forward(
            seqs,
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return _Batch(list(seqs), out.past_key_values, attention), out.logits[:, -1, :]

    def _decode(self, batch: _Batch) -> Any:
        import torch

        rows = batch.rows
        input_ids = torch.tensor([[s.last] for s in rows], dtype=torch.long, device=self.device)
        ones = torch.ones((len(rows), 1), dtype=batch.mask.dtype, device=self.device)
        mask = torch.cat([batch.mask, ones], dim=1)  # [B, T+1]
        # The fed token is the sequence's (prompt + generated)-th token: position count - 1.
        positions = torch.tensor(
            [[len(s.prompt) + s.generated - 1] for s in rows], dtype=torch.long, device=self.device
        )
        out = self._forward(
            rows,
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.cache = out.past_key_values
        batch.mask = mask
        return out.logits[:, -1, :]

    def _select(self, batch: _Batch, drop: Sequence[int]) -> _Batch | None:
        """``batch`` without rows ``drop``, its all-padding leading columns trimmed."""
        import torch

        keep = [i for i in range(len(batch.rows)) if i not in set(drop)]
        if not keep:
            return None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        batch.cache.batch_select_indices(index)
        mask = batch.mask.index_select(0, index)
        # Columns before the earliest real token of every remaining row are pure padding.
        first = int(mask.argmax(dim=1).min().item())
        if first > 0:
            for layer in batch.cache.layers:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]
            mask = mask[:, first:]
        return _Batch([batch.rows[i] for i in keep], batch.cache, mask)

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        """Stack two batches: the shorter one's cache and mask are left-padded to the
        longer one's length (zeros, masked out)."""
        import torch
        import torch.nn.functional as F

        ta, tb = a.mask.shape[1], b.mask.shape[1]
        width = max(ta, tb)
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            # keys/values [B, kv_heads, T, head_dim]: pad T on the left.
            la.keys = torch.cat(
                [F.pad(la.keys, (0, 0, width - ta, 0)), F.pad(lb.keys, (0, 0, width - tb, 0))]
            )
            la.values = torch.cat(
                [F.pad(la.values, (0, 0, width - ta, 0)), F.pad(lb.values, (0, 0, width - tb, 0))]
            )
        mask = torch.cat([F.pad(a.mask, (width - ta, 0)), F.pad(b.mask, (width - tb, 0))])
        return _Batch(a.rows + b.rows, a.cache, mask)

    def _sample(self, logits: Any, rows: Sequence[_Seq]) -> list[int]:
        """One token per row of ``logits`` [B, V]; see the module doc."""
        import torch

        logits = logits.float()
        constrained = [i for i, s in enumerate(rows) if s.constraint is not None]
        if constrained and self._grammars is not None:
            # Each constrained row keeps only the tokens its grammar allows next; the
            # other rows of the batch are untouched.
            bitmask = self._grammars.allocate(len(rows))  # [B, ceil(V/32)]
            for i in constrained:
                constraint = rows[i].constraint
                assert constraint is not None
                constraint.fill(bitmask, i)
                self._grammars.restrict(bitmask, i)
            self._grammars.apply(logits, bitmask, constrained)
        chosen = logits.argmax(dim=-1)  # [B], greedy for every row first
        sampled = [i for i, s in enumerate(rows) if s.sampling.temperature > 0]
        if sampled:
            dev = logits.device
            vocab = logits.shape[-1]
            idx = torch.tensor(sampled, device=dev)
            temps = torch.tensor([rows[i].sampling.temperature for i in sampled], device=dev)
            top_p = torch.tensor([rows[i].sampling.top_p for i in sampled], device=dev)
            top_k = torch.tensor([rows[i].sampling.top_k or vocab for i in sampled], device=dev)
            scaled = logits.index_select(0, idx) / temps[:, None]  # [S, V]
            ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
            probs = ordered.softmax(dim=-1)
            rank = torch.arange(vocab, device=dev)[None, :]
            # Drop ranks beyond top-k, and tokens whose preceding mass already reaches top-p
            # (the first token always stays).
            before = probs.cumsum(-1) - probs
            drop = (rank >= top_k[:, None]) | ((before >= top_p[:, None]) & (top_p[:, None] < 1))
            probs = probs.masked_fill(drop, 0.0)
            cdf = probs.cumsum(dim=-1)  # [S, V]
            draws = torch.tensor(
                [float(torch.rand((), generator=rows[i].generator)) for i in sampled],
                device=dev,
            )
            pick = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)
            pick = pick.clamp(max=vocab - 1)
            chosen = chosen.index_copy(0, idx, order.gather(1, pick)[:, 0])
        return [int(t) for t in chosen.tolist()]

    def _accept(self, seq: _Seq, token: int, events: list[Event]) -> bool:
        """Take ``token`` into ``seq``; queue its text; True when ``seq`` has finished."""
        seq.generated += 1
        seq.last = token
        if seq.constraint is not None and not seq.constraint.accept(token):
            log.warning(
                "the grammar refused a token it allowed (%d); the JSON may be invalid", token
            )
        finish: FinishReason | None = None
        if token in self._eos:
            finish = "stop"
            text, stopped = seq.stops.push(seq.decoder.flush())
            if not stopped:
                text += seq.stops.flush()
        else:
            text, stopped = seq.stops.push(seq.decoder.push(token))
            if stopped:
                finish = "stop"
            elif seq.generated >= seq.max_new:
                finish = "length"
                tail, stopped = seq.stops.push(seq.decoder.flush())
                text += tail
                if stopped:
                    finish = "stop"
                else:
                    text += seq.stops.flush()
        if seq.gen.cancelled:
            seq.finished = True
            events.append((seq, None))
            return True
        if finish is not None:
            seq.finished = True
            events.append((seq, Chunk(text, finish, seq.generated)))
            return True
        if text:
            events.append((seq, Chunk(text, None, seq.generated)))
        return False
