"""Settings of the inference service, read once at start from AIROBOROS_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from airoboros.settings import ServiceSettings


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class InferenceSettings(ServiceSettings):
    deploy_required = (
        "base_model",
        "device",
        "amqp_url",
        "amqp_prefix",
        "max_deliveries",
        "dedupe_partitions",
        "subscribe_adapters",
        "s3_endpoint",
        "s3_access_key",
        "s3_secret_key",
        "s3_bucket",
        "s3_secure",
        "port",
    )
    module = "airoboros.inference"
    port: int = 8084
    #: "local": this process holds the base model and the adapters (transformers + peft);
    #: "tgi": a text-generation-inference server does the generation (``tgi_url``)
    backend: Literal["local", "tgi"] = "local"
    #: local folder of the base model (safetensors weights and tokenizer); with the TGI
    #: backend, optional: the tokenizer there renders chat templates and counts tokens
    base_model: str = ""
    #: the id under which the base model is served (``model`` of a request, /v1/models);
    #: empty: the base model folder's name
    model_id: str = ""
    #: LMoE package folders, comma-separated: every ``adapters/<name>/`` is registered at
    #: start (and adapter paths under them may be loaded at run time)
    lmoe_paths: str = ""
    #: more folders, comma-separated, that ``POST /v1/adapters`` paths may point into
    adapter_roots: str = ""
    #: where adapters fetched from an object store (s3://) are kept
    cache_dir: str = "/tmp/airoboros-inference"
    #: adapters held in memory at once; the least recently used idle one is evicted
    max_resident_adapters: int = 8
    #: sequences decoded together in one forward pass
    max_batch_size: int = 32
    #: prompt tokens prefilled in one scheduler step (one long prompt is always admitted)
    max_prefill_tokens: int = 4096
    #: cap on the tokens generated for one choice (a larger max_tokens is lowered to it)
    max_new_tokens: int = 2048
    #: sequences waiting for a batch slot before new requests get 429
    max_waiting: int = 1024
    #: the largest ``n`` accepted
    max_n: int = 16
    #: the largest request body accepted, in bytes (413 above it)
    max_body_bytes: int = 2 * 1024 * 1024
    #: "cpu", "cuda", "cuda:1", "mps"; "auto": cuda when available
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: how a batch's rows get their own adapters: "stacked" (every resident adapter's
    #: matrices side by side, one masked pass per layer: services/inference/lora.py) or
    #: "peft" (peft's ``adapter_names`` path); adapters "stacked" cannot express (DoRA, a
    #: LoRA bias, non-Linear layers) switch the engine to "peft" on their own
    mixed_lora: Literal["stacked", "peft"] = "stacked"
    #: how chat messages become a prompt: "airoboros" (``{system}\\nUSER: ...\\nASSISTANT: ``,
    #: what the trainer trains on), "chat-template" (the tokenizer's chat template; "template"
    #: is its older spelling), "auto" (the template when the tokenizer has one, else airoboros)
    prompt_format: Literal["auto", "airoboros", "chat-template", "template"] = "auto"
    #: subscribe to ``adapter.published`` on the broker (``amqp_url``) and load each new
    #: adapter as it is announced
    subscribe_adapters: bool = False
    #: the bus group of this replica's subscription (each replica needs its own copy of
    #: every announcement); empty: "inference-<hostname>"
    adapter_events_group: str = ""
    #: TGI backend: the server's base URL (http://tgi:80)
    tgi_url: str = ""
    #: TGI backend: the adapter ids the server was started with (its LORA_ADAPTERS),
    #: comma-separated; TGI cannot load adapters at run time
    tgi_adapters: str = ""
    #: TGI backend: seconds one generation may take
    tgi_timeout: float = 600.0

    def lmoe_path_list(self) -> list[Path]:
        return [Path(p) for p in _split(self.lmoe_paths)]

    def adapter_root_list(self) -> list[Path]:
        """Every folder an adapter path may resolve into (packages, roots, the cache)."""
        extra = [Path(p) for p in _split(self.adapter_roots)]
        return [*self.lmoe_path_list(), *extra, Path(self.cache_dir)]

    def tgi_adapter_list(self) -> list[str]:
        return _split(self.tgi_adapters)

    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        if self.base_model:
            return Path(self.base_model).name or "base"
        return "base"
