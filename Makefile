# The two commands: `make run` (set up + whole pipeline on the embedded synthetic data)
# and `make test` (set up + test suite). Both create a project-local venv from pyproject.toml.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install run lint test test-all soak serve mlflow-server params clean container \
	container-run container-stop test-container

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

## run: the whole DVC pipeline (synthesize -> prepare -> train -> evaluate -> select)
run: install
	dvc repro

## lint: ruff (rules in pyproject.toml [tool.ruff]) and the architecture contracts (lint-imports,
## pyproject.toml [tool.importlinter]; docs/architecture.md says what each forbids)
lint: install
	ruff check .
	lint-imports

## test: the linter, then the test suite (real-data tests run when ../shared exists and skip
## without it, except in CI (CI=true) where they fail; `-m slow` and `-m soak` are opt-in), on
## TEST_WORKERS processes, each file whole on one (its module fixtures are built once), the
## long files first (tests/conftest.py): the image build's network waits overlap other files
TEST_WORKERS ?= 2
test: lint
	python -m pytest -m "not slow and not soak" --durations=20 \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## soak: 8 clients x 60 s, three times, on the real server (about 4 minutes; nothing else running)
soak: install
	python -m pytest -m soak -s

test-all: install
	python -m pytest

## params: recompose params.yaml from conf/ (what `dvc exp run -S` does by itself)
params: install
	python -m pox_pipeline.common.config

## serve: serve the champion chosen by `select` on http://127.0.0.1:3000
serve: install
	bentoml serve service:PoxClassifier --host 127.0.0.1 --port 3000

## container: the champion's Bento as an image ($(POX_IMAGE):<bento version> and :latest), built
## with podman (docker where its engine runs) from a base built here from the Debian mirror, or
## from POX_BASE_IMAGE (any Debian image with Python 3.11); POX_EXTRA_CA_CERTS go into the
## build's trust store. The container targets read only POX_-prefixed variables, so a common
## name in the environment (CONTAINER_NAME, IMAGE, PORT) changes nothing: set these on the
## command line (`make container-run POX_PORT=3001`) or in the environment under these names.
POX_CONTAINER_ENGINE ?= $(if $(shell docker info >/dev/null 2>&1 && echo up),docker,podman)
POX_IMAGE ?= pox-classifier
POX_BASE_IMAGE ?=
POX_DEBIAN_IMAGE ?= localhost/debian:bookworm
POX_DEBIAN_MIRROR ?=
POX_EXTRA_CA_CERTS ?= $(wildcard /usr/local/share/ca-certificates/*.crt)
POX_PYPI_INDEX ?= https://pypi.org/simple
POX_CONTAINER_NAME ?= pox-classifier
POX_PORT ?= 3000
# The host folder mounted as the container's monitoring directory (the image's
# POX_MONITORING_DIR): by default the project's own, so plain `pox monitor` reads its records.
POX_MONITORING_DIR_HOST ?= $(CURDIR)/monitoring
POX_READY_TIMEOUT_S ?= 300
POX_STOP_TIMEOUT_S ?= 10
export CONTAINERS_CONF ?= $(CURDIR)/deploy/podman/containers.conf
export CONTAINERS_STORAGE_CONF ?= $(CURDIR)/deploy/podman/storage.conf
CONTAINER_SETTINGS = POX_CONTAINER_ENGINE='$(POX_CONTAINER_ENGINE)' POX_IMAGE='$(POX_IMAGE)' \
	POX_BASE_IMAGE='$(POX_BASE_IMAGE)' POX_DEBIAN_IMAGE='$(POX_DEBIAN_IMAGE)' \
	POX_DEBIAN_MIRROR='$(POX_DEBIAN_MIRROR)' POX_EXTRA_CA_CERTS='$(POX_EXTRA_CA_CERTS)' \
	POX_PYPI_INDEX='$(POX_PYPI_INDEX)' POX_CONTAINER_NAME='$(POX_CONTAINER_NAME)' \
	POX_PORT='$(POX_PORT)' POX_MONITORING_DIR_HOST='$(POX_MONITORING_DIR_HOST)' \
	POX_READY_TIMEOUT_S='$(POX_READY_TIMEOUT_S)' POX_STOP_TIMEOUT_S='$(POX_STOP_TIMEOUT_S)'

container: install
	$(CONTAINER_SETTINGS) deploy/container.sh build

## container-run: start $(POX_IMAGE):latest on http://127.0.0.1:$(POX_PORT), read-only, with
## $(POX_MONITORING_DIR_HOST) as its monitoring volume; returns once /readyz answers. One that
## does not become ready is removed, its log shown; a stopped one of the same name, left by an
## earlier run, is removed first (a running one is refused). container-stop: SIGTERM, then
## SIGKILL after $(POX_STOP_TIMEOUT_S) s, then removed
container-run:
	$(CONTAINER_SETTINGS) deploy/container.sh run

container-stop:
	$(CONTAINER_SETTINGS) deploy/container.sh stop

## test-container: build the image for a test champion, run it, compare it with `make serve`
test-container: install
	python -m pytest -m container

## mlflow-server: the team's MLflow server (PostgreSQL, proxied artifacts, sign-in) on
## http://127.0.0.1:5000; needs MLFLOW_AUTH_ADMIN_PASSWORD (docs/team.md)
mlflow-server: install
	python -m pox_pipeline.ops.team_server

clean:
	rm -rf $(VENV) datas/synthetic datas/prepared models reports outputs mlflow.db mlruns
