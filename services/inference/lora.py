"""Every row's own LoRA in one dense pass per layer: the engine's mixed-adapter forward.

peft loads and checks the adapters; this module applies them. peft's own mixed-batch path
(``adapter_names=[...]``) loops over the distinct adapters in every LoRA layer, indexes each
one's rows out of the batch with Python lists, runs two ``nn.Linear`` modules and scatters
the result back, and (re)registers a pre-forward hook on every module of the model on each
call. On a 135M model at batch 32 that costs more than the base model itself (measured in
bench/inference_bench.py). Here, per LoRA layer:

* the resident adapters' ``A`` matrices are stacked side by side into one ``[in, R]``
  matrix and their ``B`` matrices (times each adapter's scaling) into one ``[R, out]``,
  ``R`` being the sum of the adapters' ranks (zeros where an adapter does not target the
  layer);
* a step's rows carry a 0/1 mask ``[B, 1, R]`` that keeps only the columns of the row's own
  adapter (all zeros for a base-model row), built once per step;
* a forward hook on the layer's base ``Linear`` adds ``((x @ A) * mask) @ B``: two small
  matrix products and one multiply, whatever the number of adapters in the batch.

The cost is ``R`` columns instead of one adapter's ``r``: with a handful of resident
adapters of rank 8-64 that is far below the base layer's own width, so the mask is cheaper
than any gather. The peft layers stay in the model with their adapters disabled (they then
call only the base layer, whose hook does the rest).

Adapters this cannot express exactly (a bias on ``B``, a layer that is not a plain
``Linear``) make :func:`unsupported` say why; the engine then serves every adapter through
peft's own path instead. LoRA variants such as DoRA cannot be mixed in a batch by either
path (:func:`variant_of`); the engine refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class _Layer:
    module: Any  # peft.tuners.lora.Linear
    handle: Any = None  # the forward hook's RemovableHandle on module.base_layer
    a: Any = None  # Tensor[in, R] or None when no resident adapter targets the layer
    b: Any = None  # Tensor[R, out]


@dataclass
class MixedLoRA:
    """The stacked weights of every LoRA layer and the current step's row mask."""

    #: slot -> (first column, rank) in every layer's stacked matrices
    columns: dict[str, tuple[int, int]] = field(default_factory=dict)
    width: int = 0
    _layers: list[_Layer] = field(default_factory=list)
    _table: Any = None  # Tensor[len(columns) + 1, R]: row i keeps slot i's columns; last: none
    _index: dict[str, int] = field(default_factory=dict)
    _mask: Any = None  # Tensor[B, 1, R] during a forward pass, else None

    def rebuild(self, peft_model: Any) -> None:
        """Restack every layer from the adapters peft holds now (after a load or delete).
        Call :func:`unsupported` first: this assumes plain LoRA on ``Linear`` layers."""
        import torch
        from peft.tuners.lora import LoraLayer

        slots = list(peft_model.peft_config)
        modules: list[Any] = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        ranks: dict[str, int] = {}
        for m in modules:
            for slot in slots:
                if slot in m.lora_A:
                    ranks[slot] = max(ranks.get(slot, 0), int(m.lora_A[slot].out_features))
        self.columns = {}
        offset = 0
        for slot in slots:
            if slot in ranks:
                self.columns[slot] = (offset, ranks[slot])
                offset += ranks[slot]
        self.width = offset
        known = {id(layer.module): layer for layer in self._layers}
        layers = []
        for m in modules:
            layer = known.pop(id(m), None)
            if layer is None:
                layer = _Layer(m)
                layer.handle = m.base_layer.register_forward_hook(self._hook(layer))
            layers.append(layer)
            # peft's layer then calls only its base layer; the hook adds the LoRA.
            m.enable_adapters(False)
            weight = m.base_layer.weight
            present = [s for s in self.columns if s in m.lora_A]
            if not present:
                layer.a = layer.b = None
                continue
            a = torch.zeros(m.in_features, self.width, dtype=weight.dtype, device=weight.device)
            b = torch.zeros(self.width, m.out_features, dtype=weight.dtype, device=weight.device)
            for slot in present:
                start, _ = self.columns[slot]
                r = int(m.lora_A[slot].out_features)
                a[:, start : start + r] = m.lora_A[slot].weight.T.to(weight.dtype)
                scaled = m.lora_B[slot].weight.T * float(m.scaling[slot])
                b[start : start + r, :] = scaled.to(weight.dtype)
            layer.a, layer.b = a, b
        for stale in known.values():  # layers peft no longer has (never expected)
            stale.handle.remove()
        self._layers = layers
        dtype = modules[0].base_layer.weight.dtype if modules else torch.float32
        device = modules[0].base_layer.weight.device if modules else None
        self._index = {slot: i for i, slot in enumerate(self.columns)}
        table = torch.zeros(len(self.columns) + 1, self.width, dtype=dtype, device=device)
        for slot, i in self._index.items():
            start, r = self.columns[slot]
            table[i, start : start + r] = 1
        self._table = table

    def detach(self) -> None:
        """Remove every hook (the engine falls back to peft's own path)."""
        for layer in self._layers:
            layer.handle.remove()
            layer.module.enable_adapters(True)
        self._layers = []
        self.columns = {}
        self.width = 0

    def rows(self, slots: Sequence[str]) -> _Rows:
        """A context in which a forward pass applies ``slots[i]``'s adapter to row i (a slot
        this does not hold, such as ``"__base__"``, gets none)."""
        return _Rows(self, slots)

    def _hook(self, layer: _Layer) -> Any:
        # The stacked weights are in the base layer's dtype, which its input and output
        # have too (the base layer would have refused anything else).
        def hook(_module: Any, args: tuple[Any, ...], out: Any) -> Any:
            mask = self._mask
            if mask is None or layer.a is None:
                return None
            h = args[0] @ layer.a  # [B, T, R]
            h.mul_(mask)
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), layer.b)
            return out

        return hook


