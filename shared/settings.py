"""Service settings, read once at start from environment variables (AIROBOROS_*).

One pydantic-settings class per service on a shared base; README lists every variable.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What every deployed service reads."""

    model_config = SettingsConfigDict(env_prefix="AIROBOROS_", extra="ignore")

    #: The settings a deployment must give this service (their defaults suit one laptop:
    #: loopback addresses, no keys). docker-compose.yml and deploy/k8s set each of them for
    #: the service; tests/unit/test_deploy_settings.py holds them to it.
    deploy_required: ClassVar[tuple[str, ...]] = ()
    #: the service's command in its image
    module: ClassVar[str] = ""

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: exchange and queue name prefix (lets several deployments share one broker)
    amqp_prefix: str = "airoboros"
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/airoboros"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: key prefix in Redis (limiter and budget counters)
    redis_prefix: str = "airoboros"
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    s3_bucket: str = "airoboros"
    s3_secure: bool = False
    weaviate_url: str | None = None
    #: comma-separated API keys accepted as "Authorization: Bearer <key>"
    api_keys: str = ""
    host: str = "0.0.0.0"
    port: int = 8080
    #: deliveries of a message before it is dead-lettered
    max_deliveries: int = 5
    #: partitions of the dedupe topic. 1: one queue that every dedupe replica consumes
    #: (one job's dedupe spread over all of them, safe through a PostgreSQL lock per
    #: dataset); N > 1: split by job, one active replica per partition (>= replicas)
    dedupe_partitions: int = 1
    log_level: str = "INFO"
    openai_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "AIROBOROS_OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_BASE_URL", "AIROBOROS_OPENAI_BASE_URL"),
    )

    # --- what a posted config may ask (airoboros.policy) -------------------------------
    #: base URLs (comma-separated) a posted job may name besides the server's own
    #: OPENAI_BASE_URL; none by default. The server's key is sent to its own endpoint only.
    allowed_base_urls: str = ""
    #: folders (comma-separated) that path-like keys of a posted job (prompt_path,
    #: documents_path, ...) may point into; none by default
    allowed_paths: str = ""
    #: embedding models (comma-separated) a posted job may name besides the default
    allowed_embedding_models: str = ""
    #: the largest count and batch size a posted job may ask for
    max_count: int = 1_000_000
    max_batch_size: int = 100

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def partitions(self) -> dict[str, int]:
        from airoboros.contracts import CandidatesProposed

        return {CandidatesProposed.topic: self.dedupe_partitions}


# The broker topology must be the same in every service, and so must the object store.
_BROKER = ("amqp_url", "amqp_prefix", "max_deliveries", "dedupe_partitions")
_S3 = ("s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket", "s3_secure")


class TopicsSettings(ServiceSettings):
    deploy_required = (
        *_BROKER,
        "database_url",
        "redis_url",
        *_S3,
        "api_keys",
        "port",
        "router_url",
    )
    module = "airoboros.topics"
    port: int = 8080
    #: seconds between controller ticks (timeouts, top-ups) besides those on each result
    tick_interval: float = 2.0
    #: how long a topics replica's hold on a job lasts without renewal
    lease_seconds: float = 30.0
    #: keys (comma-separated, also accepted as API keys) that see and act on every job;
    #: any other key sees only the jobs it created
    admin_api_keys: str = ""
    #: serve /docs, /redoc and /openapi.json without a key
    public_docs: bool = False
    #: the largest request body (a posted config), in bytes: 413 beyond, before it is read
    max_body_bytes: int = 2 * 1024 * 1024
    #: the largest upload of documents (POST /v1/documents), in bytes, all files together
    max_upload_bytes: int = 64 * 1024 * 1024
    #: where uploaded documents are unpacked for the jobs that use them
    work_dir: str = "/tmp/airoboros-topics"
    #: the router (``http://router:8085``) the web console's playground and experts page
    #: reach, server-side: a client never names it. Empty: no playground, no pods
    router_url: str | None = None
    #: the key sent to the router for the console (the first, if a comma-separated list
    #: is given, such as the router's own AIROBOROS_API_KEYS); empty: the caller's own
    #: Authorization header is forwarded, so the console's key must be a router key too
    router_api_key: str | None = None

    def admin_key_list(self) -> list[str]:
        return [k.strip() for k in self.admin_api_keys.split(",") if k.strip()]

    def router_base(self) -> str | None:
        """``router_url`` without a trailing ``/`` or ``/v1``; None when unset."""
        url = (self.router_url or "").strip().rstrip("/")
        if not url:
            return None
        return url.removesuffix("/v1")

    def router_key(self) -> str | None:
        keys = [k.strip() for k in (self.router_api_key or "").split(",") if k.strip()]
        return keys[0] if keys else None


class GeneratorSettings(ServiceSettings):
    # No database: commands carry their job's settings, the job board (Redis) the rest.
    deploy_required = (*_BROKER, "redis_url", "openai_api_key", "port")
    module = "airoboros.generator"
    port: int = 8081
    #: LLM calls in flight in this replica
    max_concurrency: int = 32


class DedupeSettings(ServiceSettings):
    deploy_required = (*_BROKER, "database_url", "weaviate_url", "port")
    module = "airoboros.dedupe"
    port: int = 8082
    embedding_model: str | None = None
    embedding_device: str = "cpu"
    embedding_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    #: torch threads for the embedding forward pass in this replica (0: torch's default,
    #: one per core; with several replicas on one host, cores / replicas)
    embedding_threads: int = 0
    #: messages screened at once by this replica when the dedupe topic is not
    #: partitioned (AIROBOROS_DEDUPE_PARTITIONS=1): they are embedded together
    dedupe_concurrency: int = 8
    #: milliseconds the first message of an embedding batch waits for others to join it
    embedding_batch_wait_ms: float = 10.0
    #: most texts in one embedding batch
    embedding_batch_texts: int = 256
    #: vectors in a job's faiss index above which it is searched approximately (IVF over
    #: 8-bit codes, candidates re-scored exactly: airoboros.vectors)
    dedupe_approx_above: int = Field(default=20_000, ge=1)
    #: object store for snapshots of the faiss indexes (``s3://<bucket>`` at
    #: AIROBOROS_S3_ENDPOINT with its keys, ``http(s)://...``, or a folder); unset: none,
    #: and a restarted replica reloads every vector from PostgreSQL and rebuilds
    dedupe_snapshot_url: str | None = None
    #: save a job's index snapshot each time it has grown by this many vectors
    dedupe_snapshot_every: int = Field(default=50_000, ge=1)


class TrainerSettings(ServiceSettings):
    deploy_required = (*_BROKER, "database_url", *_S3, "base_model", "work_dir", "port")
    module = "airoboros.trainer"
    port: int = 8083
    #: local path of the base model (a mounted volume in a deployment)
    base_model: str = ""
    #: experts to train, comma-separated; empty: every expert of the map
    experts: str = ""
    #: path of a YAML file of TrainConfig keys (lora_r, epochs, learning_rate, ...); empty:
    #: the defaults
    train_config: str = ""
    #: path of a YAML file mapping category -> expert; empty: the six default experts
    expert_map: str = ""
    #: scratch space for segments, checkpoints and packages
    work_dir: str = "/tmp/airoboros-trainer"


def env_name(settings: type[ServiceSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``settings``: its alias when it has
    one (``OPENAI_API_KEY``), else ``AIROBOROS_<FIELD>``."""
    info = settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    if isinstance(alias, str):
        return alias
    return f"AIROBOROS_{field.upper()}"
