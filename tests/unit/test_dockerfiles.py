"""The service Dockerfiles are one skeleton, each filled in for its service.

services/<svc>/Dockerfile builds /opt/venv with only the service's extra, then copies it into
a runtime stage that runs as a numeric non-root user, exposes the service's port, checks
/healthz there and runs the service's module. The files may differ only where they must:
the base image (slim, or CUDA for the GPU services, whose Python then comes from uv), how
torch is installed, the extra, the port, the health check's start period and the module.
Everything is read from the files and from the settings classes; nothing is built.
"""

from __future__ import annotations

import json
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest

from airoboros.settings import ServiceSettings
from tests.deployables import SERVICES

ROOT = Path(__file__).resolve().parents[2]
DOCKERIGNORE = ROOT / ".dockerignore"

#: services/<folder> -> the settings its process reads
SETTINGS: dict[str, type[ServiceSettings]] = SERVICES
SLIM = "python:3.11-slim"
#: the GPU services: a CUDA base; the others are slim
GPU = ("trainer", "inference")
#: requirements a service installs next to its extra, and why they are not in it
EXTRA_REQUIREMENTS = {"trainer": ["bitsandbytes"]}  # CUDA only, for 4-bit QLoRA
_UID = "10001"

Instruction = tuple[str, str]


# --------------------------------------------------------------------------- helpers