class _Rows:
    def __init__(self, mixed: MixedLoRA, slots: Sequence[str]) -> None:
        self.mixed = mixed
        self.slots = slots

    def __enter__(self) -> None:
        import torch

        m = self.mixed
        none = len(m._index)
        index = [m._index.get(s, none) for s in self.slots]
        if m.width == 0 or all(i == none for i in index):
            m._mask = None  # no row uses an adapter: the base model alone
            return
        idx = torch.tensor(index, dtype=torch.long, device=m._table.device)
        m._mask = m._table.index_select(0, idx)[:, None, :]  # [B, 1, R]

    def __exit__(self, *exc: object) -> None:
        self.mixed._mask = None


def variant_of(peft_model: Any, slot: str) -> str | None:
    """The LoRA variant (e.g. ``DoraLinearVariant``) adapter ``slot`` uses, or None. peft
    cannot put such an adapter in a batch with others (``adapter_names``), and neither can
    the stacked path, so the engine refuses it."""
    from peft.tuners.lora import LoraLayer

    for m in peft_model.modules():
        if isinstance(m, LoraLayer) and slot in getattr(m, "lora_variant", {}):
            return type(m.lora_variant[slot]).__name__
    return None


def unsupported(peft_model: Any) -> str | None:
    """Why :class:`MixedLoRA` cannot apply the adapters peft holds, or None."""
    from peft.tuners.lora import Linear, LoraLayer

    for name, m in peft_model.named_modules():
        if not isinstance(m, LoraLayer) or not m.lora_A:
            continue
        if type(m) is not Linear:
            return f"{name} is a {type(m).__name__} LoRA layer, not a plain Linear"
        if m.lora_variant:
            kinds = sorted({type(v).__name__ for v in m.lora_variant.values()})
            return f"{name} uses a LoRA variant ({', '.join(kinds)})"
        for slot in m.lora_A:
            if m.lora_B[slot].bias is not None:
                return f"{name} has a LoRA bias (lora_bias=True)"
    return None
