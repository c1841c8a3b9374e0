# duet: every target creates the virtual environment when it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup demo test test-fast lint bench gpu-wheels clean

setup: $(STAMP)

# torch first (CPU build from the pinned version), then DeepSpeed without build
# isolation (it compiles against the installed torch), then the project.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install torch==$(TORCH_VERSION)
	$(BIN)/pip install --no-build-isolation deepspeed
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/full.py --config pipelines/configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Wheels the GPU check needs beyond torch/transformers/peft/safetensors (carried with the working tree).
gpu-wheels: $(STAMP)
	$(BIN)/pip download --quiet --only-binary=:all: --no-deps --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		--implementation cp -d benchmarks/wheels \
		$$($(BIN)/pip list --format=freeze | grep -iE '^(pydantic|pydantic_core|annotated.types|typing.inspection|pyyaml|pillow)==')

clean:
	rm -rf $(VENV) .duet
