"""docker-compose.yml, the service Dockerfiles and .env.example agree with each other and
with ``airoboros.settings``.

The compose file is rendered by the real ``docker-compose config`` (Debian's 1.29, which
.ci/run installs), once with no .env and once with .env.example copied to .env; what it
renders is then checked against the settings classes: every variable a service is given is
one of its settings, the connection settings are all given and point at services it waits
for, and the ports are the ones the service listens on. No daemon and no image build are
needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices

from airoboros.settings import (
    DedupeSettings,
    GeneratorSettings,
    ServiceSettings,
    TopicsSettings,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

SETTINGS: dict[str, type[ServiceSettings]] = {
    "topics": TopicsSettings,
    "generator": GeneratorSettings,
    "dedupe": DedupeSettings,
}
#: containers that run once and exit 0; the others run until stopped
ONE_SHOTS = ("migrate", "minio-init")
#: the infrastructure, each with a healthcheck and a named volume for its data
INFRA = ("rabbitmq", "postgres", "redis", "minio", "weaviate")

_CONNECTIONS = ("amqp_url", "database_url", "redis_url")
_S3 = ("s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket")
_LLM = ("openai_api_key", "openai_base_url")
#: settings each service must be given: without them it would fall back to 127.0.0.1
REQUIRED: dict[str, tuple[str, ...]] = {
    # topics calls the LLM too: it generates the topics of a job.
    "topics": (*_CONNECTIONS, *_S3, "api_keys", *_LLM),
    "generator": (*_CONNECTIONS, *_LLM),
    # Without a Weaviate URL each replica would dedupe against its own in-process index.
    "dedupe": (*_CONNECTIONS, "weaviate_url"),
}
#: settings that fix the broker topology and shared state: every service must agree
SHARED = (
    "AIROBOROS_AMQP_URL",
    "AIROBOROS_AMQP_PREFIX",
    "AIROBOROS_DATABASE_URL",
    "AIROBOROS_REDIS_URL",
    "AIROBOROS_REDIS_PREFIX",
    "AIROBOROS_DEDUPE_PARTITIONS",
    "AIROBOROS_MAX_DELIVERIES",
)

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


def service_env(rendered: dict[str, Any], name: str) -> dict[str, str]:
    env = rendered["services"][name].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@cache
def docker_compose() -> str | None:
    return shutil.which("docker-compose")


def render(directory: Path, dotenv: str | None) -> dict[str, Any]:
    """``docker-compose config`` of a copy of docker-compose.yml in ``directory``, with
    ``dotenv`` as its .env (none when None), isolated from this shell's variables."""
    binary = docker_compose()
    if binary is None:
        pytest.skip("the docker-compose binary is not on PATH (.ci/run installs it)")
    shutil.copy(COMPOSE, directory / "docker-compose.yml")
    if dotenv is not None:
        (directory / ".env").write_text(dotenv)
    ours = compose_variables()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ours and not k.startswith(("COMPOSE_", "DOCKER_"))
    }
    proc = subprocess.run(
        [binary, "-f", "docker-compose.yml", "config"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
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
    for cls in SETTINGS.values():
        for name in env_names(cls):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --------------------------------------------------------------- (a) compose renders


def test_compose_config_passes_with_and_without_env(tmp_path: Path) -> None:
    (tmp_path / "bare").mkdir()
    (tmp_path / "example").mkdir()
    bare = render(tmp_path / "bare", None)
    example = render(tmp_path / "example", ENV_EXAMPLE.read_text())
    assert set(bare["services"]) >= {*SETTINGS, *ONE_SHOTS, *INFRA}
    # .env.example documents the defaults: copying it changes nothing.
    for name in bare["services"]:
        assert service_env(bare, name) == service_env(example, name), name
        assert bare["services"][name].get("ports") == example["services"][name].get("ports")


# ---------------------------------------------------- (b) services against the settings


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_service_runs_its_module_from_its_image(rendered: Any, svc: str) -> None:
    service = rendered["services"][svc]
    argv = as_argv(service.get("command", []))
    assert argv[-2:] == ["-m", f"airoboros.{svc}"], argv
    assert service["build"]["dockerfile"] == f"services/{svc}/Dockerfile"
    assert (ROOT / service["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_ports_are_the_ones_the_service_listens_on(
    rendered: Any, svc: str, clean_env: pytest.MonkeyPatch
) -> None:
    cls = SETTINGS[svc]
    env = service_env(rendered, svc)
    for name, value in env.items():
        clean_env.setenv(name, value)
    port = cls().port
    assert port == int(env.get("AIROBOROS_PORT", cls.model_fields["port"].default))
    service = rendered["services"][svc]
    checked = re.findall(r"127\.0\.0\.1:(\d+)/healthz", healthcheck_text(service))
    assert checked == [str(port)], healthcheck_text(service)
    assert container_ports(service) == {port}
    if svc == "topics":
        assert service.get("ports"), "the topics API is published on the host"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_every_variable_given_is_a_setting(rendered: Any, svc: str) -> None:
    known = env_names(SETTINGS[svc])
    unknown = sorted(set(service_env(rendered, svc)) - set(known))
    assert not unknown, f"{svc} is given variables that {SETTINGS[svc].__name__} ignores"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_required_settings_are_given_and_parse(
    rendered: Any, svc: str, clean_env: pytest.MonkeyPatch
) -> None:
    cls = SETTINGS[svc]
    env = service_env(rendered, svc)
    given = {field for name, field in env_names(cls).items() if name in env}
    missing = sorted(set(REQUIRED[svc]) - given)
    assert not missing, f"{svc} lacks {missing}"
    for name, value in env.items():
        clean_env.setenv(name, value)
    settings = cls()  # every value parses (booleans, numbers)
    if svc == "topics":
        keys = [k for k in settings.api_keys.split(",") if k.strip()]
        assert keys, "the topics API refuses to start without an API key"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_connections_point_at_services_it_waits_for(
    rendered: Any, svc: str, clean_env: pytest.MonkeyPatch
) -> None:
    for name, value in service_env(rendered, svc).items():
        clean_env.setenv(name, value)
    s = SETTINGS[svc]()
    urls = [s.amqp_url, s.database_url, s.redis_url]
    if "AIROBOROS_S3_ENDPOINT" in service_env(rendered, svc):
        urls.append(f"//{s.s3_endpoint}")
    if s.weaviate_url:
        urls.append(s.weaviate_url)
    waits_for = all_dependencies(rendered, svc)
    for url in urls:
        host = urlsplit(url).hostname
        assert host in rendered["services"], f"{svc}: {url} names no compose service"
        assert host in waits_for, f"{svc} does not wait for {host}"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_service_waits_for_the_migration(rendered: Any, svc: str) -> None:
    assert dependencies(rendered, svc).get("migrate") == "service_completed_successfully"


def test_migrate_runs_once_on_the_services_database(rendered: Any) -> None:
    migrate = rendered["services"]["migrate"]
    assert as_argv(migrate["command"]) == ["airoboros", "migrate"]
    assert migrate["build"]["dockerfile"] == "services/topics/Dockerfile"
    assert migrate["image"] == rendered["services"]["topics"]["image"]
    assert dependencies(rendered, "migrate") == {"postgres": "service_healthy"}
    url = service_env(rendered, "migrate")["AIROBOROS_DATABASE_URL"]
    assert url.startswith("postgresql://")
    for svc in SETTINGS:
        assert service_env(rendered, svc)["AIROBOROS_DATABASE_URL"] == url, svc


def test_services_agree_on_shared_settings(rendered: Any) -> None:
    for name in SHARED:
        values = {svc: service_env(rendered, svc).get(name) for svc in SETTINGS}
        assert len(set(values.values())) == 1, f"{name} differs: {values}"


def test_dependency_conditions(rendered: Any) -> None:
    services = rendered["services"]
    for name in services:
        for dep, condition in dependencies(rendered, name).items():
            if dep in ONE_SHOTS:
                assert condition == "service_completed_successfully", (name, dep)
            else:
                assert condition == "service_healthy", (name, dep)
                test = services[dep].get("healthcheck", {}).get("test")
                assert test and test != ["NONE"], f"{dep} has no healthcheck"


def test_one_shots_are_not_restarted(rendered: Any) -> None:
    for name in ONE_SHOTS:
        assert rendered["services"][name].get("restart", "no") == "no", name


def test_infrastructure_checks_health_and_keeps_data_in_named_volumes(rendered: Any) -> None:
    services = rendered["services"]
    expected = {
        "rabbitmq": "rabbitmq-diagnostics -q ping",
        "postgres": "pg_isready",
        "redis": "redis-cli ping",
        "weaviate": "/v1/.well-known/ready",
    }
    for name, probe in expected.items():
        assert probe in healthcheck_text(services[name]), name
    named = set(rendered.get("volumes", {}))
    for name in INFRA:
        sources = {str(v).split(":")[0] for v in services[name].get("volumes", [])}
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


# --------------------------------------------------------------------- (c) Dockerfiles


def dockerfile_instructions(svc: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of services/<svc>/Dockerfile, continuations joined."""
    text = (ROOT / "services" / svc / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out: list[tuple[str, str]] = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def final_stage(svc: str) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(svc)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def pip_installs(svc: str) -> list[str]:
    return [
        rest
        for word, rest in dockerfile_instructions(svc)
        if word == "RUN" and re.search(r"\bpip install\b", rest)
    ]


def torch_pin() -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra: list[str] = pyproject["project"]["optional-dependencies"]["dedupe"]
    return next(req for req in extra if req.startswith("torch=="))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_installs_only_its_own_extra(svc: str) -> None:
    installs = pip_installs(svc)
    extras = [e for line in installs for e in re.findall(r"\.\[([^\]]*)\]", line)]
    assert extras == [svc], installs
    assert not any(re.search(r"(^|\s)(-e|--editable)\s", line) for line in installs)
    torch_lines = [line for line in installs if "torch" in line]
    if svc == "dedupe":
        # The CPU build of torch, at pyproject's pin, before the extra that needs it.
        assert len(torch_lines) == 1, torch_lines
        assert torch_pin() in torch_lines[0].split()
        assert "--index-url https://download.pytorch.org/whl/cpu" in torch_lines[0]
        assert installs.index(torch_lines[0]) < next(
            i for i, line in enumerate(installs) if ".[dedupe]" in line
        )
    else:
        assert not torch_lines, torch_lines


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_runs_as_non_root(svc: str) -> None:
    users = [rest for word, rest in final_stage(svc) if word == "USER"]
    assert users, f"services/{svc}/Dockerfile sets no USER in its final stage"
    assert users[-1].split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_serves_its_port(svc: str) -> None:
    port = str(SETTINGS[svc].model_fields["port"].default)
    instructions = dockerfile_instructions(svc)
    assert all(rest.startswith("python:3.11-slim") for w, rest in instructions if w == "FROM")
    stage = final_stage(svc)
    assert [rest for word, rest in stage if word == "EXPOSE"] == [port]
    healthchecks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert (
        f"127.0.0.1:%s/healthz' % os.environ.get('AIROBOROS_PORT', '{port}')" in (healthchecks[0])
    )
    assert "curl" not in healthchecks[0] and "wget" not in healthchecks[0]
    cmds = [json.loads(rest) for word, rest in stage if word == "CMD"]
    assert cmds == [["python", "-m", f"airoboros.{svc}"]]
    copies = " ".join(rest for word, rest in instructions if word == "COPY")
    for path in ("pyproject.toml", "README.md", "shared", "services"):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copies), path


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = {
        ln.strip().strip("/")
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for needed in (".venv", ".git", "tests", "bench", "build", ".mypy_cache", ".pytest_cache"):
        assert needed in patterns, needed
    for copied in ("pyproject.toml", "README.md", "shared", "services"):
        assert copied not in patterns, copied


# -------------------------------------------------------------------- (d) .env.example


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


def test_env_example_names_only_real_settings() -> None:
    known = {name for cls in SETTINGS.values() for name in env_names(cls)}
    for name in env_example():
        if name.startswith(("AIROBOROS_", "OPENAI_")):
            assert name in known, f"{name} is no setting of any service"
