# audio2video: every target sets itself up from the project's own files (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto' | sort)
GENERATED := audio2video/.generated
PYTEST_ARGS ?=
SAMPLE_DATA ?= $(or $(A2V_SAMPLE_DATA),../shared/data)

.PHONY: setup lock proto test test-all lint format up down status demo e2e bench eval lip-accuracy clean

# 1. The virtualenv: every distribution of requirements-dev.lock (resolved from requirements-dev.txt by `make lock`),
#    each file checked against its sha256 there.
$(DEPS): requirements-dev.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
	@touch $@

# 2. Python stubs (with .pyi) for every contract, generated into ./audio2video (not committed).
$(GENERATED): $(PROTOS) $(DEPS)
	rm -rf audio2video
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	find audio2video -type d -exec touch {}/__init__.py \;
	@touch $@

# 3. The project itself, editable (after the stubs exist, so `audio2video` is one of its packages),
#    which also installs the `a2v` command; built with the locked setuptools, nothing fetched.
$(INSTALLED): pyproject.toml $(GENERATED)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

setup: $(INSTALLED)

# The lock files from the requirements files (deploy/docker/lock.py; needs the package index, not part of `test`):
# requirements-dev.lock and deploy/docker/requirements/*.lock. LOCK_ARGS=--upgrade: newest transitive releases.
LOCK_ARGS ?=
lock: setup
	$(PY) -m deploy.docker.lock $(LOCK_ARGS)

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

# The main job: brings the stack up, trains the speaker once, renders AUDIO onto VIDEO into out/demo.mp4.
demo: setup
	$(PY) -m deploy.demo $(if $(AUDIO),--audio $(AUDIO)) $(if $(VIDEO),--video $(VIDEO)) \
		$(if $(SPEAKER),--speaker $(SPEAKER)) $(if $(OUT),--out $(OUT))

# A short real job through every stage: docker compose where an engine runs, else the local process stack
# (tests/test_e2e.py starts it on free ports and always tears it down). Keeps the exit code.
E2E_COMPOSE := docker compose -f deploy/compose.yaml
e2e: setup
	@if docker info >/dev/null 2>&1; then \
		$(E2E_COMPOSE) up -d --build --wait && \
		$(PY) -m orchestrator.cli train --speaker e2e $(SAMPLE_DATA)/speakers/feifeili/feifeili_clip3.mp4 && \
		$(PY) -m orchestrator.cli run --speaker e2e --audio $(SAMPLE_DATA)/audio/arctic_sentence_4s.wav \
			--video $(SAMPLE_DATA)/speakers/feifeili/feifeili_clip3.mp4 --out out/e2e.mp4; \
		rc=$$?; $(E2E_COMPOSE) down; exit $$rc; \
	else \
		$(PY) -m pytest tests/test_e2e.py -m integration $(PYTEST_ARGS); \
	fi

# Speed: real-time factors per stage and end to end (10 s and 60 s of audio on 256² and 512² targets, analysis
# cached), texture with 1 and 2 replicas, peak memory per service, fast vs naive cores. Starts its own stack on
# free ports (never the one `make up` started). Prints a table, writes out/bench/bench.json. BENCH_ARGS=--quick.
BENCH_ARGS ?=
bench: setup
	$(PY) -m deploy.bench $(BENCH_ARGS)

# Quality of a rendered video against the real target footage: audio-visual lag, mouth sharpness, seam energy,
# silent flicker; JSON + HTML report in out/eval/. Defaults to the demo's output and target.
EVAL_OUTPUT ?= out/demo.mp4
eval: setup
	$(PY) -m evaluation output $(EVAL_OUTPUT) --target $(or $(VIDEO),$(SAMPLE_DATA)/speakers/obama/obama_clip2.mp4)

# Lip accuracy against its rules, through the stack (`make up` first): trains lipacc-obama and lipacc-grid once
# (GRID's 30 minutes take about 25 minutes to analyse the first time), renders each held-out clip's speech and free
# speech onto the speaker's target, prints every rule with its figure. LIPACC_ARGS="--cases obama" for one.
LIPACC_ARGS ?=
lip-accuracy: setup
	$(PY) -m evaluation.lip_accuracy $(LIPACC_ARGS)

clean:
	rm -rf $(VENV) audio2video build .pytest_cache .ruff_cache *.egg-info
