# Local Kubernetes for development and e2e tests: a kind cluster, on machines with or
# without a container registry. Included by the top-level Makefile; also works alone:
#   make -f k8s/cluster.mk cluster
# Everything expensive is cached outside the repo in $(FANOUT_CACHE).

KIND_VERSION    ?= v0.30.0
K8S_VERSION     ?= v1.33.13
KUBECTL_VERSION ?= $(K8S_VERSION)
HELM_VERSION    ?= v3.19.5
KUBE_SCORE_VERSION ?= v1.20.0
KEDA_VERSION    ?= v2.21.0
# The S3-compatible object server: the chart's bundled store, and the integration tier's.
VERSITYGW_VERSION ?= v1.8.0

BIN_DIR      ?= $(CURDIR)/.bin
FANOUT_CACHE ?= $(HOME)/.cache/fanout
KIND         ?= $(BIN_DIR)/kind
KUBECTL      ?= $(BIN_DIR)/kubectl
HELM         ?= $(BIN_DIR)/helm
CLUSTER_NAME ?= fanout
KIND_CONFIG  ?= k8s/kind.yaml
# Empty: kindest/node:$(K8S_VERSION) if it can be pulled, else our offline-built node image.
KIND_NODE_IMAGE ?=
E2E_PYTHON   ?= $(if $(wildcard .venv/bin/python),$(CURDIR)/.venv/bin/python,python3)

export FANOUT_CACHE

K8S_SCRIPTS := k8s/scripts
CLUSTER_ENV := KIND=$(KIND) KUBECTL=$(KUBECTL) CLUSTER_NAME=$(CLUSTER_NAME) \
               KIND_CONFIG=$(KIND_CONFIG) K8S_VERSION=$(K8S_VERSION) KIND_NODE_IMAGE=$(KIND_NODE_IMAGE)

.PHONY: tools object-server docker base-images node-image cluster keda keda-images e2e-prepare cluster-delete test-cluster

tools: ## Install pinned kind, kubectl, helm and kube-score into .bin/
	$(K8S_SCRIPTS)/install-tools.sh $(BIN_DIR) kind=$(KIND_VERSION) kubectl=$(KUBECTL_VERSION) \
	  helm=$(HELM_VERSION) kube-score=$(KUBE_SCORE_VERSION)

object-server: ## Install the pinned versitygw (S3-compatible object server) into .bin/ (release, else Go module proxy)
	$(K8S_SCRIPTS)/install-tools.sh $(BIN_DIR) versitygw=$(VERSITYGW_VERSION)

docker: ## Make sure a Docker engine runs (installs and starts one if needed)
	$(K8S_SCRIPTS)/docker-up.sh

base-images: docker ## Build python:3.11-slim-bookworm and debian:bookworm-slim if they cannot be pulled
	images/base/build.sh debian:bookworm-slim python:3.11-slim-bookworm

node-image: docker ## Build (or reuse) the offline kind node image (cached by version + content hash)
	$(K8S_SCRIPTS)/build-node-image.sh $(K8S_VERSION)

cluster: tools docker ## Create the kind cluster from k8s/kind.yaml (1 control plane, 2 workers, large pool) and wait for it
	$(CLUSTER_ENV) $(K8S_SCRIPTS)/cluster-up.sh

keda: cluster ## Install KEDA (KEDA_VERSION) into the kind cluster: official images, else built from the Go module proxy
	KEDA_VERSION=$(KEDA_VERSION) $(CLUSTER_ENV) $(K8S_SCRIPTS)/keda-up.sh

keda-images: docker ## Get KEDA's images only (pulled, else built), no cluster needed
	KEDA_IMAGES_ONLY=1 KEDA_VERSION=$(KEDA_VERSION) $(CLUSTER_ENV) $(K8S_SCRIPTS)/keda-up.sh

e2e-prepare: tools node-image keda-images ## Build what the cluster tier needs, before any cluster exists (CI runs it beside make test)

cluster-delete: tools ## Delete the kind cluster
	$(KIND) delete cluster --name $(CLUSTER_NAME)

test-cluster: tools ## Run tests/e2e/test_cluster.py against the running cluster
	cd tests && KIND=$(KIND) KUBECTL=$(KUBECTL) CLUSTER_NAME=$(CLUSTER_NAME) \
	  $(E2E_PYTHON) -m pytest -v e2e/test_cluster.py
