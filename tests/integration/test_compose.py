"""docker-compose.yml, .env.example and deploy/otel-collector.yaml agree with each other and
with the settings classes.

The compose file is rendered by the real ``docker-compose config`` (Debian's 1.29, which
.ci/run installs): with no .env, with .env.example copied to .env, and with each profile
(gpu, cpu). What it renders is then checked against the settings classes: every variable a
service is given is one of its settings, the settings a deployment must give
(``deploy_required``) are all given, connections point at services it waits for, the ports
are the ones the service listens on; and against the profiles: which services each brings
up, that nothing waits for a service of another profile, and who gets a GPU. No daemon and
no image build are needed. The Dockerfiles have their own tests (tests/unit/test_dockerfiles.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices

from airoboros.inference.settings import InferenceSettings
from airoboros.settings import (
    GeneratorSettings,
    ServiceSettings,
    TopicsSettings,
    TrainerSettings,
    env_name,
)
from tests.deployables import SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COLLECTOR_CONFIG = ROOT / "deploy" / "otel-collector.yaml"

CLASSES: tuple[type[ServiceSettings], ...] = tuple(SERVICES.values())
#: compose service -> the settings it reads (the GPU and CPU variants read the same ones)
SETTINGS: dict[str, type[ServiceSettings]] = {
    **SERVICES,
    "trainer-cpu": TrainerSettings,
    "inference-cpu": InferenceSettings,
}
#: containers that run once and exit 0; the others run until stopped
ONE_SHOTS = ("migrate", "minio-init")
#: the infrastructure, each with a healthcheck and a named volume for its data
INFRA = ("rabbitmq", "postgres", "redis", "minio", "weaviate")
#: images with no shell or HTTP client for a health check: waited for as started
NO_PROBE = ("otel-collector",)
#: what each way of starting brings up
DEFAULT = {*INFRA, *ONE_SHOTS, "topics", "generator", "dedupe", "otel-collector", "jaeger"}
PROFILES: dict[str, set[str]] = {
    "": DEFAULT,
    "gpu": DEFAULT | {"trainer", "inference", "router"},
    "cpu": DEFAULT | {"trainer-cpu", "inference-cpu", "router"},
}
GPU_SERVICES = ("trainer", "inference")
#: services published on the host: the job API, the OpenAI endpoint, the traces UI
PUBLISHED = {"topics": 8080, "router": 8085, "jaeger": 16686}

_LLM = ("openai_api_key", "openai_base_url")
#: settings a service must be given beyond its class's deploy_required
EXTRA_REQUIRED: dict[type[ServiceSettings], tuple[str, ...]] = {
    # topics calls the LLM too: it generates the topics of a job.
    TopicsSettings: _LLM,
    GeneratorSettings: _LLM,
}
#: settings that fix the broker topology and shared state: every service given one agrees
SHARED = (
    "AIROBOROS_AMQP_URL",
    "AIROBOROS_AMQP_PREFIX",
    "AIROBOROS_DATABASE_URL",
    "AIROBOROS_REDIS_URL",
    "AIROBOROS_REDIS_PREFIX",
    "AIROBOROS_DEDUPE_PARTITIONS",
    "AIROBOROS_MAX_DELIVERIES",
    "AIROBOROS_S3_ENDPOINT",
    "AIROBOROS_S3_BUCKET",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_TRACES_EXPORTER",
)
#: variables a service may be given that are no setting: OpenTelemetry's own, and the
#: NVIDIA container runtime's
_FOREIGN = re.compile(r"^(OTEL_|NVIDIA_)")

# ``$$`` is compose's escape for a literal ``$`` (a variable of the container's shell).
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)|\$([A-Za-z_][A-Za-z0-9_]*)")
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


# --------------------------------------------------------------------------- helpers


def compose_variables() -> set[str]:
    """The variables docker-compose.yml substitutes (``${VAR...}`` or ``$VAR``)."""
    found: set[str] = set()
    for m in _VARIABLE.finditer(COMPOSE.read_text()):
        name = m.group(1) or m.group(2)
        if name:
            found.add(name)
    return found


def env_example_lines() -> list[str]:
    return ENV_EXAMPLE.read_text().splitlines()


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in env_example_lines():
        m = _ASSIGNMENT.match(line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def env_names(cls: type[ServiceSettings]) -> dict[str, str]:
    """Environment variable -> settings field, as pydantic-settings reads them."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: dict[str, str] = {}
    for field, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str):
                    names[choice.upper()] = field
        elif isinstance(alias, str):
            names[alias.upper()] = field
        else:
            names[(prefix + field).upper()] = field
    return names


