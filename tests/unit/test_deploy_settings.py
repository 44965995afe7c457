"""The code's settings classes against the deployments: docker-compose.yml (every profile)
and every kustomization under deploy/k8s give each service every setting it requires
(``deploy_required``), run it on the port it listens on, and probe routes it serves.

Services are found by what they run (``python -m airoboros.<svc>``), so a renamed module,
a new required setting or a moved port fails here until both deployments follow."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from airoboros.inference.settings import InferenceSettings
from airoboros.router.settings import RouterSettings
from airoboros.settings import ServiceSettings, TopicsSettings, env_name
from tests.deployables import BY_MODULE, SERVICES

REPO = Path(__file__).resolve().parents[2]
CLASSES: list[type[ServiceSettings]] = list(SERVICES.values())
KUSTOMIZATIONS = ["deploy/k8s", "deploy/k8s/overlays/dev", "deploy/k8s/overlays/gpu"]


def default_port(cls: type[ServiceSettings]) -> int:
    return int(cls.model_fields["port"].default)


def module_of(command: Any) -> str | None:
    """``airoboros.<svc>`` of ``python -m airoboros.<svc>``, else None."""
    if isinstance(command, str):
        command = command.split()
    args = list(command or [])
    for i, a in enumerate(args[:-1]):
        if a == "-m" and args[i + 1] in BY_MODULE:
            return args[i + 1]
    return None


# --- the routes each service really serves ---------------------------------------------------


def _fastapi_routes(app: Any) -> set[str]:
    return {getattr(r, "path", "") for r in app.routes}


def served_routes(cls: type[ServiceSettings]) -> set[str]:
    """GET routes that answer without a key: the probes (and /metrics), read from the
    service's own app; workers serve them from airoboros.health.HealthServer."""
    if cls in (TopicsSettings, RouterSettings, InferenceSettings):
        if cls is TopicsSettings:
            from airoboros.topics.app import create_app as topics_app

            app = topics_app(TopicsSettings(api_keys="k"))
        elif cls is RouterSettings:
            from airoboros.router.app import create_app as router_app

            app = router_app(RouterSettings(bus=False))
        else:
            from airoboros.inference.app import create_app as inference_app

            app = inference_app(InferenceSettings(), engine=_NoBackend())  # type: ignore[arg-type]
        routes = _fastapi_routes(app)
        return routes | ({"/metrics"} if _has_metrics(app) else set())
    return _health_server_routes()


class _NoBackend:
    """Enough of a backend for the inference app to be built (never started)."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def _has_metrics(app: Any) -> bool:
    from airoboros.metrics import MetricsMiddleware

    return any(m.cls is MetricsMiddleware for m in app.user_middleware)


def _health_server_routes() -> set[str]:
    import httpx

    from airoboros.health import HealthServer

    async def probe() -> set[str]:
        server = HealthServer("127.0.0.1", 0, lambda: True)
        await server.start()
        found = set()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as c:
                for path in ("/healthz", "/readyz", "/metrics"):
                    if (await c.get(path)).status_code == 200:
                        found.add(path)
        finally:
            await server.close()
        return found

    return asyncio.run(probe())


@pytest.fixture(scope="module")
def routes() -> dict[type[ServiceSettings], set[str]]:
    return {cls: served_routes(cls) for cls in CLASSES}


# --- docker compose ---------------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
    out = subprocess.run(
        [exe, "--profile", "gpu", "--profile", "cpu", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout
    services: dict[str, dict[str, Any]] = yaml.safe_load(out)["services"]
    return services


def test_compose_gives_every_service_its_settings_port_and_probe(routes) -> None:
    seen: set[str] = set()
    for name, svc in compose_services().items():
        module = module_of(svc.get("command"))
        if module is None:
            continue
        cls = BY_MODULE[module]
        seen.add(module)
        env = svc.get("environment") or {}
        missing = [env_name(cls, f) for f in cls.deploy_required if env_name(cls, f) not in env]
        assert not missing, f"compose service {name} lacks {missing}"
        port = default_port(cls)
        assert str(env.get("AIROBOROS_PORT")) == str(port), name
        test = " ".join(svc["healthcheck"]["test"])
        url = re.search(r"http://[^'\"\s]+", test)
        assert url, (name, test)
        parsed = urlparse(url.group(0))
        assert parsed.port == port, (name, test)
        assert parsed.path in routes[cls], (name, parsed.path, routes[cls])
    assert seen == set(BY_MODULE), f"no compose service runs {set(BY_MODULE) - seen}"


# --- kubernetes -------------------------------------------------------------------------------


def rendered(path: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", path], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _config_keys(docs: list[dict[str, Any]], kind: str, name: str) -> set[str] | None:
    """Keys of a ConfigMap/Secret in the rendering; None when it is not there (the gpu
    overlay's Secret is made by the operator)."""
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return set(d.get("data") or {}) | set(d.get("stringData") or {})
    return None


def container_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> set[str]:
    names = {e["name"] for e in c.get("env") or []}
    for src in c.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            keys = _config_keys(docs, "ConfigMap", src["configMapRef"]["name"])
        else:
            keys = _config_keys(docs, "Secret", src["secretRef"]["name"])
        assert keys is not None, f"envFrom names {src}, which is not rendered"
        names |= {prefix + k for k in keys}
    return names


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kubernetes_gives_every_service_its_settings_port_and_probes(path, routes) -> None:
    docs = rendered(path)
    seen: set[str] = set()
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            module = module_of([*(c.get("command") or []), *(c.get("args") or [])])
            if module is None:
                continue
            cls = BY_MODULE[module]
            seen.add(module)
            where = f"{path}: {d['kind']} {d['metadata']['name']}"
            env = container_env(docs, c)
            missing = [env_name(cls, f) for f in cls.deploy_required if env_name(cls, f) not in env]
            assert not missing, f"{where} lacks {missing}"
            port = default_port(cls)
            values = {e["name"]: e.get("value") for e in c.get("env") or []}
            if "AIROBOROS_PORT" in values:
                assert values["AIROBOROS_PORT"] == str(port), where
            ports = [p["containerPort"] for p in c.get("ports") or []]
            assert ports == [port], (where, ports)
            if d["kind"] == "Job":
                continue
            for probe in ("livenessProbe", "readinessProbe"):
                get = c[probe]["httpGet"]
                assert get["port"] in (port, (c.get("ports") or [{}])[0].get("name")), where
                assert get["path"] in routes[cls], (where, probe, get["path"])
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
    # Each overlay runs every service (the trainer once as a worker).
    assert seen == set(BY_MODULE), f"{path}: nothing runs {set(BY_MODULE) - seen}"
