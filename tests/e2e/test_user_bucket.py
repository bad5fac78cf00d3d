"""`storage.type: s3` pointed at the user's own bucket: an S3-compatible server that is not
the release's (here versitygw in a namespace of its own, as a user's MinIO or Ceph RGW
would be), its keys in a Secret the user created in the release's namespace. The chart
bundles no object store then; a fan-out completes through the user's bucket.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from e2e_kube import Cluster, eventually
from test_stack import CHART, Stack, _items_exactly_once, installed

VERSITYGW = yaml.safe_load((CHART / "values.yaml").read_text())["storage"]["objectStore"]["image"]
ACCESS, SECRET = "user-access", f"user-secret-{uuid.uuid4().hex}"
BUCKET = "team-results"


def _object_server(cluster: Cluster, ns: str) -> str:
    """versitygw with its data in an emptyDir, in namespace `ns`; its endpoint URL."""
    cluster.kubectl("create", "namespace", ns)
    keys = [f"--from-literal=ROOT_ACCESS_KEY_ID={ACCESS}", f"--from-literal=ROOT_SECRET_ACCESS_KEY={SECRET}"]
    cluster.kubectl("-n", ns, "create", "secret", "generic", "root", *keys)
    security = {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}
    }  # fmt: skip
    container = {
        "name": "versitygw",
        "image": f"{VERSITYGW['repository']}:{VERSITYGW['tag']}",
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "/bin/sh",
            "-c",
            "mkdir -p /data/b /data/m && exec versitygw -p :7070 posix --sidecar /data/m /data/b",
        ],
        "envFrom": [{"secretRef": {"name": "root"}}],
        "ports": [{"containerPort": 7070}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    labels = {"app": "user-s3"}
    manifests = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "user-s3", "namespace": ns},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels},
                  "spec": {"securityContext": security, "containers": [container],
                           "volumes": [{"name": "data", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "user-s3", "namespace": ns},
         "spec": {"selector": labels, "ports": [{"port": 7070, "targetPort": 7070}]}},
    ]  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))
    cluster.kubectl("-n", ns, "rollout", "status", "deployment/user-s3", "--timeout=180s", timeout=200)
    return f"http://user-s3.{ns}.svc.cluster.local:7070"


def _users_secret_and_bucket(stack: Stack, endpoint: str) -> None:
    """What the user has before installing: the keys as a Secret, and the bucket (created
    here from a pod of the runtime image, with boto3)."""
    stack.k("create", "secret", "generic", "team-s3",
            f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET}")  # fmt: skip
    code = (
        f"import boto3; boto3.client('s3', endpoint_url='{endpoint}').create_bucket(Bucket='{BUCKET}'); print('made')"
    )
    overrides = {"spec": {"containers": [{
        "name": "mkbucket", "image": ":".join(stack.image), "command": ["python", "-c", code],
        "envFrom": [{"secretRef": {"name": "team-s3"}}], "env": [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}],
    }]}}  # fmt: skip
    image = ":".join(stack.image)
    stack.k("run", "mkbucket", "--restart=Never", f"--image={image}", f"--overrides={json.dumps(overrides)}")

    def made() -> bool:
        phase = stack.cluster.json("-n", stack.namespace, "get", "pod", "mkbucket")["status"].get("phase")
        assert phase != "Failed", stack.k("logs", "mkbucket", check=False).stdout
        return phase == "Succeeded"

    eventually(made, timeout=180, message="the user's bucket created")
    stack.k("delete", "pod", "mkbucket", "--wait=false")


def test_a_release_on_the_users_own_bucket_fans_out(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    objects_ns = f"e2e-user-s3-{uuid.uuid4().hex[:5]}"
    try:
        endpoint = _object_server(cluster, objects_ns)
        values = (
            "--set", "storage.type=s3", "--set", f"storage.s3.bucket={BUCKET}",
            "--set", f"storage.s3.endpointUrl={endpoint}", "--set", "storage.s3.existingSecret=team-s3",
            "--set", "pools.light.replicas=2", "--set", "pools.heavy.replicas=0",
        )  # fmt: skip
        prepare = lambda s: _users_secret_and_bucket(s, endpoint)  # noqa: E731
        with installed(cluster, request, "e2e-user-bucket", values, prepare) as s:
            assert not s.pods("app.kubernetes.io/component=object-store"), "no bundled object store"
            summary = s.wait_fanout(s.start_fanout("--items", "300", "--chunk-size", "3", "--heavy-batches", "0"))
            _items_exactly_once(summary, 300)
            assert summary["per_worker"], summary
    finally:
        cluster.kubectl("delete", "namespace", objects_ns, "--wait=false", check=False)
