# audio2video: every target sets itself up from the project's own files (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto' | sort)
GENERATED := audio2video/.generated
PYTEST_ARGS ?=

.PHONY: setup proto test test-all lint format up down status demo e2e bench clean

# The virtualenv with pinned requirements; the project itself is installed editable (compat mode puts
# the repo root on sys.path, so the generated `audio2video` stubs import like any package).
$(INSTALLED): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat
	@touch $@

# Python stubs (with .pyi) for every contract, generated into ./audio2video (not committed).
$(GENERATED): $(PROTOS) $(INSTALLED)
	rm -rf audio2video
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	find audio2video -type d -exec touch {}/__init__.py \;
	@touch $@

setup: $(INSTALLED) $(GENERATED)

proto: $(GENERATED)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

up: setup
	$(PY) -m deploy.local up

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local down; else echo "nothing to stop (no $(VENV))"; fi

status: setup
	$(PY) -m deploy.local status

# The main job. Until the orchestrator lands (issue 7) it brings the stack up, stores the sample
# inputs and calls the stages over gRPC to show what answers.
demo: setup
	$(PY) -m deploy.demo $(if $(AUDIO),--audio $(AUDIO)) $(if $(VIDEO),--video $(VIDEO))

clean:
	rm -rf $(VENV) audio2video build .pytest_cache .ruff_cache *.egg-info
