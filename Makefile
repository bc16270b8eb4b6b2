# recagent: two entry points for a fresh clone — `make serve` (or `make demo`) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo serve test lint typecheck pytest clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch first: any other spec pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/recagent demo

serve: $(STAMP)
	$(BIN)/recagent demo --no-llm -k 5
	$(BIN)/recagent serve

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy .

pytest: $(STAMP)
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-redis.sh
	$(BIN)/python -m pytest -q --durations=15

test: lint typecheck pytest

clean-venv:
	rm -rf $(VENV)
