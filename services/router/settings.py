"""Settings of the router (``python -m airoboros.router``), from AIROBOROS_* variables.

docs/router.md describes each one and how they interact.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from airoboros.settings import ServiceSettings

RoutingRule = Literal["centroid", "mean", "vote", "hybrid"]


class RouterSettings(ServiceSettings):
    deploy_required = (
        "backends",
        "lmoe",
        "amqp_url",
        "amqp_prefix",
        "max_deliveries",
        "dedupe_partitions",
        "s3_endpoint",
        "s3_access_key",
        "s3_secret_key",
        "s3_bucket",
        "s3_secure",
        "api_keys",
        "port",
    )
    module = "airoboros.router"
    port: int = 8085

    # --- where requests go ---------------------------------------------------------------
    #: comma-separated base URLs of OpenAI-compatible backends (``http://pod:8000`` or
    #: ``http://pod:8000/v1``): inference pods, TGI-fronting pods, vLLM with LoRA, ...
    backends: str = ""
    #: bearer key the router sends to the backends (None: none)
    backend_api_key: str | None = None
    #: seconds to open a connection to a backend before another pod is tried
    backend_connect_timeout: float = Field(default=3.0, gt=0)
    #: seconds a backend may take between two bytes of its answer (generations are long)
    backend_read_timeout: float = Field(default=600.0, gt=0)
    #: seconds between health checks (``GET /v1/models``, which also says which adapters a
    #: pod holds; ``/health``/``/healthz`` for servers without it)
    health_interval: float = Field(default=10.0, gt=0)
    #: a pod holding the expert is preferred unless it has this many more requests in
    #: flight than the least loaded pod (bounded spill-over: no hot spot on one pod)
    affinity_slack: int = Field(default=8, ge=0)

    # --- what can be routed to -----------------------------------------------------------
    #: an LMoE package (``adapters/<expert>/``, ``routing_data/expert_<expert>.jsonl``) as a
    #: local path, ``file://`` URL or ``s3://<bucket>/<prefix>`` (at s3_endpoint); empty:
    #: experts arrive only through ``adapter.published``
    lmoe: str = ""
    #: comma-separated names that, like "auto", ask the router to choose (the base
    #: model's name, which clients of the original server send)
    base_models: str = ""
    #: the expert for requests with nothing to route on (token-id prompts) and when no
    #: expert has routing samples; empty: such requests get a 503
    default_expert: str = ""

    # --- how the expert is chosen ----------------------------------------------------------
    #: neighbours per query (the original's --router-k; the mean, vote and hybrid rules)
    router_k: int = Field(default=20, ge=1)
    #: routing samples kept per expert, drawn with ``seed`` (the original's
    #: --router-max-samples)
    router_max_samples: int = Field(default=1000, ge=1)
    #: centroid: the expert whose normalised mean sample is nearest (the most accurate in
    #: bench/router_bench.py, docs/router.md has the figures); mean: the original's lowest
    #: mean distance of each expert's k nearest; vote: similarity-weighted vote of the k
    #: nearest samples of all experts; hybrid: centroid and mean averaged
    routing_rule: RoutingRule = "centroid"
    #: vote weights are exp(similarity / temperature)
    vote_temperature: float = Field(default=0.05, gt=0)
    #: characters of the routing text embedded (head and tail kept beyond that)
    routing_max_chars: int = Field(default=2000, ge=100)
    seed: int = 42
    embedding_model: str | None = None
    embedding_device: str = "cpu"
    embedding_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    #: torch threads for the query embeddings (0: torch's default, one per core). One query
    #: is a short sequence: a second thread saves little and, on a busy machine, costs more
    #: in contention (bench/router_bench.py); concurrent requests are embedded in batches.
    embedding_threads: int = Field(default=1, ge=0)
    #: ask the agent expert (through a backend) to choose; the embedding rule on failure
    agent_router: bool = False
    agent_expert: str = "function"
    agent_timeout: float = Field(default=10.0, gt=0)

    # --- the front door --------------------------------------------------------------------
    #: requests per minute per API key (per client address when no keys are set); 0: off
    rate_limit_per_minute: int = Field(default=0, ge=0)
    #: largest request body accepted, in bytes (413 beyond)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    # --- updates ---------------------------------------------------------------------------
    #: consume ``adapter.published`` from the broker (amqp_url) to add experts live
    bus: bool = True
    #: consumer group on the broker. Replicas sharing a group share the events (each goes
    #: to one replica); give each replica its own group for every replica to get each one,
    #: or rely on ``rescan_interval``
    bus_group: str = "router"
    #: seconds between rereads of the ``lmoe`` package for experts added elsewhere; 0: off
    rescan_interval: float = Field(default=0.0, ge=0)

    def backend_list(self) -> list[str]:
        return [u.strip() for u in self.backends.split(",") if u.strip()]

    def base_model_list(self) -> list[str]:
        return [m.strip() for m in self.base_models.split(",") if m.strip()]
