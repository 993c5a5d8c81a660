# seedance-archiver: every target creates .venv by itself on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format unit integration acceptance deploy-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: the whole pipeline on SQLite + ./archive against the built-in simulator
demo: $(STAMP)
	$(BIN)/seedance-archiver demo

## test: lint, type-check and the whole test suite (unit, integration, acceptance)
test: lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff format --check daemon migrations tests bench
	$(BIN)/ruff check daemon migrations tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format daemon migrations tests bench
	$(BIN)/ruff check --fix daemon migrations tests bench

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

acceptance: $(STAMP)
	$(BIN)/pytest tests/acceptance

## deploy-check: the systemd unit, Dockerfile, compose file and PostgreSQL roles (tests/deploy)
deploy-check: $(STAMP)
	$(BIN)/pytest tests/deploy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