@cache
def instructions(svc: str) -> tuple[Instruction, ...]:
    """(INSTRUCTION, arguments) of services/<svc>/Dockerfile: comments dropped,
    continuations joined, whitespace collapsed."""
    text = (ROOT / "services" / svc / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out: list[Instruction] = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return tuple(out)


def stages(svc: str) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for ins in instructions(svc):
        if ins[0] == "FROM":
            out.append([])
        assert out, f"services/{svc}/Dockerfile: {ins} before the first FROM"
        out[-1].append(ins)
    return out


def final_stage(svc: str) -> list[Instruction]:
    return stages(svc)[-1]


def pip_installs(svc: str) -> list[str]:
    return [
        rest
        for word, rest in instructions(svc)
        if word == "RUN" and re.search(r"\bpip install\b", rest)
    ]


def port(svc: str) -> int:
    default = SETTINGS[svc].model_fields["port"].default
    assert isinstance(default, int)
    return default


@cache
def extras() -> dict[str, list[str]]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    return found


def requirements(extra: str) -> set[str]:
    """Every requirement the extra brings, through its airoboros[...] references."""
    out: set[str] = set()
    for req in extras()[extra]:
        m = re.fullmatch(r"airoboros\[([^\]]+)\]", req)
        if m:
            for inner in m.group(1).split(","):
                out |= requirements(inner.strip())
        else:
            out.add(req)
    return out


def torch_pin(svc: str) -> str | None:
    return next((r for r in requirements(svc) if r.startswith("torch==")), None)


def base_image(svc: str) -> str:
    return instructions(svc)[0][1].split()[0]


#: lines of the "where Python comes from" slot, per kind of base
def _python_slot(ins: Instruction) -> bool:
    word, rest = ins
    return (word, rest) == ("RUN", "python -m venv /opt/venv") or re.search(
        r"(^|[\s/])uv(\s|$)|/opt/python|UV_PYTHON", rest
    ) is not None


def _torch_slot(ins: Instruction) -> bool:
    return ins[0] == "RUN" and re.search(r"\bpip install\b.*\btorch==", ins[1]) is not None


def skeleton(svc: str) -> list[str]:
    """The Dockerfile with what may differ between services replaced by placeholders and
    the per-kind slots (Python, torch) taken out."""
    out: list[str] = []
    base = base_image(svc)
    for word, rest in instructions(svc):
        if _python_slot((word, rest)) or _torch_slot((word, rest)):
            continue
        rest = rest.replace(base, "{base}")
        if word == "RUN" and f'".[{svc}]"' in rest:
            rest = rest.split(f'".[{svc}]"')[0] + '".[{svc}]"'
        rest = re.sub(r"--start-period=\d+s", "--start-period={start}", rest)
        rest = rest.replace(f"airoboros.{svc}", "airoboros.{svc}")
        rest = re.sub(rf"\b{port(svc)}\b", "{port}", rest)
        out.append(f"{word} {rest}")
    return out


# ------------------------------------------------------------------------ the skeleton


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_is_the_skeleton(svc: str) -> None:
    """Outside the slots, every Dockerfile is the topics one with its own names."""
    assert skeleton(svc) == skeleton("topics")


def test_the_skeleton_has_two_stages_and_one_command() -> None:
    words = [line.split()[0] for line in skeleton("topics")]
    assert words.count("FROM") == 2
    assert words.count("CMD") == 1 and words[-1] == "CMD"
    assert words.count("HEALTHCHECK") == 1 and words.count("EXPOSE") == 1


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_base_image_is_slim_or_cuda(svc: str) -> None:
    froms = [rest for word, rest in instructions(svc) if word == "FROM"]
    build, runtime = froms
    base = base_image(svc)
    assert build == f"{base} AS build"
    assert runtime == base, "the runtime stage starts from the build's base"
    if svc in GPU:
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+", base), base
    else:
        assert base == SLIM


def test_gpu_images_share_one_base_and_one_python() -> None:
    trainer, inference = (
        [f"{w} {r}" for w, r in instructions(svc) if _python_slot((w, r))] for svc in GPU
    )
    assert base_image("trainer") == base_image("inference")
    assert trainer == inference
    # uv pinned, Python 3.11 like the slim images, the venv made by that interpreter, and
    # the interpreter copied into the runtime stage at the same path.
    text = " ".join(trainer)
    assert re.search(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ ", text), text
    assert "uv python install 3.11" in text
    assert "-m venv /opt/venv" in text
    runtime = [f"{w} {r}" for w, r in final_stage("trainer")]
    assert "COPY --from=build /opt/python /opt/python" in runtime


@pytest.mark.parametrize("svc", sorted(set(SETTINGS) - set(GPU)))
def test_slim_images_use_the_base_python(svc: str) -> None:
    slot = [f"{w} {r}" for w, r in instructions(svc) if _python_slot((w, r))]
    assert slot == ["RUN python -m venv /opt/venv"]


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_torch_comes_first_in_the_right_build(svc: str) -> None:
    """torch before the sources (its own cached layer), at pyproject's pin: the CPU build
    on the slim images, PyPI's CUDA build on the GPU ones; no torch where the extra has none."""
    lines = [rest for word, rest in instructions(svc) if _torch_slot((word, rest))]
    pin = torch_pin(svc)
    if pin is None:
        assert not lines, lines
        assert not any("torch" in line for line in pip_installs(svc))
        return
    assert len(lines) == 1, lines
    assert pin in lines[0].split()
    if svc in GPU:
        assert "--index-url" not in lines[0] and "--extra-index-url" not in lines[0]
    else:
        assert "--index-url https://download.pytorch.org/whl/cpu" in lines[0]
    order = [f"{w} {r}" for w, r in instructions(svc)]
    assert order.index(f"RUN {lines[0]}") < order.index("COPY services services")


# ---------------------------------------------------------------- what the slots hold


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_installs_only_its_own_extra(svc: str) -> None:
    installs = pip_installs(svc)
    found = [e for line in installs for e in re.findall(r"\.\[([^\]]*)\]", line)]
    assert found == [svc], installs
    assert svc in extras()
    assert not any(re.search(r"(^|\s)(-e|--editable)\s", line) for line in installs)
    assert all("--no-cache-dir" in line for line in installs)
    (line,) = [line for line in installs if f'".[{svc}]"' in line]
    more = re.findall(r'"([A-Za-z0-9_.-]+)==[^"]+"', line.split(f'".[{svc}]"', 1)[1])
    assert more == EXTRA_REQUIREMENTS.get(svc, [])


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_runs_as_a_numeric_non_root_user(svc: str) -> None:
    stage = final_stage(svc)
    users = [rest for word, rest in stage if word == "USER"]
    assert users == [f"{_UID}:{_UID}"], users
    setup = " ".join(rest for word, rest in stage if word == "RUN")
    assert f"--uid {_UID}" in setup and f"--gid {_UID}" in setup
    # A named volume mounted at /var/lib/airoboros starts owned by the user (the trainer's
    # work dir in docker-compose.yml).
    assert f"install -d -o {_UID} -g {_UID} /var/lib/airoboros" in setup


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_serves_its_port_and_module(svc: str) -> None:
    p = str(port(svc))
    stage = final_stage(svc)
    assert [rest for word, rest in stage if word == "EXPOSE"] == [p]
    healthchecks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    check = healthchecks[0]
    assert f"127.0.0.1:%s/healthz' % os.environ.get('AIROBOROS_PORT', '{p}')" in check
    assert "urllib.request" in check
    assert "curl" not in check and "wget" not in check
    cmds = [json.loads(rest) for word, rest in stage if word == "CMD"]
    assert cmds == [["python", "-m", SETTINGS[svc].module]]
    assert SETTINGS[svc].module == f"airoboros.{svc}"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_dockerfile_copies_what_the_install_needs(svc: str) -> None:
    copies = " ".join(rest for word, rest in instructions(svc) if word == "COPY")
    for path in ("pyproject.toml", "README.md", "shared", "services"):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copies), path
    runtime = [rest for word, rest in final_stage(svc) if word == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in runtime


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
