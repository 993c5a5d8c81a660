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
# The other CPythons users have (Ubuntu 24.04 ships 3.12, Debian 13 ships 3.13), from pyenv.
PYTHONS    := 3.12.1 3.13.0
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
# Installs Docker from Debian's packages, starts a private engine and prints its DOCKER_HOST.
STANDIN    ?= ../shared/tools/standin-image.sh

.PHONY: demo try docs test lint format unit integration acceptance deploy-check image-check lock \
	lowest pythons prometheus-check prometheus-tools ui-check browser-tools clean

$(STAMP): pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	# Compiled once here: where PYTHONDONTWRITEBYTECODE is set (it is on these machines), every
	# process the tests start compiled sqlalchemy, boto3 and the daemon anew, 1.5 s of CPU each.
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --quiet --frozen --extra dev --compile-bytecode
	$(BIN)/python -m compileall -q daemon
	# tests/deploy installs the lock with `uv pip install --offline`, which reads the registry's
	# index from uv's cache; `uv sync` installs from the lock's URLs and never fetches it. Resolving
	# the same pins once here fills it (a fresh machine's cache holds nothing else).
	$(BIN)/uv export --quiet --frozen --no-emit-project --no-header --extra dev \
		--format requirements-txt | $(BIN)/uv pip compile --quiet --no-header - -o /dev/null
	touch $(STAMP)

## demo: the whole pipeline on SQLite + ./archive against the built-in simulator
demo: $(STAMP)
	$(BIN)/seedance-archiver demo
	@echo "The command is $(BIN)/seedance-archiver (or run \`. $(BIN)/activate\` first):" \
		"try \`$(BIN)/seedance-archiver list\`, or \`make try\` for a trial you feed yourself."

## try: the simulator and the daemon together on ./seedance-archiver-try.db and ./archive-try,
## until Ctrl-C; you insert ids
try: $(STAMP)
	$(BIN)/seedance-archiver try

## test: lint, type-check and the whole test suite (unit, integration, acceptance, deploy), but the
## tests that need their own tools (pytest addopts): prometheus-check and image-check run those
# Six processes (pytest-xdist), idle ones stealing work: most tests wait on timers, sockets and
# subprocesses, not on CPU (four took 596 s with the CPU half idle; serially 965 s).
test: lint
	$(BIN)/pytest -n 6 --dist worksteal

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

## docs: the documentation site from docs/pages/ into .site/, with MkDocs' warnings as errors
## (a broken link or anchor fails it); tests/integration/test_docs_code.py checks the code blocks
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -f docs/mkdocs.yml

## deploy-check: the systemd unit, Dockerfile, compose file and PostgreSQL roles (tests/deploy)
deploy-check: $(STAMP)
	$(BIN)/pytest tests/deploy

## image-check: build deploy/Dockerfile and run it: migrate, archive, HEALTHCHECK, docker stop (as root)
image-check: $(STAMP)
	command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
	@test -f $(STANDIN) || { echo "image-check: $(STANDIN) not found (set STANDIN=...)" >&2; exit 1; }
	host=$$(bash $(STANDIN)) && DOCKER_HOST=$$host $(BIN)/pytest -m image -p no:cacheprovider -v -s tests/image

## lock: re-resolve every dependency to its newest allowed version (uv.lock and the image's export)
lock: $(STAMP)
	$(BIN)/uv lock --upgrade
	$(BIN)/uv export --quiet --frozen --no-emit-project --no-header --format requirements-txt \
		-o deploy/requirements.lock

## lowest: the suite's fast part against the lowest versions pyproject.toml allows
lowest: $(STAMP)
	$(BIN)/uv pip compile --quiet pyproject.toml --resolution lowest-direct -o $(LOWEST).txt
	test -x $(LOWEST)/bin/python || $(BIN)/uv venv --quiet $(LOWEST)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(LOWEST)/bin/python -e '.[dev]' \
		-c $(LOWEST).txt
	$(LOWEST)/bin/pytest -q -p no:cacheprovider tests/unit tests/integration/test_store.py \
		tests/integration/test_provider_http.py tests/integration/test_archive.py

## pythons: the unit and integration suites on each CPython in PYTHONS (pyenv's), each in its own
## .venv-3.x installed from uv.lock; make test runs the whole suite on .venv's Python (3.11)
# Six workers, as make test: tests/unit + tests/integration (1497 tests) took 141 s on 3.12.1 and
# 174 s on 3.13.0, 5 min 16 s for the target (2 cores, other suites running beside it, load ~5).
pythons: $(PYTHONS:%=python-%)

python-%: $(STAMP)
	@test -x $(PYENV_ROOT)/versions/$*/bin/python3 || { \
		echo "pythons: CPython $* is missing: $(PYENV_ROOT)/versions/$*/bin/python3 (pyenv install $*)" >&2; \
		exit 1; }
	UV_PROJECT_ENVIRONMENT=.venv-$(basename $*) $(BIN)/uv sync --quiet --frozen --extra dev \
		--compile-bytecode --python $(PYENV_ROOT)/versions/$*/bin/python3
	.venv-$(basename $*)/bin/python -m compileall -q daemon
	@start=$$(date +%s); \
	.venv-$(basename $*)/bin/pytest -q -p no:cacheprovider -n 6 --dist worksteal \
		tests/unit tests/integration || exit 1; \
	echo "pythons: CPython $* passed tests/unit and tests/integration in $$(( $$(date +%s) - start )) s"

## prometheus-check: the alert rules (promtool check rules, promtool test rules), the dashboard's
## queries, and a real Prometheus scraping a real daemon (the pytest tests marked prometheus)
prometheus-check: $(STAMP) prometheus-tools
	promtool check rules deploy/prometheus/alerts.yaml
	promtool test rules deploy/prometheus/alerts.test.yaml
	$(BIN)/pytest -m prometheus tests/deploy

# promtool and prometheus come from Debian's prometheus package, installed here when either is
# missing (as root; anyone else is told what to install). Only the binaries are wanted: a service
# the package starts on :9090 is stopped and disabled.
prometheus-tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "promtool or prometheus is missing: install Debian's prometheus package (as root)" >&2; \
		exit 1; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y --no-install-recommends prometheus \
		|| { apt-get update && apt-get install -y --no-install-recommends prometheus; } || exit 1; \
	if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then \
		systemctl disable --now prometheus; \
	fi; \
	if [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then \
		/etc/init.d/prometheus stop; \
	fi

## ui-check: the page under /ui/ in a real browser, Debian's chromium driven by chromedriver (the
## pytest tests marked browser); screenshots of each page land in .screenshots/
ui-check: $(STAMP) browser-tools
	$(BIN)/pytest -m browser tests/browser

# chromium and chromium-driver come from Debian's packages, installed here when either is missing
# (as root; anyone else is told what to install).
browser-tools:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "chromium or chromedriver is missing: install Debian's chromium and chromium-driver" >&2; \
		exit 1; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y --no-install-recommends chromium chromium-driver \
		|| { apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver; }

clean:
	rm -rf .screenshots $(VENV) $(LOWEST) $(LOWEST).txt $(addprefix .venv-,$(basename $(PYTHONS))) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info .site
