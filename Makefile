# seedance-archiver: every target creates .venv by itself on a fresh clone.
#
# Installs come from uv.lock (every package pinned, with hashes). uv installs it in seconds where pip
# takes a minute here (bench/README.md, "Installing"); pip only bootstraps uv itself, at the version
# the lock pins (tests/deploy checks that the two agree).
PYTHON     ?= python3
UV_VERSION := 0.13.9
VENV       := .venv
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed
LOWEST     := .venv-lowest
# Installs Docker from Debian's packages, starts a private engine and prints its DOCKER_HOST.
STANDIN    ?= ../shared/tools/standin-image.sh

.PHONY: demo test lint format unit integration acceptance deploy-check image-check lock lowest clean

$(STAMP): pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --quiet --frozen --extra dev
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

## image-check: build deploy/Dockerfile and run it: migrate, archive, HEALTHCHECK, docker stop (as root)
image-check: $(STAMP)
	command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
	DOCKER_HOST=$$(bash $(STANDIN)) $(BIN)/pytest -m image -p no:cacheprovider -v -s tests/image

## lock: re-resolve every dependency to its newest allowed version (uv.lock and the image's export)
lock: $(STAMP)
	$(BIN)/uv lock --upgrade
	$(BIN)/uv export --quiet --frozen --no-emit-project --no-header --format requirements-txt \
		-o deploy/requirements.lock

## lowest: the suite's fast part against the lowest versions pyproject.toml allows
lowest: $(STAMP)
	$(BIN)/uv pip compile --quiet pyproject.toml --resolution lowest-direct -o $(LOWEST).txt
	test -x $(LOWEST)/bin/python || $(BIN)/uv venv --quiet $(LOWEST)
	$(BIN)/uv pip install --quiet --python $(LOWEST)/bin/python -e '.[dev]' -c $(LOWEST).txt
	$(LOWEST)/bin/pytest -q -p no:cacheprovider tests/unit tests/integration/test_store.py \
		tests/integration/test_provider_http.py tests/integration/test_archive.py

clean:
	rm -rf $(VENV) $(LOWEST) $(LOWEST).txt .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
