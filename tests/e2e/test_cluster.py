"""Acceptance tests for the local kind cluster (k8s/kind.yaml, `make cluster`)."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

from e2e_kube import CLUSTER_NAME, Cluster, build_image, eventually

LARGE = "fanout.io/pool"
TOLERATE_LARGE = f"""
      tolerations:
      - {{key: {LARGE}, operator: Equal, value: large, effect: NoSchedule}}"""


def node_ready(node: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def large_node(cluster: Cluster) -> str:
    names = [n["metadata"]["name"] for n in cluster.nodes() if n["metadata"]["labels"].get(LARGE) == "large"]
    assert len(names) == 1, f"expected exactly one node labelled {LARGE}=large, got {names}"
    return names[0]


def sleeper(name: str, image: str, replicas: int = 1, extra: str = "") -> str:
    """A Deployment whose pods just sleep (our locally built image, never pulled)."""
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 1{extra}
      containers:
      - name: main
        image: {image}
        imagePullPolicy: Never
        command: [python3, -c, "import time; time.sleep(100000)"]
"""


def running_pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return [
        p
        for p in cluster.pods(namespace, selector)
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def test_all_three_nodes_become_ready(cluster: Cluster) -> None:
    def all_ready() -> list[dict[str, Any]]:
        nodes = cluster.nodes()
        not_ready = [n["metadata"]["name"] for n in nodes if not node_ready(n)]
        assert len(nodes) == 3 and not not_ready, f"{len(nodes)} nodes, not Ready: {not_ready}"
        return nodes

    nodes = eventually(all_ready, timeout=180, message="3 nodes Ready")
    roles = sorted(
        "control-plane" if "node-role.kubernetes.io/control-plane" in n["metadata"]["labels"] else "worker"
        for n in nodes
    )
    assert roles == ["control-plane", "worker", "worker"]
    large = [n for n in nodes if n["metadata"]["labels"].get(LARGE) == "large"]
    assert len(large) == 1
    taints = large[0]["spec"].get("taints", [])
    assert {"key": LARGE, "value": "large", "effect": "NoSchedule"} in taints, taints


def test_pod_reaches_service_by_dns_name(cluster: Cluster, namespace: str, web_image: str) -> None:
    cluster.apply(
        f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        image: {web_image}
        imagePullPolicy: Never
        ports: [{{containerPort: 8080}}]
        readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
""",
        namespace,
    )
    cluster.kubectl("-n", namespace, "rollout", "status", "deployment/web", "--timeout=120s", timeout=150)
    # A client pod fetches the page by the Service's short and fully qualified DNS names.
    cluster.apply(
        f"""
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  restartPolicy: OnFailure
  containers:
  - name: client
    image: {web_image}
    imagePullPolicy: Never
    command:
    - python3
    - -c
    - |
      import sys, urllib.request
      for url in sys.argv[1:]:
          print(url, urllib.request.urlopen(url, timeout=5).read().decode().strip())
    - http://web/
    - http://web.{namespace}.svc.cluster.local/
""",
        namespace,
    )

    def succeeded() -> str:
        pod = cluster.json("-n", namespace, "get", "pod", "client")
        assert pod["status"].get("phase") == "Succeeded", pod["status"].get("phase")
        return cluster.kubectl("-n", namespace, "logs", "client").stdout

    out = eventually(succeeded, timeout=120, message="client pod fetched the service by DNS name")
    assert "http://web/ hello from fanout e2e" in out, out
    assert f"http://web.{namespace}.svc.cluster.local/ hello from fanout e2e" in out, out


def test_large_pool_only_gets_pods_that_ask_for_it(cluster: Cluster, namespace: str, web_image: str) -> None:
    large = large_node(cluster)
    selector = f"""
      nodeSelector: {{{LARGE}: large}}"""
    cluster.apply(sleeper("large", web_image, 1, selector + TOLERATE_LARGE), namespace)
    cluster.apply(sleeper("anywhere", web_image, 4), namespace)
    # Selecting the pool without tolerating its taint must not be enough.
    cluster.apply(sleeper("selects-only", web_image, 1, selector), namespace)

    pods = eventually(
        lambda: (p := running_pods(cluster, namespace, "app=large")) and p,
        timeout=120,
        message="large-pool pod running",
    )
    assert [p["spec"]["nodeName"] for p in pods] == [large]

    anywhere = eventually(
        lambda: (p := running_pods(cluster, namespace, "app=anywhere")) and len(p) == 4 and p,
        timeout=120,
        message="4 ordinary pods running",
    )
    assert large not in {p["spec"]["nodeName"] for p in anywhere}

    def unschedulable() -> bool:
        [pod] = cluster.pods(namespace, "app=selects-only")
        conds = {c["type"]: c for c in pod["status"].get("conditions", [])}
        return (
            pod["status"].get("phase") == "Pending"
            and not pod["spec"].get("nodeName")
            and conds.get("PodScheduled", {}).get("reason") == "Unschedulable"
        )

    eventually(unschedulable, timeout=60, message="pod selecting the pool without toleration stays Pending")


def test_scale_deployment_up_and_down(cluster: Cluster, namespace: str, web_image: str) -> None:
    cluster.apply(sleeper("scaled", web_image, 1), namespace)
    eventually(lambda: len(running_pods(cluster, namespace, "app=scaled")) == 1, timeout=120, message="1 pod")

    cluster.kubectl("-n", namespace, "scale", "deployment/scaled", "--replicas=3")
    cluster.kubectl("-n", namespace, "rollout", "status", "deployment/scaled", "--timeout=120s", timeout=150)
    eventually(lambda: len(running_pods(cluster, namespace, "app=scaled")) == 3, timeout=120, message="3 pods")

    cluster.kubectl("-n", namespace, "scale", "deployment/scaled", "--replicas=1")
    eventually(lambda: len(cluster.pods(namespace, "app=scaled")) == 1, timeout=120, message="back to exactly 1 pod")
    assert len(running_pods(cluster, namespace, "app=scaled")) == 1
    assert cluster.json("-n", namespace, "get", "deployment", "scaled")["status"].get("readyReplicas") == 1


def test_kind_load_docker_image_then_run_it(cluster: Cluster, namespace: str) -> None:
    token = uuid.uuid4().hex
    tag = f"fanout-e2e/loaded:{token[:12]}"
    # A brand-new tag nobody could pull: the pod can only run if `kind load` put it on the node.
    build_image(tag, 'FROM debian:bookworm-slim\nCOPY token /token\nCMD ["cat", "/token"]\n', {"token": token})
    cluster.kind("load", "docker-image", tag, "--name", CLUSTER_NAME)
    cluster.apply(
        f"""
apiVersion: v1
kind: Pod
metadata: {{name: loaded}}
spec:
  restartPolicy: Never
  containers:
  - {{name: main, image: "{tag}", imagePullPolicy: Never}}
""",
        namespace,
    )

    def done() -> str:
        pod = cluster.json("-n", namespace, "get", "pod", "loaded")
        assert pod["status"].get("phase") == "Succeeded", pod["status"]
        return cluster.kubectl("-n", namespace, "logs", "loaded").stdout

    try:
        assert eventually(done, timeout=120, message="pod ran the loaded image").strip() == token
    finally:
        subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)


def test_pvc_binds_and_pod_writes_to_it(cluster: Cluster, namespace: str, web_image: str) -> None:
    default = [
        sc["metadata"]["name"]
        for sc in cluster.json("get", "storageclass")["items"]
        if sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"
    ]
    assert len(default) == 1, default
    token = uuid.uuid4().hex

    def pod(name: str, script: str) -> str:
        return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  restartPolicy: Never
  securityContext: {{runAsUser: 1000, runAsGroup: 1000}}
  containers:
  - name: main
    image: {web_image}
    imagePullPolicy: Never
    command: [sh, -c, "{script}"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data}}}}
"""

    cluster.apply(
        """
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
""",
        namespace,
    )
    # As an unprivileged user, like most real workloads (PostgreSQL included).
    cluster.apply(pod("writer", f"echo {token} > /data/token && cat /data/token"), namespace)

    def phase(name: str) -> str:
        p = cluster.json("-n", namespace, "get", "pod", name)["status"].get("phase")
        assert p == "Succeeded", f"{name} is {p}"
        return p

    eventually(lambda: phase("writer"), timeout=180, message="writer pod wrote to the volume")
    pvc = cluster.json("-n", namespace, "get", "pvc", "data")
    assert pvc["status"]["phase"] == "Bound"
    assert pvc["spec"].get("storageClassName") == default[0]
    # The data outlives the pod that wrote it.
    cluster.apply(pod("reader", "cat /data/token"), namespace)
    eventually(lambda: phase("reader"), timeout=120, message="reader pod read the volume")
    assert cluster.kubectl("-n", namespace, "logs", "reader").stdout.strip() == token
