# fanout: distributed Python work on Kubernetes with Prefect 3.
# `make help` lists the targets. Tool versions are pinned here; Python dependencies in
# flows/requirements*.lock (regenerate with `make lock`).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= $(CURDIR)/.venv
PY          := $(VENV)/bin/python
UV_VERSION  := 0.13.9
ITEMS       ?= 2000

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# --- Python environment ------------------------------------------------------------

$(VENV)/.stamp: flows/requirements-dev.lock flows/pyproject.toml
	@$(PYTHON) -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null; \
	  else echo "error: need Python 3.11 with venv (apt-get install python3 python3-venv)" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet uv==$(UV_VERSION)
	$(VENV)/bin/uv pip sync --quiet --python $(PY) flows/requirements-dev.lock
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e flows
	@touch $@

.PHONY: install
install: $(VENV)/.stamp ## Create .venv with the pinned dependencies and the flows package

.PHONY: lock
lock: ## Re-resolve flows/requirements*.lock from flows/pyproject.toml
	$(VENV)/bin/uv pip compile --quiet --python-version 3.11 flows/pyproject.toml -o flows/requirements.lock
	$(VENV)/bin/uv pip compile --quiet --python-version 3.11 --extra dev flows/pyproject.toml -o flows/requirements-dev.lock

# --- local stack -------------------------------------------------------------------

.PHONY: run
run: install ## Demo: local server + 2 light + 1 heavy worker, fan out ITEMS items, print per-worker counts
	$(PY) -m fanout_demo.demo --items $(ITEMS)

.PHONY: worker
worker: install ## Run one task worker against PREFECT_API_URL serving TASKS=module:task,... (default: the demo's light pool)
	$(PY) -m fanout.worker --tasks $(or $(TASKS),fanout_demo.tasks:process_item)

# --- tests -------------------------------------------------------------------------

.PHONY: lint
lint: install ## ruff over the Python code
	$(VENV)/bin/ruff check flows tests
	$(VENV)/bin/ruff format --check flows tests

.PHONY: test-unit
test-unit: install ## Unit tests (seconds)
	cd tests && $(PY) -m pytest unit -q

.PHONY: redis
redis: ## Debian's redis-server (the API-replica integration tests' Redis, the bench's Celery broker)
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "error: the integration tests and make bench need redis-server (apt-get install redis-server)" >&2; exit 1; fi; }

.PHONY: test-integration
test-integration: install object-server redis ## Integration tests on a real local Prefect server, worker processes and object server (minutes)
	cd tests && VERSITYGW=$(BIN_DIR)/versitygw $(PY) -m pytest integration -v

.PHONY: test
test: lint test-unit chart-test test-integration ## Everything that needs no cluster: lint, unit, chart, integration

.PHONY: browser
browser: ## Headless Chromium and its driver for the UI e2e test (Debian's chromium + chromium-driver, same version)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver fonts-liberation >/dev/null; \
	  else echo "error: the UI e2e test needs Chromium and its driver (apt-get install chromium chromium-driver)" >&2; exit 1; fi; }
	@browser=$$(chromium --version 2>/dev/null | awk '{print $$2}'); driver=$$(chromedriver --version | awk '{print $$2}'); \
	if [ "$$browser" != "$$driver" ]; then \
	  echo "error: chromium $$browser and chromedriver $$driver differ: upgrade both (apt-get install chromium chromium-driver)" >&2; exit 1; fi; \
	echo "browser: chromium + chromedriver $$browser"

E2E_ENV = KIND=$(KIND) KUBECTL=$(KUBECTL) HELM=$(HELM) CLUSTER_NAME=$(CLUSTER_NAME) FANOUT_RUNTIME_IMAGE=$(RUNTIME_IMAGE)

.PHONY: e2e
e2e: install cluster keda images browser ## The whole stack on a local kind cluster: tools, cluster, KEDA, images, load, chart e2e tests
	$(KIND) load docker-image --name $(CLUSTER_NAME) $(RUNTIME_IMAGE) $(POSTGRES_IMAGE) $(REDIS_IMAGE) $(VERSITYGW_IMAGE)
	cd tests && $(E2E_ENV) $(PY) -m pytest -v $(or $(E2E_ARGS),e2e)

# --- benchmark ---------------------------------------------------------------------

.PHONY: bench
bench: install redis ## Benchmark our fan-out against Dask, Celery+Redis and a process pool (.bench/: JSON, PNG)
	@# Our kind cluster, if it runs, takes a third of a core: paused while measuring.
	@nodes=$$(docker ps -q --filter label=io.x-k8s.kind.cluster=$(CLUSTER_NAME) 2>/dev/null || true); \
	if [ -n "$$nodes" ]; then echo "bench: pausing the $(CLUSTER_NAME) kind cluster while measuring"; \
	  docker pause $$nodes >/dev/null; trap 'docker unpause '"$$(echo $$nodes)"' >/dev/null' EXIT; fi; \
	cd tests/bench && $(PY) bench.py --out $(CURDIR)/.bench $(BENCH_ARGS)

.PHONY: bench-kind
bench-kind: install cluster images ## Benchmark storage on kind: 10k items on the bundled object store against hostPath (.bench/)
	$(KIND) load docker-image --name $(CLUSTER_NAME) $(RUNTIME_IMAGE) $(POSTGRES_IMAGE) $(REDIS_IMAGE) $(VERSITYGW_IMAGE)
	cd tests && $(E2E_ENV) $(PY) bench/kind_storage.py --out $(CURDIR)/.bench $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) tests/.pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include k8s/cluster.mk
-include charts/chart.mk
