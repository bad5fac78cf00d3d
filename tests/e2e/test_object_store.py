"""The bundled object store on kind, without the shared hostPath: storage that works on any
multi-node cluster whose only volumes are ReadWriteOnce.

A release of its own (`storage.type: objectStore`): versitygw keeps every task's
parameters and result on one ReadWriteOnce claim (kind's local-path provisioner binds it
to one node), and the light pods, forced onto both worker nodes, reach it over S3. A busy
worker pod and then the object server's pod are deleted mid-run: nothing is lost.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_kube import Cluster, eventually
from test_stack import CHART, RELEASE, Stack, _items_exactly_once, _pod_of, installed

STORE = f"{RELEASE}-object-store"
VALUES = ("-f", str(CHART / "ci" / "kind-objectstore-values.yaml"))


@pytest.fixture(scope="module")
def stack(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Stack]:
    with installed(cluster, request, "e2e-objects", VALUES) as s:
        yield s


def _nodes(stack: Stack, selector: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in stack.pods(selector)}


def test_the_object_store_serves_pods_on_both_nodes_and_accounts_for_every_item_when_pods_die(stack: Stack) -> None:
    light = _nodes(stack, "fanout.io/pool=light")
    assert len(set(light.values())) == 2, f"the light pods on two nodes: {light}"
    claim = stack.cluster.json("-n", stack.namespace, "get", "pvc", STORE)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pods = stack.pods(f"app.kubernetes.io/instance={RELEASE}")
    host_paths = [p["metadata"]["name"] for p in pods for v in p["spec"].get("volumes", []) if "hostPath" in v]
    assert not host_paths, f"no pod of the release uses a hostPath: {host_paths}"

    # 500 items over both nodes: every item exactly once, both pods took a share.
    summary = stack.wait_fanout(stack.start_fanout("--items", "500", "--chunk-size", "5", "--heavy-batches", "0"))
    _items_exactly_once(summary, 500)
    assert {_pod_of(w) for w in summary["per_worker"]} == set(light), summary["per_worker"]

    # A busy worker pod, then the object server's pod, deleted mid-run.
    job = stack.start_fanout("--items", "200", "--chunk-size", "1", "--item-sleep", "1", "--heavy-batches", "0")
    stack.wait_busy(job, done=10, running=4)
    victim = sorted(light)[0]
    stack.k("delete", "pod", victim, "--grace-period=0", "--force")
    stack.wait_busy(job, done=40, running=2)
    (store,) = stack.ready_pods(f"app.kubernetes.io/component=object-store,app.kubernetes.io/instance={RELEASE}")
    stack.k("delete", "pod", store, "--wait=false")
    summary = stack.wait_fanout(job)
    # Nothing lost, nothing failed: the old pod serves on for a few seconds after it is
    # marked for deletion (preStop), and a connection that hangs on it anyway gives up
    # after seconds, not boto3's default minute (fanout.settings.OBJECT_STORE_TIMEOUTS).
    _items_exactly_once(summary, 200)
    eventually(lambda: len(stack.ready_pods("app.kubernetes.io/component=object-store")) == 1, timeout=120)
