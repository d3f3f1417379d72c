# The README's commands. Each runs the (idempotent) setup first.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test bench lint check-wheel

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/loraens train --config configs/demo.yaml --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/throughput.py

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# The pip route in a fresh virtual environment: build, install with the pinned torch, run.
check-wheel: setup
	BUILD_PYTHON=$(BIN)/python bash scripts/check_wheel.sh