def as_argv(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test", [])
    return test if isinstance(test, str) else " ".join(str(a) for a in test)


def dependencies(rendered: dict[str, Any], name: str) -> dict[str, str]:
    """depends_on of ``name`` as dependency -> condition."""
    deps = rendered["services"][name].get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {dep: spec.get("condition", "service_started") for dep, spec in deps.items()}


def all_dependencies(rendered: dict[str, Any], name: str) -> set[str]:
    """Everything ``name`` waits for, directly or through another service."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for dep in dependencies(rendered, todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def container_ports(service: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:  # "host:container" or "ip:host:container", maybe with "/tcp"
            ports.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    ports.update(int(str(p).split("/")[0]) for p in service.get("expose", []))
    return ports


def published_ports(service: dict[str, Any]) -> set[int]:
    """Container ports published on the host."""
    out: set[int] = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return out


def service_env(rendered: dict[str, Any], name: str) -> dict[str, str]:
    env = rendered["services"][name].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def active(rendered: dict[str, Any], profile: str) -> set[str]:
    """The services ``docker compose [--profile <profile>] up`` starts (docker-compose 1.x
    ``config`` prints every service whatever the profile, so this reads ``profiles``)."""
    return {
        name
        for name, service in rendered["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def hostnames(rendered: dict[str, Any], name: str) -> set[str]:
    """The names a service answers to on the compose network: its own and its aliases."""
    names = {name}
    networks = rendered["services"][name].get("networks") or {}
    if isinstance(networks, dict):
        for spec in networks.values():
            names.update((spec or {}).get("aliases", []))
    return names


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service's volumes."""
    out: dict[str, tuple[str, bool]] = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = (str(v.get("source", "")), bool(v.get("read_only")))
        else:
            parts = str(v).split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    devices: list[dict[str, Any]] = (
        deploy.get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return devices


@cache
def docker_compose() -> str | None:
    return shutil.which("docker-compose")


def render(directory: Path, dotenv: str | None, *args: str) -> dict[str, Any]:
    """``docker-compose [args] config`` of a copy of docker-compose.yml in ``directory``,
    with ``dotenv`` as its .env (none when None), isolated from this shell's variables."""
    binary = docker_compose()
    if binary is None:
        pytest.skip("the docker-compose binary is not on PATH (.ci/run installs it)")
    shutil.copy(COMPOSE, directory / "docker-compose.yml")
    (directory / ".env").unlink(missing_ok=True)
    if dotenv is not None:
        (directory / ".env").write_text(dotenv)
    ours = compose_variables()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ours and not k.startswith(("COMPOSE_", "DOCKER_"))
    }
    proc = subprocess.run(
        [binary, "-f", "docker-compose.yml", *args, "config"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"docker-compose {' '.join(args)} config failed:\n{proc.stderr}"
    # A variable without a default renders as an empty string with only a warning.
    assert "is not set" not in proc.stderr, proc.stderr
    rendered: dict[str, Any] = yaml.safe_load(proc.stdout)
    return rendered


@pytest.fixture(scope="module", params=["no .env", ".env from .env.example"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("compose")
    dotenv = None if request.param == "no .env" else ENV_EXAMPLE.read_text()
    return render(directory, dotenv)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No settings variable of this shell leaks into the settings under test."""
    for cls in CLASSES:
        for name in env_names(cls):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


def load_settings(
    rendered: dict[str, Any], svc: str, clean_env: pytest.MonkeyPatch
) -> ServiceSettings:
    for name, value in service_env(rendered, svc).items():
        clean_env.setenv(name, value)
    return SETTINGS[svc]()


# --------------------------------------------------------------- (a) compose renders


def test_compose_config_passes_with_and_without_env(tmp_path: Path) -> None:
    # The same folder for both: relative mounts render as absolute paths under it.
    bare = render(tmp_path, None)
    example = render(tmp_path, ENV_EXAMPLE.read_text())
    assert set(bare["services"]) == set().union(*PROFILES.values())
    # .env.example documents the defaults: copying it changes nothing.
    for name in bare["services"]:
        assert service_env(bare, name) == service_env(example, name), name
        assert bare["services"][name].get("ports") == example["services"][name].get("ports")
        assert bare["services"][name].get("volumes") == example["services"][name].get("volumes")
        assert bare["services"][name].get("deploy") == example["services"][name].get("deploy")


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_config_passes_for_each_profile(tmp_path: Path, profile: str) -> None:
    rendered = render(tmp_path, None, "--profile", profile)
    assert active(rendered, profile) == PROFILES[profile]


def test_every_airoboros_service_is_known(rendered: Any) -> None:
    """A service that runs ``python -m airoboros.<x>`` is checked below against its settings:
    none may escape that by a name this file does not know."""
    modules = {cls.module for cls in CLASSES}
    for name, service in rendered["services"].items():
        argv = as_argv(service.get("command", []))
        if len(argv) >= 3 and argv[-2] == "-m" and argv[-1] in modules:
            assert name in SETTINGS, f"{name} runs {argv[-1]} but is not in SETTINGS"
    assert set(SETTINGS) <= set(rendered["services"])


# ------------------------------------------------------------------------ (b) profiles


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_profile_waits_only_for_its_own_services(rendered: Any, profile: str) -> None:
    """Compose refuses to start a service that waits for one of an inactive profile."""
    up = active(rendered, profile)
    assert up == PROFILES[profile]
    for name in up:
        outside = sorted(all_dependencies(rendered, name) - up)
        assert not outside, f"--profile {profile!r}: {name} waits for {outside}"


def test_only_the_gpu_profile_reserves_gpus(rendered: Any) -> None:
    for name, service in rendered["services"].items():
        devices = gpu_devices(service)
        if name in GPU_SERVICES:
            assert service["profiles"] == ["gpu"], name
            assert len(devices) == 1, name
            assert devices[0]["driver"] == "nvidia"
            assert devices[0]["capabilities"] == ["gpu"]
            assert devices[0].get("device_ids") or devices[0].get("count"), name
        else:
            assert not devices, f"{name} reserves a GPU"


@pytest.mark.parametrize("svc", ["trainer", "inference"])
def test_cpu_variant_is_the_gpu_service_without_the_gpu(rendered: Any, svc: str) -> None:
    gpu, cpu = rendered["services"][svc], rendered["services"][f"{svc}-cpu"]
    assert cpu["profiles"] == ["cpu"]
    for key in ("image", "build", "command", "volumes", "expose", "depends_on", "healthcheck"):
        assert cpu.get(key) == gpu.get(key), key
    gpu_env, cpu_env = service_env(rendered, svc), service_env(rendered, f"{svc}-cpu")
    # The NVIDIA runtime must not hand it a GPU even where it is the default runtime.
    assert cpu_env.pop("NVIDIA_VISIBLE_DEVICES") == "void"
    if svc == "inference":
        assert cpu_env.pop("AIROBOROS_DEVICE") == "cpu"
        assert gpu_env.pop("AIROBOROS_DEVICE").startswith("cuda")
    assert cpu_env == gpu_env


@pytest.mark.parametrize("svc", ["trainer", "trainer-cpu", "inference", "inference-cpu"])
def test_base_model_is_a_read_only_mount(
    rendered: Any, svc: str, clean_env: pytest.MonkeyPatch
) -> None:
    settings = load_settings(rendered, svc, clean_env)
    base_model = settings.base_model  # type: ignore[attr-defined]
    source, read_only = mounts(rendered["services"][svc])[base_model]
    assert source and read_only, f"{svc}: {base_model} is not mounted read-only"


def test_trainer_work_dir_is_on_a_named_volume(
    rendered: Any, clean_env: pytest.MonkeyPatch
) -> None:
    settings = load_settings(rendered, "trainer", clean_env)
    work_dir = Path(settings.work_dir)  # type: ignore[attr-defined]
    named = set(rendered.get("volumes", {}))
    volumes = mounts(rendered["services"]["trainer"])
    holding = [
        target
        for target, (source, read_only) in volumes.items()
        if source in named and not read_only and work_dir.is_relative_to(target)
    ]
    assert holding, f"{work_dir} is on no writable named volume"
    # The images create /var/lib/airoboros owned by the service's user, so a new volume
    # mounted there starts writable (tests/unit/test_dockerfiles.py).
    assert holding == ["/var/lib/airoboros"]


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_router_reaches_an_inference_in_each_profile(
    rendered: Any, profile: str, clean_env: pytest.MonkeyPatch
) -> None:
    settings = load_settings(rendered, "router", clean_env)
    backends = settings.backend_list()  # type: ignore[attr-defined]
    assert backends
    up = active(rendered, profile)
    for url in backends:
        parts = urlsplit(url)
        answering = [name for name in up if parts.hostname in hostnames(rendered, name)]
        assert answering, f"--profile {profile}: nothing answers to {url}"
        for name in answering:
            assert SETTINGS.get(name) is InferenceSettings, name
            assert parts.port == InferenceSettings.model_fields["port"].default


# ------------------------------------------------------ (c) services against the settings


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_service_runs_its_module_from_its_image(rendered: Any, svc: str) -> None:
    service = rendered["services"][svc]
    module = SETTINGS[svc].module
    argv = as_argv(service.get("command", []))
    assert argv[-2:] == ["-m", module], argv
    folder = module.removeprefix("airoboros.")
    assert service["build"]["dockerfile"] == f"services/{folder}/Dockerfile"
    assert service["image"] == f"airoboros/{folder}:local"
    assert (ROOT / service["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_ports_are_the_ones_the_service_listens_on(
    rendered: Any, svc: str, clean_env: pytest.MonkeyPatch
) -> None:
    cls = SETTINGS[svc]
    default = cls.model_fields["port"].default
    env = service_env(rendered, svc)
    # Given, and equal to the class's default: the image's EXPOSE and HEALTHCHECK use it.
    assert env.get("AIROBOROS_PORT") == str(default)
    port = load_settings(rendered, svc, clean_env).port
    assert port == default
    service = rendered["services"][svc]
    checked = re.findall(r"127\.0\.0\.1:(\d+)/healthz", healthcheck_text(service))
    assert checked == [str(port)], healthcheck_text(service)
    assert container_ports(service) == {port}


def test_only_the_front_doors_are_published(rendered: Any) -> None:
    published = {
        name: published_ports(service)
        for name, service in rendered["services"].items()
        if service.get("ports")
    }
    assert published == {name: {port} for name, port in PUBLISHED.items()}


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_every_variable_given_is_a_setting(rendered: Any, svc: str) -> None:
    known = env_names(SETTINGS[svc])
    given = {name for name in service_env(rendered, svc) if not _FOREIGN.match(name)}
    unknown = sorted(given - set(known))
    assert not unknown, f"{svc} is given variables that {SETTINGS[svc].__name__} ignores"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_required_settings_are_given_and_parse(
    rendered: Any, svc: str, clean_env: pytest.MonkeyPatch
) -> None:
    cls = SETTINGS[svc]
    env = service_env(rendered, svc)
    required = (*cls.deploy_required, *EXTRA_REQUIRED.get(cls, ()))
    assert "port" in cls.deploy_required
    missing = sorted(f for f in required if env_name(cls, f) not in env)
    assert not missing, f"{svc} lacks {[env_name(cls, f) for f in missing]}"
    settings = load_settings(rendered, svc, clean_env)  # every value parses
    if "api_keys" in cls.deploy_required:
        assert settings.api_key_list(), f"{svc} would accept requests without a key"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_connections_point_at_services_it_waits_for(
    rendered: Any, svc: str, clean_env: pytest.MonkeyPatch
) -> None:
    env = service_env(rendered, svc)
    s = load_settings(rendered, svc, clean_env)
    urls = [s.amqp_url]
    if "AIROBOROS_DATABASE_URL" in env:
        urls.append(s.database_url)
    if "AIROBOROS_REDIS_URL" in env:
        urls.append(s.redis_url)
    if "AIROBOROS_S3_ENDPOINT" in env:
        urls.append(f"//{s.s3_endpoint}")
    if s.weaviate_url:
        urls.append(s.weaviate_url)
    waits_for = all_dependencies(rendered, svc)
    for url in urls:
        host = urlsplit(url).hostname
        assert host in rendered["services"], f"{svc}: {url} names no compose service"
        assert host in waits_for, f"{svc} does not wait for {host}"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_service_using_the_database_waits_for_the_migration(rendered: Any, svc: str) -> None:
    uses_database = "AIROBOROS_DATABASE_URL" in service_env(rendered, svc)
    assert uses_database == ("database_url" in SETTINGS[svc].deploy_required)
    if uses_database:
        assert dependencies(rendered, svc).get("migrate") == "service_completed_successfully"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_service_sends_traces_to_the_collector(rendered: Any, svc: str) -> None:
    env = service_env(rendered, svc)
    folder = SETTINGS[svc].module.removeprefix("airoboros.")
    assert env["OTEL_SERVICE_NAME"] == f"airoboros-{folder}"
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "otel-collector", 4318)
    assert dependencies(rendered, svc).get("otel-collector") == "service_started"


def test_migrate_runs_once_on_the_services_database(rendered: Any) -> None:
    migrate = rendered["services"]["migrate"]
    assert as_argv(migrate["command"]) == ["airoboros", "migrate"]
    assert migrate["build"]["dockerfile"] == "services/topics/Dockerfile"
    assert migrate["image"] == rendered["services"]["topics"]["image"]
    assert dependencies(rendered, "migrate") == {"postgres": "service_healthy"}
    url = service_env(rendered, "migrate")["AIROBOROS_DATABASE_URL"]
    assert url.startswith("postgresql://")
    for svc in SETTINGS:
        env = service_env(rendered, svc)
        if "AIROBOROS_DATABASE_URL" in env:
            assert env["AIROBOROS_DATABASE_URL"] == url, svc


def test_services_agree_on_shared_settings(rendered: Any) -> None:
    for name in SHARED:
        values = {
            svc: service_env(rendered, svc)[name]
            for svc in SETTINGS
            if name in service_env(rendered, svc)
        }
        assert len(set(values.values())) == 1, f"{name} differs: {values}"


def test_dependency_conditions(rendered: Any) -> None:
    services = rendered["services"]
    for name in services:
        for dep, condition in dependencies(rendered, name).items():
            if dep in ONE_SHOTS:
                assert condition == "service_completed_successfully", (name, dep)
            elif dep in NO_PROBE:
                assert condition == "service_started", (name, dep)
            else:
                assert condition == "service_healthy", (name, dep)
                test = services[dep].get("healthcheck", {}).get("test")
                assert test and test != ["NONE"], f"{dep} has no healthcheck"


def test_every_long_running_service_checks_its_health(rendered: Any) -> None:
    for name, service in rendered["services"].items():
        if name in ONE_SHOTS or name in NO_PROBE:
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test != ["NONE"], f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name


def test_one_shots_are_not_restarted(rendered: Any) -> None:
    for name in ONE_SHOTS:
        assert rendered["services"][name].get("restart", "no") == "no", name


def test_images_are_pinned(rendered: Any) -> None:
    for name, service in rendered["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        if "build" in service:
            assert tag == "local", f"{name}: a built image is tagged :local, not {image}"


def test_infrastructure_checks_health_and_keeps_data_in_named_volumes(rendered: Any) -> None:
    services = rendered["services"]
    expected = {
        "rabbitmq": "rabbitmq-diagnostics -q ping",
        "postgres": "pg_isready",
        "redis": "redis-cli ping",
        "weaviate": "/v1/.well-known/ready",
        "jaeger": "127.0.0.1:14269/",
    }
    for name, probe in expected.items():
        assert probe in healthcheck_text(services[name]), name
    named = set(rendered.get("volumes", {}))
    for name in INFRA:
        sources = {source for source, _ in mounts(services[name]).values()}
        assert sources & named, f"{name} keeps its data in no named volume"
    weaviate = service_env(rendered, "weaviate")
    assert weaviate["DEFAULT_VECTORIZER_MODULE"] == "none"
    assert weaviate["AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED"] == "true"


def test_infrastructure_credentials_match_the_urls(rendered: Any) -> None:
    env = service_env(rendered, "topics")
    amqp = urlsplit(env["AIROBOROS_AMQP_URL"])
    rabbit = service_env(rendered, "rabbitmq")
    assert (amqp.username, amqp.password) == (
        rabbit["RABBITMQ_DEFAULT_USER"],
        rabbit["RABBITMQ_DEFAULT_PASS"],
    )
    db = urlsplit(env["AIROBOROS_DATABASE_URL"])
    pg = service_env(rendered, "postgres")
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    minio = service_env(rendered, "minio")
    assert (env["AIROBOROS_S3_ACCESS_KEY"], env["AIROBOROS_S3_SECRET_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    init = rendered["services"]["minio-init"]
    assert "minio/mc" in init["image"]
    assert dependencies(rendered, "minio-init") == {"minio": "service_healthy"}
    assert service_env(rendered, "minio-init")["S3_BUCKET"] == env["AIROBOROS_S3_BUCKET"]
    assert "mc mb" in " ".join(as_argv(init.get("entrypoint", [])) + as_argv(init["command"]))


# ------------------------------------------------------------ (d) the traces' way out


def collector_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    return config


def test_collector_runs_the_config_in_deploy(rendered: Any) -> None:
    collector = rendered["services"]["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    config_arg = next(a for a in as_argv(collector["command"]) if a.startswith("--config"))
    path = config_arg.split("=", 1)[1]
    source, read_only = mounts(collector)[path]
    assert read_only
    assert Path(source).name == COLLECTOR_CONFIG.name
    assert Path(source).parent.name == "deploy"
    assert dependencies(rendered, "otel-collector") == {"jaeger": "service_healthy"}


def test_collector_pipelines_use_only_defined_components() -> None:
    config = collector_config()
    service = config["service"]
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], extension
    for pipeline, spec in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in spec.get(kind, []):
                assert component in config.get(kind, {}), f"{pipeline}: {component}"
    assert set(service["pipelines"]) >= {"traces", "metrics"}


def test_collector_takes_otlp_and_sends_traces_to_jaeger(rendered: Any) -> None:
    config = collector_config()
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    collector = rendered["services"]["otel-collector"]
    assert {4317, 4318} <= container_ports(collector)
    traces = config["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    (exporter,) = traces["exporters"]
    assert exporter.split("/")[0] == "otlp_grpc"
    host, port = config["exporters"][exporter]["endpoint"].rsplit(":", 1)
    assert (host, port) == ("jaeger", "4317")
    jaeger = service_env(rendered, "jaeger")
    assert jaeger["COLLECTOR_OTLP_ENABLED"] == "true"
    assert rendered["services"]["jaeger"]["image"].startswith("jaegertracing/all-in-one:")


def test_collector_scrapes_every_service_on_its_port(rendered: Any) -> None:
    config = collector_config()
    (job,) = config["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    scraped: dict[str, int] = {}
    for sd in job["dns_sd_configs"]:
        assert sd["type"] == "A"
        for name in sd["names"]:
            scraped[name] = int(sd["port"])
    for svc, cls in SETTINGS.items():
        port = cls.model_fields["port"].default
        names = hostnames(rendered, svc)
        assert any(scraped.get(n) == port for n in names), f"{svc} is not scraped on {port}"
    for name in scraped:
        assert any(name in hostnames(rendered, svc) for svc in SETTINGS), name


# -------------------------------------------------------------------- (e) .env.example


def test_every_compose_variable_is_in_env_example() -> None:
    documented = set(env_example())
    used = compose_variables()
    assert not sorted(used - documented), "missing from .env.example"
    assert not sorted(documented - used), "in .env.example but unused by docker-compose.yml"


def test_env_example_documents_each_variable() -> None:
    lines = env_example_lines()
    for i, line in enumerate(lines):
        if _ASSIGNMENT.match(line):
            assert i > 0 and lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_env_example_sets_the_compose_defaults() -> None:
    """Each ``${VAR:-default}`` in docker-compose.yml has the value .env.example sets."""
    example = env_example()
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", COMPOSE.read_text()):
        name, default = m.group(1), m.group(2)
        assert example.get(name) == default, f"{name}: compose {default!r}, .env.example"


def test_env_example_names_only_real_settings() -> None:
    known = {name for cls in CLASSES for name in env_names(cls)}
    for name in env_example():
        if name.startswith(("AIROBOROS_", "OPENAI_")):
            assert name in known, f"{name} is no setting of any service"
