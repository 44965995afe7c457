"""The services a deployment runs and the settings class each one reads, for the tests
that hold Dockerfiles, docker-compose.yml and deploy/k8s to the code."""

from __future__ import annotations

from airoboros.inference.settings import InferenceSettings
from airoboros.router.settings import RouterSettings
from airoboros.settings import (
    DedupeSettings,
    GeneratorSettings,
    ServiceSettings,
    TopicsSettings,
    TrainerSettings,
)

#: services/<folder> -> the settings its process reads
SERVICES: dict[str, type[ServiceSettings]] = {
    "topics": TopicsSettings,
    "generator": GeneratorSettings,
    "dedupe": DedupeSettings,
    "trainer": TrainerSettings,
    "inference": InferenceSettings,
    "router": RouterSettings,
}
#: ``airoboros.<svc>`` (what ``python -m`` runs) -> the settings
BY_MODULE: dict[str, type[ServiceSettings]] = {c.module: c for c in SERVICES.values()}
