"""The Kubernetes manifests in deploy/k8s pass strict schema validation, and the trainer
Job runs the module that exists, with the settings the trainer reads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from airoboros.settings import TrainerSettings

REPO = Path(__file__).resolve().parents[2]
VALIDATE = Path(shutil.which("kubernetes-validate") or REPO / ".venv/bin/kubernetes-validate")


def test_trainer_job_is_valid_kubernetes() -> None:
    path = REPO / "deploy/k8s/trainer-job.yaml"
    proc = subprocess.run(
        [str(VALIDATE), "--strict", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout


def test_trainer_job_runs_the_one_off_entry_point_with_known_settings() -> None:
    job = yaml.safe_load((REPO / "deploy/k8s/trainer-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "airoboros.trainer.job"
    assert (REPO / "services/trainer/job.py").is_file()
    names = {e["name"] for e in container["env"]}
    fields = {f"AIROBOROS_{k.upper()}" for k in TrainerSettings.model_fields}
    assert names - {"JOB_ID"} <= fields
    assert "AIROBOROS_BASE_MODEL" in names
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
