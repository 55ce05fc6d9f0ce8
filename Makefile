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

## lint: ruff (rules in pyproject.toml [tool.ruff])
lint: install
	ruff check .

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
	python -m pox_pipeline.config

## serve: serve the champion chosen by `select` on http://127.0.0.1:3000
serve: install
	bentoml serve service:PoxClassifier --host 127.0.0.1 --port 3000

## container: the champion's Bento as an image ($(IMAGE):<bento version> and :latest), built with
## podman (docker where its engine runs) from a base built here from the Debian mirror, or from
## BASE_IMAGE (any Debian image with Python 3.11); EXTRA_CA_CERTS go into the build's trust store
CONTAINER_ENGINE ?= $(if $(shell docker info >/dev/null 2>&1 && echo up),docker,podman)
IMAGE ?= pox-classifier
BASE_IMAGE ?=
DEBIAN_IMAGE ?= localhost/debian:bookworm
DEBIAN_MIRROR ?=
EXTRA_CA_CERTS ?= $(wildcard /usr/local/share/ca-certificates/*.crt)
PYPI_INDEX ?= https://pypi.org/simple
CONTAINER_NAME ?= pox-classifier
PORT ?= 3000
READY_TIMEOUT_S ?= 300
STOP_TIMEOUT_S ?= 10
export CONTAINERS_CONF ?= $(CURDIR)/deploy/podman/containers.conf
export CONTAINERS_STORAGE_CONF ?= $(CURDIR)/deploy/podman/storage.conf
CONTAINER_SETTINGS = CONTAINER_ENGINE=$(CONTAINER_ENGINE) IMAGE=$(IMAGE) \
	BASE_IMAGE=$(BASE_IMAGE) DEBIAN_IMAGE=$(DEBIAN_IMAGE) DEBIAN_MIRROR=$(DEBIAN_MIRROR) \
	EXTRA_CA_CERTS="$(EXTRA_CA_CERTS)" PYPI_INDEX=$(PYPI_INDEX) CONTAINER_NAME=$(CONTAINER_NAME) \
	PORT=$(PORT) READY_TIMEOUT_S=$(READY_TIMEOUT_S) STOP_TIMEOUT_S=$(STOP_TIMEOUT_S)

container: install
	$(CONTAINER_SETTINGS) deploy/container.sh build

## container-run: start $(IMAGE):latest on http://127.0.0.1:$(PORT), read-only; returns once
## /readyz answers. container-stop: SIGTERM, then SIGKILL after $(STOP_TIMEOUT_S) s
container-run:
	$(CONTAINER_SETTINGS) deploy/container.sh run

container-stop:
	$(CONTAINER_SETTINGS) deploy/container.sh stop

## test-container: build the image for a test champion, run it, compare it with `make serve`
test-container: install
	python -m pytest -m container

## mlflow-server: the team's MLflow server (PostgreSQL, proxied artifacts, sign-in) on
## http://127.0.0.1:5000; needs MLFLOW_AUTH_ADMIN_PASSWORD (README "Working as a team")
mlflow-server: install
	python -m pox_pipeline.team_server

clean:
	rm -rf $(VENV) datas/synthetic datas/prepared models reports outputs mlflow.db mlruns
