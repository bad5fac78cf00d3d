"""Fixtures for end-to-end tests against a real Kubernetes cluster (our kind cluster).

The cluster must already exist (`make cluster`). Tests talk to it through the pinned
kubectl in .bin (override with $KUBECTL) using $KUBECONFIG, or else the kubeconfig that
`kind get kubeconfig --name $CLUSTER_NAME` prints. Each test gets a fresh namespace that is
deleted afterwards; when a test fails, the cluster state and the namespace's pods are
printed so CI logs show why.

Timeouts scale with $E2E_TIMEOUT_SCALE (e.g. 2 on a slow machine).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import Any

import pytest
from e2e_kube import CLUSTER_NAME, KIND, Cluster, build_image


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    # Remember each phase's outcome on the item so fixtures can tell a failed test at teardown.
    if call.when in ("setup", "call"):
        setattr(item, f"e2e_{call.when}_failed", call.excinfo is not None)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """The running cluster; fails (or skips, with E2E_SKIP_WITHOUT_CLUSTER=1) if there is none."""
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig:
        result = subprocess.run([KIND, "get", "kubeconfig", "--name", CLUSTER_NAME], capture_output=True, text=True)
        if result.returncode == 0:
            path = tmp_path_factory.mktemp("kube") / "config"
            path.write_text(result.stdout)
            kubeconfig = str(path)
    c = Cluster(kubeconfig or os.path.expanduser("~/.kube/config"))
    probe = c.kubectl("get", "--raw", "/readyz", check=False, timeout=30) if kubeconfig else None
    if probe is None or probe.returncode != 0:
        why = probe.stderr if probe is not None else f"no kind cluster named {CLUSTER_NAME!r}"
        msg = f"no reachable cluster (run `make cluster`): {why}"
        if os.environ.get("E2E_SKIP_WITHOUT_CLUSTER") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
    return c


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Any:
    """A fresh namespace for one test, deleted afterwards; dumps diagnostics if the test failed."""
    base = request.node.name.replace("_", "-").lower()[:40].strip("-")
    name = f"e2e-{base}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "fanout.io/e2e=true")
    yield name
    if getattr(request.node, "e2e_setup_failed", False) or getattr(request.node, "e2e_call_failed", False):
        print(f"\n===== cluster state after failure of {request.node.nodeid} =====")
        print(cluster.dump(name))
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def web_image(cluster: Cluster) -> str:
    """A tiny HTTP server image (python http.server on 8080), built locally and kind-loaded."""
    tag = "fanout-e2e/web:1"
    build_image(
        tag,
        """\
FROM python:3.11-slim-bookworm
RUN mkdir /srv/www && echo "hello from fanout e2e" > /srv/www/index.html
WORKDIR /srv/www
EXPOSE 8080
CMD ["python3", "-m", "http.server", "8080"]
""",
    )
    cluster.kind("load", "docker-image", tag, "--name", CLUSTER_NAME)
    return tag
