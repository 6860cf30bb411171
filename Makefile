# Quickstart: `make demo` and `make test`. Both create .venv on first use (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/quickstart

.PHONY: install demo lint typecheck test test-fast clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mlearn train --config configs/face/quickstart.yaml --run_dir $(RUN_DIR)
	$(BIN)/mlearn eval --model $(RUN_DIR) --suite evaluation/quickstart.yaml
	$(BIN)/mlearn export --model $(RUN_DIR) --format onnx

# ruff: lint + import order (config in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check mlearn tests tools

# mypy on the packages held to it (the list and settings are in pyproject.toml)
typecheck: $(STAMP)
	$(BIN)/mypy

# lint, types, then the tests and the doctests of mlearn/ (setup.cfg: testpaths, --doctest-modules)
test: lint typecheck
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not distributed"

clean:
	rm -rf $(VENV) runs data *.egg-info
