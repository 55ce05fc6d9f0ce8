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

.PHONY: install run lint test test-all soak serve mlflow-server params clean

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
## without it, except in CI (CI=true) where they fail; `-m slow` and `-m soak` are opt-in)
test: lint
	python -m pytest -m "not slow and not soak" --durations=20

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

## mlflow-server: the team's MLflow server (PostgreSQL, proxied artifacts, sign-in) on
## http://127.0.0.1:5000; needs MLFLOW_AUTH_ADMIN_PASSWORD (README "Working as a team")
mlflow-server: install
	python -m pox_pipeline.team_server

clean:
	rm -rf $(VENV) datas/synthetic datas/prepared models reports outputs mlflow.db mlruns
