# The fanout Helm chart and its images: build, test, deploy to the kind cluster, demo, scale.
# Included by the top-level Makefile (`-include charts/chart.mk`); uses KIND, KUBECTL, HELM
# and CLUSTER_NAME from k8s/cluster.mk when that is included, with the same defaults here.

BIN_DIR      ?= $(CURDIR)/.bin
KIND         ?= $(BIN_DIR)/kind
KUBECTL      ?= $(BIN_DIR)/kubectl
HELM         ?= $(BIN_DIR)/helm
CLUSTER_NAME ?= fanout
CHART_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

CHART           ?= charts/fanout
CHART_RELEASE   ?= fanout
CHART_NAMESPACE ?= fanout
# Values for the kind cluster (placement for its node-local volumes; see the file).
CHART_VALUES    ?= $(CHART)/ci/kind-values.yaml
DEMO_ITEMS      ?= 500
DEMO_HEAVY      ?= 1
# More fanout_demo.flow arguments, e.g. DEMO_ARGS="--heavy-cpus 2" (heavy batches as crunch pods).
DEMO_ARGS       ?=
POOL            ?= light
REPLICAS        ?=

# Image tags are content hashes of the inputs (computed only when used): a rebuild
# happens exactly when something that goes into the image changed.
RUNTIME_IMAGE  = $(shell images/runtime/build.sh --print-tag)
POSTGRES_IMAGE ?= postgres:15-bookworm
# Redis of the server's HA layout (server.replicas; the chart's redis.image).
REDIS_IMAGE    ?= redis:7.0.15-bookworm
# The bundled object server (storage.type objectStore); its tag is the chart's default.
VERSITYGW_IMAGE = versity/versitygw:$(VERSITYGW_VERSION)
KUBECTL_NS     = $(KUBECTL) --context kind-$(CLUSTER_NAME) -n $(CHART_NAMESPACE)
HELM_NS        = $(HELM) --kube-context kind-$(CLUSTER_NAME) -n $(CHART_NAMESPACE)

_chart_comma := ,
_chart_space := $(subst ,, )

.PHONY: images chart-test chart-lint deploy demo scale undeploy

images: ## Build the runtime, PostgreSQL, Redis and object server images (skipped when their inputs did not change)
	@timeout 10 docker info >/dev/null 2>&1 || k8s/scripts/docker-up.sh
	@for img in python:3.11-slim-bookworm debian:bookworm-slim; do \
	  docker image inspect $$img >/dev/null 2>&1 || images/base/build.sh $$img; done
	images/runtime/build.sh >/dev/null
	TAG=$(POSTGRES_IMAGE) images/postgres/build.sh >/dev/null
	TAG=$(REDIS_IMAGE) images/redis/build.sh >/dev/null
	images/versitygw/build.sh $(VERSITYGW_VERSION) >/dev/null
	@echo "images: $(RUNTIME_IMAGE) $(POSTGRES_IMAGE) $(REDIS_IMAGE) $(VERSITYGW_IMAGE)"

chart-test: $(if $(and $(wildcard $(HELM)),$(wildcard $(BIN_DIR)/kube-score)),,tools) ## Chart tests: render, lint, kube-score, reject bad values, validate against the Kubernetes OpenAPI schema (seconds)
	cd tests && ../$(CHART_PYTHON) -m pytest chart -q

chart-lint: $(if $(wildcard $(HELM)),,tools) ## helm lint the chart (defaults and kind values)
	$(HELM) lint --strict $(CHART) --kube-version $(or $(K8S_VERSION),v1.33.13)
	$(HELM) lint --strict $(CHART) --kube-version $(or $(K8S_VERSION),v1.33.13) -f $(CHART_VALUES)

deploy: images ## Install/upgrade the chart into namespace $(CHART_NAMESPACE) of the kind cluster
	$(KIND) load docker-image --name $(CLUSTER_NAME) $(RUNTIME_IMAGE) $(POSTGRES_IMAGE) $(REDIS_IMAGE) $(VERSITYGW_IMAGE)
	$(HELM_NS) upgrade --install $(CHART_RELEASE) $(CHART) --create-namespace \
	  -f $(CHART_VALUES) --set image.repository=$(firstword $(subst :, ,$(RUNTIME_IMAGE))) \
	  --set image.tag=$(lastword $(subst :, ,$(RUNTIME_IMAGE))) --wait --timeout 15m
	$(KUBECTL_NS) get pods -o wide

demo: ## Fan out DEMO_ITEMS items (and DEMO_HEAVY heavy batches) in the cluster; prints items per worker pod
	@$(HELM_NS) get values $(CHART_RELEASE) -o yaml > .demo-values.yaml
	@$(HELM) template $(CHART_RELEASE) $(CHART) -n $(CHART_NAMESPACE) --kube-version $(or $(K8S_VERSION),v1.33.13) \
	  -f .demo-values.yaml --set demo.items=$(DEMO_ITEMS) --set demo.heavyBatches=$(DEMO_HEAVY) \
	  $(if $(strip $(DEMO_ARGS)),--set 'demo.extraArgs={$(subst $(_chart_space),$(_chart_comma),$(strip $(DEMO_ARGS)))}') \
	  --show-only templates/tests/demo.yaml > .demo-job.yaml; rm -f .demo-values.yaml
	@$(KUBECTL_NS) delete job -l app.kubernetes.io/component=demo,app.kubernetes.io/instance=$(CHART_RELEASE) --ignore-not-found >/dev/null
	@job=$$($(KUBECTL_NS) create -f .demo-job.yaml -o name); rm -f .demo-job.yaml; \
	  echo "demo: $$job: $(DEMO_ITEMS) items, $(DEMO_HEAVY) heavy batch(es)"; \
	  $(KUBECTL_NS) wait --for=condition=Ready pod -l job-name=$${job#*/} --timeout=300s >/dev/null || true; \
	  $(KUBECTL_NS) logs -f $$job; \
	  $(KUBECTL_NS) wait --for=condition=complete $$job --timeout=60s >/dev/null \
	    || { echo "demo: $$job did not complete" >&2; exit 1; }

scale: ## Scale a task-worker pool: make scale POOL=light REPLICAS=4 (a helm upgrade, so it sticks)
	@test -n "$(REPLICAS)" || { echo "usage: make scale POOL=light REPLICAS=4" >&2; exit 2; }
	$(HELM_NS) upgrade $(CHART_RELEASE) $(CHART) --reuse-values --set pools.$(POOL).replicas=$(REPLICAS) --wait --timeout 10m
	$(KUBECTL_NS) get pods -l fanout.io/pool=$(POOL) -o wide

undeploy: ## Uninstall the release (its volumes go with it)
	$(HELM_NS) uninstall $(CHART_RELEASE) --wait
