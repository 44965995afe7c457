"""The Kubernetes manifests in deploy/k8s: every kustomization renders, every object passes
strict schema validation, the objects refer to each other correctly (HPAs, PDBs, Services,
probes, ConfigMaps, the Secret), the committed rendering (what `kubectl apply -f deploy/k8s`
applies) equals what `kubectl apply -k deploy/k8s` applies, and the trainer Job template
runs the module that exists, with the same settings sources as the trainer Deployment.

No cluster is involved: `kubectl kustomize` renders offline."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from airoboros.settings import ServiceSettings, TrainerSettings, env_name
from tests.deployables import BY_MODULE

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
VALIDATE = Path(shutil.which("kubernetes-validate") or REPO / ".venv/bin/kubernetes-validate")
KUBECTL = shutil.which("kubectl")

# kustomization folder -> what it is
TARGETS = {
    "top": K8S,
    "base": K8S / "base",
    "dev": K8S / "overlays/dev",
    "gpu": K8S / "overlays/gpu",
}
OVERLAYS = ("top", "dev", "gpu")
TEMPLATES = sorted((K8S / "jobs").glob("*.yaml"))

SETTINGS: dict[str, type[ServiceSettings]] = BY_MODULE
# Deployments that sit behind a Service and a PodDisruptionBudget.
SERVED = {"topics", "generator", "dedupe", "router", "inference"}
# Their model loads take long: a startup probe holds the liveness probe off.
SLOW_START = {"inference", "dedupe", "router"}
SECRET = "airoboros-secrets"
# Settings that carry credentials: only ever from the Secret.
CREDENTIALS = {
    "AIROBOROS_DATABASE_URL",
    "AIROBOROS_AMQP_URL",
    "AIROBOROS_REDIS_URL",
    "AIROBOROS_S3_ACCESS_KEY",
    "AIROBOROS_S3_SECRET_KEY",
    "AIROBOROS_API_KEYS",
    "AIROBOROS_BACKEND_API_KEY",
    "OPENAI_API_KEY",
}
PINNED_TAG = re.compile(r"^(\d+\.\d+[\w.-]*|RELEASE\.[\w.-]+)$")

Doc = dict[str, Any]


def _need_kubectl() -> str:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return KUBECTL


@functools.cache
def _render_text(target: str) -> str:
    proc = subprocess.run(
        [_need_kubectl(), "kustomize", str(TARGETS[target])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(target: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(_render_text(target)) if d]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet", "Job", "Pod"}]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return spec


def pod_labels(doc: Doc) -> dict[str, str]:
    meta = doc["metadata"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]
    labels: dict[str, str] = meta.get("labels", {})
    return labels


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def airoboros_deployments(docs: list[Doc]) -> list[Doc]:
    return [
        d
        for d in of_kind(docs, "Deployment")
        if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("airoboros/")
    ]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_value(docs: list[Doc], container: Doc, name: str) -> str | None:
    """The literal value ``name`` gets in ``container`` (env wins over envFrom, later
    envFrom over earlier); None when it is not set or comes from a Secret."""
    for e in container.get("env", []):
        if e["name"] == name:
            literal: str | None = e.get("value")
            return literal
    value = None
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            data = named(docs, "ConfigMap", src["configMapRef"]["name"]).get("data", {})
            value = data.get(name, value)
    return value


def provided(docs: list[Doc], container: Doc) -> set[str]:
    """Every variable that ``container`` sets, from env or from an existing ConfigMap or
    Secret of the rendering (a Secret absent from the rendering counts as none)."""
    names = {e["name"] for e in container.get("env", [])}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef") or src.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in src else "Secret"
        for d in of_kind(docs, kind):
            if d["metadata"]["name"] == ref["name"]:
                names |= set(d.get("data", {})) | set(d.get("stringData", {}))
    return names


# ---------------------------------------------------------------------------------------------
# rendering and schema


@pytest.mark.parametrize("target", list(TARGETS))
def test_kustomization_renders(target: str) -> None:
    docs = render(target)
    assert docs
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Job"} <= kinds


@pytest.mark.parametrize("target", list(TARGETS))
def test_rendered_objects_pass_strict_validation(target: str, tmp_path: Path) -> None:
    path = tmp_path / f"{target}.yaml"
    path.write_text(_render_text(target))
    proc = subprocess.run(
        [str(VALIDATE), "--strict", str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed ") == len(render(target)), proc.stdout + proc.stderr


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_job_templates_pass_strict_validation(path: Path) -> None:
    proc = subprocess.run(
        [str(VALIDATE), "--strict", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout


def test_both_user_commands_apply_the_same_objects() -> None:
    """`kubectl apply -f deploy/k8s` reads the *.yaml/*.yml/*.json files at the top of the
    folder: only the committed rendering may be there, and it must be current."""
    top = {p.name for p in K8S.iterdir() if p.is_file() and p.suffix in {".yaml", ".yml", ".json"}}
    assert top == {"airoboros.yaml"}
    kustomization = yaml.safe_load((K8S / "Kustomization").read_text())
    assert kustomization["resources"] == ["overlays/dev"]
    text = (K8S / "airoboros.yaml").read_text()
    assert text.startswith("# GENERATED"), "the header says how the file is made"
    committed = [d for d in yaml.safe_load_all(text) if d]
    assert committed == render("top"), "stale: run deploy/k8s/render.sh"


def test_top_level_deploys_the_dev_overlay() -> None:
    assert render("top") == render("dev")


# ---------------------------------------------------------------------------------------------
# references between objects


@pytest.mark.parametrize("target", OVERLAYS)
def test_hpas_target_existing_deployments(target: str) -> None:
    docs = render(target)
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert {h["metadata"]["name"] for h in hpas} == {"generator", "router"}
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        deployment = named(docs, "Deployment", ref["name"])
        # The HPA owns the replica count; a `replicas` here would fight it on every apply.
        assert "replicas" not in deployment["spec"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # CPU utilisation needs a CPU request to be measured against.
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            assert c["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_pdb_selectors_match_pods(target: str) -> None:
    docs = render(target)
    pdbs = of_kind(docs, "PodDisruptionBudget")
    assert {p["metadata"]["name"] for p in pdbs} == SERVED
    for pdb in pdbs:
        assert pdb["apiVersion"] == "policy/v1"
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [d for d in workloads(docs) if selects(selector, pod_labels(d))]
        assert [d["metadata"]["name"] for d in matched] == [pdb["metadata"]["name"]]
        assert matched[0]["kind"] == "Deployment"


@pytest.mark.parametrize("target", OVERLAYS)
def test_service_selectors_and_ports_match_pod_templates(target: str) -> None:
    docs = render(target)
    for svc in of_kind(docs, "Service"):
        matched = [d for d in workloads(docs) if selects(svc["spec"]["selector"], pod_labels(d))]
        # Exactly one controller of long-running pods behind each Service.
        long_running = [d for d in matched if d["kind"] in {"Deployment", "StatefulSet"}]
        assert len(long_running) == 1, svc["metadata"]["name"]
        ports = {p["containerPort"] for c in containers(long_running[0]) for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)
    services = {s["metadata"]["name"] for s in of_kind(docs, "Service")}
    assert services >= SERVED


@pytest.mark.parametrize("target", OVERLAYS)
def test_probe_ports_equal_container_ports(target: str) -> None:
    for doc in workloads(render(target)):
        for c in containers(doc):
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe and "httpGet" in probe:
                    assert probe["httpGet"]["port"] in ports, (doc["metadata"]["name"], kind)


@pytest.mark.parametrize("target", OVERLAYS)
def test_statefulsets_have_their_service_and_volumes(target: str) -> None:
    docs = render(target)
    for sts in of_kind(docs, "StatefulSet"):
        named(docs, "Service", sts["spec"]["serviceName"])
        assert sts["spec"]["volumeClaimTemplates"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_config_map_references_exist(target: str) -> None:
    docs = render(target)
    for doc in workloads(docs):
        for c in containers(doc):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    named(docs, "ConfigMap", src["configMapRef"]["name"])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in named(docs, "ConfigMap", ref["name"])["data"]


def _secret_keys_used(docs: list[Doc]) -> set[str]:
    keys = set()
    for doc in workloads(docs):
        for c in containers(doc):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET
                    keys.add(ref["key"])
            for src in c.get("envFrom", []):
                assert "secretRef" not in src, "name each secret key: secretKeyRef"
    return keys


def test_dev_secret_holds_every_key_the_pods_use() -> None:
    docs = render("dev")
    secret = named(docs, "Secret", SECRET)
    assert _secret_keys_used(docs) <= set(secret["data"])


def test_gpu_secret_keys_are_documented() -> None:
    """The gpu overlay's Secret is made by hand from secrets.env.example: it lists every key
    the pods read, and docs/deployment.md names them."""
    example = (K8S / "overlays/gpu/secrets.env.example").read_text()
    listed = {
        line.split("=", 1)[0]
        for line in example.splitlines()
        if line.strip() and not line.startswith("#")
    }
    used = _secret_keys_used(render("gpu"))
    assert used == listed
    docs_text = (REPO / "docs/deployment.md").read_text()
    kubernetes = docs_text[docs_text.index("## Kubernetes") :]
    for key in used:
        assert f"`{key}`" in kubernetes, key


@pytest.mark.parametrize("target", ["base", "gpu"])
def test_no_secret_values_outside_dev(target: str) -> None:
    assert of_kind(render(target), "Secret") == []


def test_dev_secret_is_marked_dev_only() -> None:
    text = (K8S / "overlays/dev/kustomization.yaml").read_text()
    assert "DEV ONLY" in text
    secret = named(render("dev"), "Secret", SECRET)
    assert secret["metadata"]["name"] == SECRET, "no hash suffix: the job templates name it"


# ---------------------------------------------------------------------------------------------
# the services


@pytest.mark.parametrize("target", OVERLAYS)
def test_each_service_gets_its_required_settings_port_and_probes(target: str) -> None:
    docs = render(target)
    seen = set()
    for deployment in airoboros_deployments(docs):
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        assert c["command"][:2] == ["python", "-m"]
        cls = SETTINGS[c["command"][2]]
        seen.add(cls)
        port = cls.model_fields["port"].default
        missing = {env_name(cls, f) for f in cls.deploy_required} - provided(docs, c)
        assert not missing, (deployment["metadata"]["name"], missing)
        assert env_value(docs, c, "AIROBOROS_PORT") == str(port)
        assert [p["containerPort"] for p in c["ports"]] == [port]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        name = deployment["metadata"]["name"]
        if name in SLOW_START:
            assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert seen == set(SETTINGS.values())


@pytest.mark.parametrize("target", OVERLAYS)
def test_credentials_come_only_from_the_secret(target: str) -> None:
    docs = render(target)
    for cm in of_kind(docs, "ConfigMap"):
        assert not CREDENTIALS & set(cm.get("data", {})), cm["metadata"]["name"]
    for doc in workloads(docs):
        for c in containers(doc):
            for e in c.get("env", []):
                if e["name"] in CREDENTIALS:
                    assert "secretKeyRef" in e.get("valueFrom", {}), (c["name"], e["name"])


@pytest.mark.parametrize("target", OVERLAYS)
def test_observability(target: str) -> None:
    docs = render(target)
    for deployment in airoboros_deployments(docs):
        component = deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        (c,) = template["spec"]["containers"]
        assert env_value(docs, c, "OTEL_SERVICE_NAME") == f"airoboros-{component}"
        assert env_value(docs, c, "OTEL_TRACES_EXPORTER") == "otlp"
        assert env_value(docs, c, "OTEL_EXPORTER_OTLP_PROTOCOL") == "http/protobuf"
        assert (env_value(docs, c, "OTEL_EXPORTER_OTLP_ENDPOINT") or "").startswith("http")
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(c["ports"][0]["containerPort"])
        assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_container_has_requests_and_limits(target: str) -> None:
    for doc in workloads(render(target)):
        for c in containers(doc):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (c["name"], bound)


@pytest.mark.parametrize("target", OVERLAYS)
def test_airoboros_pods_run_as_the_image_user_on_a_read_only_root(target: str) -> None:
    docs = render(target)
    ours = [d for d in workloads(docs) if containers(d)[0]["image"].startswith("airoboros/")]
    assert len(ours) == 7  # six services and the migration Job
    for doc in ours:
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        for c in containers(doc):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
    for doc in workloads(docs):
        assert pod_spec(doc)["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("target", OVERLAYS)
def test_images_are_ours_or_pinned(target: str) -> None:
    for doc in workloads(render(target)):
        for c in containers(doc):
            image = c["image"]
            if image.startswith("airoboros/"):
                continue
            assert "@sha256:" in image or PINNED_TAG.match(image.rsplit(":", 1)[-1]), image


@pytest.mark.parametrize("target", OVERLAYS)
def test_model_volume_is_mounted_read_only(target: str) -> None:
    docs = render(target)
    named(docs, "PersistentVolumeClaim", "airoboros-models")
    for name in ("inference", "trainer"):
        deployment = named(docs, "Deployment", name)
        spec = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"] == {
            "claimName": "airoboros-models",
            "readOnly": True,
        }
        (c,) = spec["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True
        base_model = env_value(docs, c, "AIROBOROS_BASE_MODEL") or ""
        assert base_model.startswith(mount["mountPath"] + "/")


def test_migration_job_runs_migrate_with_the_database_url() -> None:
    docs = render("top")
    job = named(docs, "Job", "airoboros-migrate")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["airoboros", "migrate"]
    assert {e["name"] for e in c["env"]} == {"AIROBOROS_DATABASE_URL"}


# ---------------------------------------------------------------------------------------------
# the overlays


def test_dev_bundles_the_infrastructure_on_cpu() -> None:
    docs = render("dev")
    assert named(docs, "Namespace", "airoboros")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "airoboros"
    }
    infra = {s["metadata"]["name"] for s in of_kind(docs, "StatefulSet")}
    assert infra == {"rabbitmq", "postgres", "redis", "minio", "weaviate"}
    named(docs, "Job", "minio-bucket-init")
    (inference,) = named(docs, "Deployment", "inference")["spec"]["template"]["spec"]["containers"]
    assert env_value(docs, inference, "AIROBOROS_DEVICE") == "cpu"
    assert "nvidia.com/gpu" not in inference["resources"]["limits"]
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] == 1


def test_gpu_gives_inference_and_trainer_a_gpu_and_uses_external_services() -> None:
    docs = render("gpu")
    assert of_kind(docs, "StatefulSet") == []
    for name in ("inference", "trainer"):
        spec = named(docs, "Deployment", name)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert spec["nodeSelector"]
    for name in ("topics", "generator", "dedupe", "router"):
        (c,) = named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    config = named(docs, "ConfigMap", "airoboros-config")["data"]
    assert config["AIROBOROS_S3_ENDPOINT"] != "minio:9000"
    dedupe = named(docs, "ConfigMap", "airoboros-dedupe")["data"]
    assert dedupe["AIROBOROS_WEAVIATE_URL"] != "http://weaviate:8080"


def test_router_rescans_when_replicas_share_the_events() -> None:
    """Replicas share the adapter.published events (one group): each learns the others'
    experts from the package only if it rereads it."""
    docs = render("top")
    (c,) = named(docs, "Deployment", "router")["spec"]["template"]["spec"]["containers"]
    assert env_value(docs, c, "AIROBOROS_BACKENDS") == "http://inference:8084"
    assert float(env_value(docs, c, "AIROBOROS_RESCAN_INTERVAL") or 0) > 0


# ---------------------------------------------------------------------------------------------
# the one-off trainer Job


def _trainer_job() -> Doc:
    job: Doc = yaml.safe_load((K8S / "jobs/trainer-job.yaml").read_text())
    return job


def test_trainer_job_runs_the_one_off_entry_point_with_known_settings() -> None:
    job = _trainer_job()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "airoboros.trainer.job"]
    assert (REPO / "services/trainer/job.py").is_file()
    names = {e["name"] for e in container["env"]}
    fields = {env_name(TrainerSettings, f) for f in TrainerSettings.model_fields}
    assert names - {"JOB_ID", "OTEL_SERVICE_NAME", "HOME"} <= fields
    assert "JOB_ID" in names
    assert "__JOB_ID__" in job["metadata"]["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_trainer_job_matches_the_trainer_deployment() -> None:
    """Same image, same ConfigMaps and secret keys, same model volume as the worker."""
    docs = render("gpu")
    deployment = named(docs, "Deployment", "trainer")["spec"]["template"]["spec"]
    job = _trainer_job()["spec"]["template"]["spec"]
    (dc,) = deployment["containers"]
    (jc,) = job["containers"]
    assert jc["image"] == dc["image"]
    assert jc["envFrom"] == dc["envFrom"]
    dev_env = {e["name"]: e for e in dc["env"] if e["name"] != "AIROBOROS_PORT"}
    job_env = {e["name"]: e for e in jc["env"] if e["name"] != "JOB_ID"}
    assert job_env == dev_env
    assert jc["securityContext"] == dc["securityContext"]
    assert jc["volumeMounts"] == dc["volumeMounts"]
    assert job["volumes"] == deployment["volumes"]
    assert job["securityContext"] == deployment["securityContext"]
    assert job["tolerations"] == deployment["tolerations"]
    assert job["nodeSelector"] == deployment["nodeSelector"]
    assert jc["resources"] == dc["resources"]
