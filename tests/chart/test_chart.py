"""The fanout Helm chart, rendered with `helm template` (no cluster): what it deploys for
several value sets, that every manifest is valid for the target Kubernetes version, that
bad values are rejected naming the value, and that the work pool's base job template
turns into a valid Job through prefect-kubernetes itself."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml
from conftest import CHART, K8S_VERSION, NAMESPACE, RELEASE, VERSITYGW_VERSION, Rendered

from fanout import settings
from fanout.settings import HA_SERVER_SETTINGS, SERVER_SETTINGS

FULL = f"{RELEASE}-fanout"
STORE = f"{FULL}-object-store"
SERVER = f"{FULL}-server"
REAPER = f"{FULL}-reaper"
SERVICES = f"{FULL}-server-services"
REPLICAS = f"{FULL}-server-replicas"
REDIS = f"{FULL}-redis"
API_URL = f"http://{SERVER}:4200/api"
AUTH_SECRET = f"{FULL}-auth"
AUTH_REF = {"secretKeyRef": {"name": AUTH_SECRET, "key": "auth-string"}}

# Value sets every structural test runs over (name -> values).
EXTERNAL_DB = {"database": {"type": "external", "external": {"existingSecret": "prefect-db", "key": "url"}}}
SQLITE = {"database": {"type": "sqlite"}, "server": {"replicas": 1}}
CUSTOM_POOLS = {
    "pools": {
        "light": {"replicas": 5, "limit": 3, "terminationGracePeriodSeconds": 30},
        "heavy": None,
        "batch": {
            "replicas": 2,
            "limit": 4,
            "tasks": ["fanout_demo.tasks:process_chunk"],
            "podDisruptionBudget": {"maxUnavailable": "50%"},
        },
    }
}
S3 = {
    "storage": {
        "type": "s3",
        "s3": {"bucket": "results", "endpointUrl": "http://minio:9000", "existingSecret": "s3-creds"},
    }
}
OBJECT_STORE = {"storage": {"type": "objectStore"}}
SCALED = {"pools": {"light": {"replicas": 12}, "heavy": {"replicas": 0}}}
HOSTPATH = {"storage": {"type": "hostPath", "hostPath": {"path": "/mnt/fanout"}}}
NO_AUTH_NO_REAPER = {"auth": {"enabled": False}, "reaper": {"enabled": False}}
LOCKED_DOWN = {"auth": {"existingSecret": "team-auth"}, "networkPolicy": {"enabled": True}}
KIND = yaml.safe_load((CHART / "ci" / "kind-values.yaml").read_text())
KIND_OBJECT_STORE = yaml.safe_load((CHART / "ci" / "kind-objectstore-values.yaml").read_text())
LARGE = {"fanout.io/pool": "large"}
LARGE_TOLERATION = {"key": "fanout.io/pool", "operator": "Equal", "value": "large", "effect": "NoSchedule"}
CRUNCH = {"name": "crunch", "entrypoint": "fanout_demo.tasks:crunch", "jobVariables": {}}
USER_DEPLOYMENTS = {
    "deployments": [
        CRUNCH,
        {
            "name": "heavy-user",
            "entrypoint": "userwork.heavy:cpu_census",
            "image": "myrepo/mywork:1",
            "jobVariables": {
                "cpu_request": "2",
                "cpu_limit": "2",
                "memory_request": "1Gi",
                "memory_limit": "1Gi",
                "node_selector": LARGE,
                "tolerations": [LARGE_TOLERATION],
                "env": {"MYWORK_MODE": "fast"},
            },
        },
        {"name": "script", "entrypoint": "/opt/flows/report.py:nightly", "flowName": "nightly", "description": "x"},
    ]
}
VALUE_SETS = {
    "defaults": None,
    "external-db": EXTERNAL_DB,
    "sqlite": SQLITE,
    "custom-pools": CUSTOM_POOLS,
    "s3": S3,
    "object-store": OBJECT_STORE,
    "scaled": SCALED,
    "hostpath": HOSTPATH,
    "kind": KIND,
    "kind-object-store": KIND_OBJECT_STORE,
    "no-auth-no-reaper": NO_AUTH_NO_REAPER,
    "locked-down": LOCKED_DOWN,
    "user-deployments": USER_DEPLOYMENTS,
}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (or the valueFrom dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


# --- every value set ------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_manifests_are_valid_kubernetes_objects(name, render, openapi):
    docs = render(VALUE_SETS[name])
    assert len(docs) >= 8
    problems = [p for d in docs for p in openapi.errors(d)]
    assert not problems, f"{len(problems)} schema problems ({K8S_VERSION}):\n" + "\n".join(problems)


def test_openapi_validator_catches_unknown_and_mistyped_fields(render, openapi):
    """The validator itself must be able to fail: a misplaced key and a wrong type."""
    server = render().get("Deployment", SERVER)
    bad = json.loads(json.dumps(server))
    pod_spec(bad)["containers"][0]["livenessProbes"] = {}  # typo: unknown field
    pod_spec(bad)["terminationGracePeriodSeconds"] = "soon"  # not an integer
    del pod_spec(bad)["containers"][0]["name"]  # required
    problems = "\n".join(openapi.errors(bad))
    assert "livenessProbes" in problems
    assert "terminationGracePeriodSeconds" in problems
    assert "'name' is a required property" in problems
    assert openapi.errors({"apiVersion": "apps/v1beta1", "kind": "Deployment", "metadata": {"name": "x"}})


@pytest.mark.parametrize("name", VALUE_SETS)
def test_security_defaults_on_every_pod(name, render):
    for obj in workloads(render(VALUE_SETS[name])):
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, what
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, what
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["capabilities"] == {"drop": ["ALL"]}, what
            assert sc["readOnlyRootFilesystem"] is True, what
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{what}/{c['name']}: read-only root needs a writable /tmp"
        if obj["metadata"]["name"] == f"{FULL}-worker":
            assert spec["automountServiceAccountToken"] is True
            assert spec["serviceAccountName"] == f"{FULL}-worker"
        else:
            assert spec["automountServiceAccountToken"] is False, f"{what} must not get an API token"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rbac_is_namespaced_and_minimal(name, render):
    docs = render(VALUE_SETS[name])
    assert not docs.all("ClusterRole") and not docs.all("ClusterRoleBinding")
    role = docs.get("Role", f"{FULL}-worker")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete", "patch"},
        (("",), ("pods", "pods/log", "events")): {"get", "list", "watch"},
    }
    binding = docs.get("RoleBinding", f"{FULL}-worker")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULL}-worker", "namespace": NAMESPACE}]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_names_and_labels_fit_63_characters_for_long_release_names(name, helm, tmp_path):
    release = "a-release-name-that-is-long-enough-to-hit-the-limit"
    cmd = [helm, "template", release, str(CHART), "-n", NAMESPACE, "--kube-version", K8S_VERSION]
    if VALUE_SETS[name]:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(VALUE_SETS[name]))
        cmd += ["-f", str(tmp_path / "v.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for d in filter(None, yaml.safe_load_all(proc.stdout)):
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]
        for v in d["metadata"].get("labels", {}).values():
            assert len(str(v)) <= 63, v


# --- defaults -------------------------------------------------------------------------


def test_defaults_deploy_the_whole_stack(render):
    docs = render()
    assert docs.names("Deployment") == {
        SERVER, SERVICES, REDIS, f"{FULL}-pool-light", f"{FULL}-pool-heavy", f"{FULL}-worker", REAPER, STORE
    }  # fmt: skip
    assert docs.names("StatefulSet") == {f"{FULL}-postgresql"}
    assert docs.names("Secret") == {f"{FULL}-postgresql", AUTH_SECRET, STORE, REDIS}
    assert docs.names("ServiceAccount") == {f"{FULL}-worker", REAPER}
    assert not docs.all("NetworkPolicy")
    assert docs.names("Service") == {  # -hl, -replicas: headless; reaper and task-workers: /metrics
        SERVER, REPLICAS, REDIS, f"{FULL}-postgresql", f"{FULL}-postgresql-hl", REAPER, f"{FULL}-task-workers", STORE
    }  # fmt: skip
    # Each read and written by one pod alone: the object store's, Redis's.
    assert docs.names("PersistentVolumeClaim") == {STORE, REDIS}
    assert docs.names("PodDisruptionBudget") == {SERVER, f"{FULL}-pool-light", f"{FULL}-pool-heavy"}
    hooks = {d["metadata"]["name"]: d["metadata"].get("annotations", {}).get("helm.sh/hook") for d in docs.all("Job")}
    (migrate,) = [n for n in hooks if n.startswith(f"{FULL}-migrate-")]
    # The migrations Job is no hook: the database it migrates is created by the same release.
    assert hooks == {f"{FULL}-setup": "post-install,post-upgrade", f"{FULL}-demo": "test", migrate: None}


def _server_container(docs) -> dict[str, Any]:
    (c,) = pod_spec(docs.get("Deployment", SERVER))["containers"]
    return c


def test_server_is_two_api_replicas_with_health_probes(render):
    docs = render()
    server = docs.get("Deployment", SERVER)
    assert server["spec"]["replicas"] == 2
    # A rollout starts a new replica before it stops an old one.
    assert server["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    c = _server_container(docs)
    assert c["command"] == ["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200", "--no-services"]
    env = env_of(c)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == {
        "secretKeyRef": {"name": f"{FULL}-postgresql", "key": "connection-url"}
    }
    for probe in ("startupProbe", "livenessProbe"):  # the API answers
        assert c[probe]["httpGet"] == {"path": "/api/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/api/ready", "port": "http"}  # ...and reaches its database
    assert {"name": "http", "containerPort": 4200, "protocol": "TCP"} in c["ports"]
    # Waits for PostgreSQL, then for the migrations Job, before starting.
    wait_db, wait_migrations = pod_spec(server)["initContainers"]
    assert wait_db["command"][-2:] == [f"{FULL}-postgresql", "5432"]
    assert wait_migrations["command"][:3] == ["python", "-m", "fanout.migrations"]
    assert env_of(wait_migrations)["PREFECT_API_DATABASE_CONNECTION_URL"] == env["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_every_server_process_runs_prefects_ha_settings_with_redis_from_its_secret(render):
    """API replicas, services and migrations get fanout.settings.HA_SERVER_SETTINGS (what the
    local stack's replica tests and `make bench` run), the Redis URL from the Secret."""
    docs = render()
    redis_url = {"secretKeyRef": {"name": REDIS, "key": "url"}}
    want = {k: (redis_url if v == "{redis}" else v) for k, v in HA_SERVER_SETTINGS.items()}
    (job,) = [j for j in docs.all("Job") if j["metadata"]["name"].startswith(f"{FULL}-migrate-")]
    for obj in (docs.get("Deployment", SERVER), docs.get("Deployment", SERVICES), job):
        (c,) = pod_spec(obj)["containers"]
        env = env_of(c)
        assert {k: env.get(k) for k in want} == want, obj["metadata"]["name"]
        assert env["PREFECT_API_DATABASE_MIGRATE_ON_START"] == "false"  # the Job migrates, once
        assert {k: env.get(k) for k in SERVER_SETTINGS} == SERVER_SETTINGS
    secret = docs.get("Secret", REDIS)
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 32 and password.isalnum()
    assert base64.b64decode(secret["data"]["url"]).decode() == f"redis://:{password}@{REDIS}:6379/0"


def test_services_migrations_and_redis_of_the_ha_layout(render):
    docs = render()
    services = docs.get("Deployment", SERVICES)
    assert services["spec"]["replicas"] == 1
    (c,) = pod_spec(services)["containers"]
    assert c["command"] == ["prefect", "server", "services", "start"]
    assert [i["name"] for i in pod_spec(services)["initContainers"]] == ["wait-for-database", "wait-for-migrations"]
    (job,) = [j for j in docs.all("Job") if j["metadata"]["name"].startswith(f"{FULL}-migrate-")]
    (m,) = pod_spec(job)["containers"]
    assert m["command"] == ["prefect", "server", "database", "upgrade", "-y"]
    # The Job's pod template is immutable: a new image makes a new Job (another name).
    (job2,) = [j for j in render({"image": {"tag": "2"}}).all("Job") if "-migrate-" in j["metadata"]["name"]]
    assert job2["metadata"]["name"] != job["metadata"]["name"]
    redis = docs.get("Deployment", REDIS)
    assert redis["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_spec(redis)
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 999
    (r,) = spec["containers"]
    assert r["image"] == "redis:7.0.15-bookworm"
    assert "$REDIS_PASSWORD" in r["args"][0] and "--appendonly yes" in r["args"][0]
    assert env_of(r)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": REDIS, "key": "password"}}
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in spec["volumes"]}
    assert claims["data"] == {"claimName": REDIS}
    assert (
        "max_connections=200"
        in docs.get("StatefulSet", f"{FULL}-postgresql")["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_api_replicas_are_spread_kept_up_and_found_by_every_task_worker(render):
    docs = render()
    server = docs.get("Deployment", SERVER)
    labels = server["spec"]["template"]["metadata"]["labels"]
    (spread,) = pod_spec(server)["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and matches(spread["labelSelector"]["matchLabels"], labels)
    pdb = docs.get("PodDisruptionBudget", SERVER)
    assert pdb["spec"]["maxUnavailable"] == 1 and matches(pdb["spec"]["selector"]["matchLabels"], labels)
    headless = docs.get("Service", REPLICAS)
    assert headless["spec"]["clusterIP"] == "None" and matches(headless["spec"]["selector"], labels)
    services_labels = docs.get("Deployment", SERVICES)["spec"]["template"]["metadata"]["labels"]
    assert not matches(headless["spec"]["selector"], services_labels)  # API replicas only
    for pool in ("light", "heavy"):
        (c,) = pod_spec(docs.get("Deployment", f"{FULL}-pool-{pool}"))["containers"]
        assert env_of(c)["FANOUT_API_REPLICAS"] == REPLICAS
        assert env_of(c)["PREFECT_API_URL"] == API_URL  # everything else goes through the Service


def test_one_api_replica_is_allowed(render):
    docs = render({"server": {"replicas": 1}})
    assert docs.get("Deployment", SERVER)["spec"]["replicas"] == 1
    assert SERVER not in docs.names("PodDisruptionBudget")  # a PDB of one would block every drain
    assert {SERVICES, REDIS} <= docs.names("Deployment")  # the same layout: scaling is a replica count


def test_server_replicas_are_checked(render_error):
    assert "/server/replicas" in render_error({"server": {"replicas": 0}})
    assert "server.replicas must be 1 with database.type sqlite" in render_error({"database": {"type": "sqlite"}})
    assert "database.postgres.maxConnections (200) is too small for server.replicas 5" in render_error(
        {"server": {"replicas": 5}}
    )
    assert "server.replicas must be an integer >= 1, got 0" in render_error(
        {"server": {"replicas": 0}}, "--skip-schema-validation"
    )


def test_postgres_secret_holds_a_generated_password_and_a_matching_url(render):
    docs = render()
    secret = docs.get("Secret", f"{FULL}-postgresql")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert len(data["password"]) == 32 and data["password"].isalnum()
    assert data["connection-url"] == (f"postgresql+asyncpg://prefect:{data['password']}@{FULL}-postgresql:5432/prefect")
    sts = docs.get("StatefulSet", f"{FULL}-postgresql")
    (c,) = pod_spec(sts)["containers"]
    assert c["image"] == "postgres:15-bookworm"
    env = env_of(c)
    assert env["POSTGRES_PASSWORD"] == {"secretKeyRef": {"name": f"{FULL}-postgresql", "key": "password"}}
    assert env["PGDATA"].startswith("/var/lib/postgresql/data/")
    assert pod_spec(sts)["securityContext"]["runAsUser"] == 999
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"


def test_postgres_password_from_values_is_used(render):
    secret = render({"database": {"postgres": {"password": "given-pw"}}}).get("Secret", f"{FULL}-postgresql")
    assert base64.b64decode(secret["data"]["password"]).decode() == "given-pw"


def test_pools_are_task_worker_deployments(render):
    docs = render()
    for pool, limit, replicas in (("light", "8", 2), ("heavy", "1", 1)):
        dep = docs.get("Deployment", f"{FULL}-pool-{pool}")
        assert dep["spec"]["replicas"] == replicas
        (c,) = pod_spec(dep)["containers"]
        assert c["command"] == ["python", "-m", "fanout.worker"]
        env = env_of(c)
        assert env["FANOUT_POOL"] == pool
        assert env["FANOUT_WORKER_LIMIT"] == limit
        assert env["FANOUT_HEALTH_HOST"] == "0.0.0.0"
        assert env["FANOUT_HEALTH_PORT"] == "8080"
        assert env["PREFECT_API_URL"] == API_URL
        assert env["FANOUT_STORAGE"] == "s3-bucket/fanout"  # the bundled object store
        assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}  # its loop turns
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}  # subscribed, not draining
        assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
        assert [m["name"] for m in c["volumeMounts"]] == ["tmp"]  # storage over S3, on any node
        pdb = docs.get("PodDisruptionBudget", f"{FULL}-pool-{pool}")
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]
        assert pdb["spec"]["maxUnavailable"] == 1
    heavy = pod_spec(docs.get("Deployment", f"{FULL}-pool-heavy"))
    assert heavy["nodeSelector"] == {"fanout.io/pool": "large"}
    assert heavy["tolerations"] == [
        {"key": "fanout.io/pool", "operator": "Equal", "value": "large", "effect": "NoSchedule"}
    ]
    assert heavy["terminationGracePeriodSeconds"] == 600
    assert heavy["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    light = pod_spec(docs.get("Deployment", f"{FULL}-pool-light"))
    assert "nodeSelector" not in light and "tolerations" not in light


def test_kubernetes_worker_polls_the_work_pool_of_this_namespace(render):
    worker = render({"worker": {"workPool": "big-pods"}}).get("Deployment", f"{FULL}-worker")
    (c,) = pod_spec(worker)["containers"]
    assert c["command"][:7] == ["prefect", "worker", "start", "--pool", "big-pods", "--type", "kubernetes"]
    env = env_of(c)
    assert env["PREFECT_API_URL"] == API_URL
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE


def test_worker_disabled_removes_worker_rbac_and_setup(render):
    docs = render({"worker": {"enabled": False}})
    assert f"{FULL}-worker" not in docs.names("Deployment")
    assert not docs.all("Role") and docs.names("ServiceAccount") == {REAPER}
    assert f"{FULL}-setup" not in docs.names("Job")


# --- database options -----------------------------------------------------------------


def test_external_database_reads_the_url_from_the_users_secret(render):
    docs = render(EXTERNAL_DB)
    assert not docs.all("StatefulSet")
    assert f"{FULL}-postgresql" not in docs.names("Secret")
    server = pod_spec(docs.get("Deployment", SERVER))
    assert [i["name"] for i in server["initContainers"]] == ["wait-for-migrations"]  # no PostgreSQL to wait for
    assert env_of(server["containers"][0])["PREFECT_API_DATABASE_CONNECTION_URL"] == {
        "secretKeyRef": {"name": "prefect-db", "key": "url"}
    }


def test_sqlite_database_lives_on_a_server_volume(render):
    docs = render(SQLITE)
    assert not docs.all("StatefulSet")
    # One process with its services owns the file: no replicas, services, Redis or Job.
    assert docs.names("Deployment") & {SERVICES, REDIS} == set()
    assert not [j for j in docs.all("Job") if "-migrate-" in j["metadata"]["name"]]
    assert docs.get("Deployment", SERVER)["spec"]["strategy"] == {"type": "Recreate"}
    server = pod_spec(docs.get("Deployment", SERVER))
    c = server["containers"][0]
    assert "--no-services" not in c["command"]
    (light,) = pod_spec(docs.get("Deployment", f"{FULL}-pool-light"))["containers"]
    assert "FANOUT_API_REPLICAS" not in env_of(light)
    assert env_of(c)["PREFECT_API_DATABASE_CONNECTION_URL"] == "sqlite+aiosqlite:////data/prefect.db"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    claim = {v["name"]: v for v in server["volumes"]}["data"]["persistentVolumeClaim"]["claimName"]
    assert claim in docs.names("PersistentVolumeClaim")


# --- pools ----------------------------------------------------------------------------


def test_custom_pools(render):
    docs = render(CUSTOM_POOLS)
    assert docs.names("Deployment") == {
        SERVER,
        SERVICES,
        REDIS,
        f"{FULL}-worker",
        REAPER,
        f"{FULL}-pool-light",
        f"{FULL}-pool-batch",
        STORE,
    }
    light = docs.get("Deployment", f"{FULL}-pool-light")
    assert light["spec"]["replicas"] == 5
    assert env_of(pod_spec(light)["containers"][0])["FANOUT_WORKER_LIMIT"] == "3"
    assert pod_spec(light)["terminationGracePeriodSeconds"] == 30
    batch = docs.get("Deployment", f"{FULL}-pool-batch")
    assert env_of(pod_spec(batch)["containers"][0])["FANOUT_POOL"] == "batch"
    assert env_of(pod_spec(batch)["containers"][0])["FANOUT_TASKS"] == "fanout_demo.tasks:process_chunk"
    # the demo's pools name their tasks in the chart's defaults
    assert env_of(pod_spec(light)["containers"][0])["FANOUT_TASKS"] == "fanout_demo.tasks:process_item"
    assert "FANOUT_WARM_PROCESS_POOL" not in env_of(pod_spec(light)["containers"][0])
    heavy = pod_spec(render().get("Deployment", f"{FULL}-pool-heavy"))["containers"][0]
    assert env_of(heavy)["FANOUT_TASKS"] == "fanout_demo.tasks:heavy_batch"
    assert env_of(heavy)["FANOUT_WARM_PROCESS_POOL"] == "auto"
    assert docs.get("PodDisruptionBudget", f"{FULL}-pool-batch")["spec"]["maxUnavailable"] == "50%"
    assert docs.names("PodDisruptionBudget") == {SERVER, f"{FULL}-pool-light", f"{FULL}-pool-batch"}


def test_scaled_pools(render):
    docs = render(SCALED)
    assert docs.get("Deployment", f"{FULL}-pool-light")["spec"]["replicas"] == 12
    assert docs.get("Deployment", f"{FULL}-pool-heavy")["spec"]["replicas"] == 0
    # Same with --set, the way `make scale` does it.
    docs = render(None, "--set", "pools.heavy.replicas=3")
    assert docs.get("Deployment", f"{FULL}-pool-heavy")["spec"]["replicas"] == 3


# --- the reaper -----------------------------------------------------------------------


def test_reaper_is_one_pod_that_reaches_the_prefect_api_only(render):
    docs = render()
    dep = docs.get("Deployment", REAPER)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_spec(dep)
    (c,) = spec["containers"]
    assert c["command"] == [
        "python", "-m", "fanout.reaper", "--interval", "10", "--stale-after", "30", "--max-deliveries", "3",
        "--fail-unserved-after", "600", "--storage-ttl", "21600",
    ]  # fmt: skip
    # Its own ServiceAccount without a token, and no Role bound to it.
    assert spec["serviceAccountName"] == REAPER
    assert spec["automountServiceAccountToken"] is False
    assert docs.get("ServiceAccount", REAPER)["automountServiceAccountToken"] is False
    assert REAPER not in {s["name"] for b in docs.all("RoleBinding") for s in b["subjects"]}
    # The task workers' way to the API (URL and credentials) and to the storage, whose
    # old objects it deletes (it never reads them).
    light = env_of(pod_spec(docs.get("Deployment", f"{FULL}-pool-light"))["containers"][0])
    api = {k: v for k, v in env_of(c).items() if k.startswith("PREFECT_")}
    assert api == {"PREFECT_API_URL": API_URL, "PREFECT_API_AUTH_STRING": AUTH_REF, "PREFECT_PLUGINS_ENABLED": "true"}
    assert {k: light[k] for k in api} == api
    assert env_of(c).keys() - api.keys() == {
        "FANOUT_METRICS_HOST",
        "FANOUT_METRICS_PORT",
        "FANOUT_POOLS",
        "FANOUT_STORAGE",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    for name in ("FANOUT_STORAGE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env_of(c)[name] == light[name]
    assert [v["name"] for v in spec["volumes"]] == ["tmp"]  # the object store is reached over S3
    assert c["resources"] == {
        "requests": {"cpu": "50m", "memory": "192Mi", "ephemeral-storage": "128Mi"},
        "limits": {"memory": "384Mi", "ephemeral-storage": "2Gi"},
    }
    assert "nodeSelector" not in spec and "tolerations" not in spec


def test_reaper_settings_come_from_values(render):
    toleration = {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
    values = {
        "reaper": {
            "interval": 5,
            "staleAfter": 60,
            "maxDeliveries": 7,
            "failUnservedAfter": 120,
            "storageTtl": 0,
            "resources": {"requests": {"cpu": "20m"}},
            "nodeSelector": {"tier": "system"},
            "tolerations": [toleration],
        },
        # A slower heartbeat is fine as long as staleAfter is 3 of them.
        "pools": {"light": {"extraEnv": [{"name": "FANOUT_HEARTBEAT_SECONDS", "value": "20"}]}},
    }
    spec = pod_spec(render(values).get("Deployment", REAPER))
    assert spec["containers"][0]["command"][3:] == [
        "--interval", "5", "--stale-after", "60", "--max-deliveries", "7", "--fail-unserved-after", "120",
        "--storage-ttl", "0",
    ]  # fmt: skip
    assert spec["containers"][0]["resources"]["requests"] == {
        "cpu": "20m", "memory": "192Mi", "ephemeral-storage": "128Mi"
    }  # merged by Helm  # fmt: skip
    assert spec["nodeSelector"] == {"tier": "system"}
    assert spec["tolerations"] == [toleration]


def test_reaper_disabled_removes_it(render):
    # Its settings are not checked either when it does not run.
    docs = render({"reaper": {"enabled": False, "staleAfter": 5}})
    assert REAPER not in docs.names("Deployment")
    assert REAPER not in docs.names("ServiceAccount")


# --- metrics --------------------------------------------------------------------------


def test_metrics_services_reach_the_reaper_and_every_task_worker(render):
    """The reaper's Service and the headless Service of the task workers both serve
    `/metrics` on a port named `metrics`, and select exactly the pods that listen."""
    docs = render()
    reaper = pod_spec(docs.get("Deployment", REAPER))["containers"][0]
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in reaper["ports"]
    assert env_of(reaper)["FANOUT_METRICS_HOST"] == "0.0.0.0"
    # the pools' tasks, so that a pool's backlog counts while it has no pod
    assert json.loads(env_of(reaper)["FANOUT_POOLS"]) == {
        "light": ["fanout_demo.tasks:process_item"], "heavy": ["fanout_demo.tasks:heavy_batch"]
    }  # fmt: skip
    svc = docs.get("Service", REAPER)
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    workers = docs.get("Service", f"{FULL}-task-workers")
    assert workers["spec"]["clusterIP"] == "None"
    assert workers["spec"]["ports"][0] == {"name": "metrics", "port": 8080, "targetPort": "health", "protocol": "TCP"}
    selected = [
        d["metadata"]["name"]
        for d in docs.all("Deployment")
        if workers["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert sorted(selected) == [f"{FULL}-pool-heavy", f"{FULL}-pool-light"]
    for name in selected:
        ports = pod_spec(docs.get("Deployment", name))["containers"][0]["ports"]
        assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in ports
    assert (
        svc["spec"]["selector"].items()
        <= docs.get("Deployment", REAPER)["spec"]["template"]["metadata"]["labels"].items()
    )
    assert not docs.all("ServiceMonitor")  # off by default


def test_service_monitor_only_where_its_crd_is_installed(render):
    values = {"metrics": {"serviceMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "kps"}}}}
    assert not render(values).all("ServiceMonitor")  # no CRD: skipped, the install still works
    (sm,) = render(values, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor").all("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    docs = render()
    matched = {
        d["metadata"]["name"]
        for d in docs.all("Service")
        if sm["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    }
    assert matched == {REAPER, f"{FULL}-task-workers"}


def test_metrics_disabled_keeps_the_reaper_on_its_loopback(render):
    docs = render({"metrics": {"enabled": False}})
    assert REAPER not in docs.names("Service") and f"{FULL}-task-workers" not in docs.names("Service")
    assert env_of(pod_spec(docs.get("Deployment", REAPER))["containers"][0])["FANOUT_METRICS_HOST"] == "127.0.0.1"


def exported_metric_names() -> set[str]:
    """Every sample name our two metric sources expose (rendered from the code itself)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fanout.liveness import Heartbeat
    from fanout.metrics import Load, PoolMetrics, WorkerMetrics, pool_registry

    worker = WorkerMetrics("p", 1, lambda: 0)
    worker.finished("t-abc", "completed", 0.1)
    pools = PoolMetrics()
    load = Load()
    load.add_workers([Heartbeat("c", "p", frozenset({"t-abc"}), frozenset(), 1, None, 0.0)])
    load.scheduled["t-abc"] = 1
    pools.update(load)
    pools.recovered("t-abc", "redelivered")
    texts = [worker.render().decode(), generate_latest(pool_registry(pools)).decode()]
    return {s.name for t in texts for f in text_string_to_metric_families(t) for s in f.samples}


def test_grafana_dashboard_queries_only_metrics_we_export(render):
    docs = render({"metrics": {"grafanaDashboard": {"enabled": True}}})
    cm = docs.get("ConfigMap", f"{FULL}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    dashboard = json.loads(cm["data"]["fanout-pools.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(fanout_[a-z_]+)", e)}
    assert used <= exported_metric_names(), used - exported_metric_names()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for what in ("backlog", "throughput", "failures", "redelivered", "replicas"):
        assert what in titles, what
    assert not render().all("ConfigMap") or f"{FULL}-dashboard" not in render().names("ConfigMap")  # off by default


# --- autoscaling (KEDA) ------------------------------------------------------------------

KEDA = ("--api-versions", "keda.sh/v1alpha1/ScaledObject")
AUTO = {"pools": {"light": {"autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 4}}}}


def test_an_autoscaled_pool_gets_a_keda_scaled_object_on_its_demand(render, openapi):
    docs = render(AUTO, *KEDA)
    (so,) = docs.all("ScaledObject")
    assert openapi.errors(so) == []  # KEDA's own CRD schema, of the version `make e2e` installs
    wrong = json.loads(json.dumps(so))
    wrong["spec"]["minReplicas"] = 0  # KEDA calls it minReplicaCount: the check must be able to fail
    assert any("minReplicas" in e for e in openapi.errors(wrong)), openapi.errors(wrong)
    light = docs.get("Deployment", f"{FULL}-pool-light")
    assert "replicas" not in light["spec"]  # KEDA owns it: an upgrade must not reset it
    assert docs.get("Deployment", f"{FULL}-pool-heavy")["spec"]["replicas"] == 1  # not autoscaled
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"name": f"{FULL}-pool-light"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 4)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    # the reaper's Service, on the port it serves /metrics on, and this pool's demand
    assert meta["url"] == f"http://{REAPER}.{NAMESPACE}.svc:8080/metrics"
    assert docs.get("Service", REAPER)["spec"]["ports"][0]["port"] == 8080
    assert meta["format"] == "prometheus" and meta["valueLocation"] == 'fanout_pool_demand{pool="light"}'
    assert meta["targetValue"] == "8"  # default: the pool's limit, one pod per `limit` runs
    assert meta["activationTargetValue"] == "0"  # from zero as soon as one run waits
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Percent", "value": 25, "periodSeconds": 15}]
    assert down["stabilizationWindowSeconds"] == 60 and spec["cooldownPeriod"] == 60


def test_autoscaling_settings_come_from_values(render):
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 9, "targetRunsPerReplica": 3, "pollingInterval": 2,
            "cooldownPeriod": 30, "scaleDownStabilizationSeconds": 10, "scaleDownMaxPercent": 50}  # fmt: skip
    (so,) = render({"pools": {"light": {"autoscaling": auto}}}, *KEDA).all("ScaledObject")
    spec = so["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"], spec["cooldownPeriod"]) == (
        1, 9, 2, 30
    )  # fmt: skip
    assert spec["triggers"][0]["metadata"]["targetValue"] == "3"
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down == {
        "stabilizationWindowSeconds": 10,
        "policies": [{"type": "Percent", "value": 50, "periodSeconds": 15}],
    }


def test_autoscaling_without_keda_installed_fails_naming_the_pool_and_keda(render_error):
    err = render_error(AUTO)
    assert "pools.light.autoscaling.enabled needs KEDA" in err and "keda.sh/v1alpha1 ScaledObject" in err


@pytest.mark.parametrize(
    ("auto", "message"),
    [
        (
            {"minReplicas": 5, "maxReplicas": 2},
            "pools.light.autoscaling.minReplicas (5) must not exceed maxReplicas (2)",
        ),
        ({"minReplicas": -1}, "/pools/light/autoscaling/minReplicas"),
        ({"maxReplicas": 0}, "/pools/light/autoscaling/maxReplicas"),
        ({"targetRunsPerReplica": 0}, "/pools/light/autoscaling/targetRunsPerReplica"),
        ({"scaleDownMaxPercent": 101}, "/pools/light/autoscaling/scaleDownMaxPercent"),
        ({"max": 3}, "'max' not allowed"),
    ],
)
def test_bad_autoscaling_values_are_named(auto, message, render_error):
    assert message in render_error({"pools": {"light": {"autoscaling": {"enabled": True, **auto}}}}, *KEDA)


def test_autoscaling_needs_the_reapers_metrics(render_error):
    err = render_error({**AUTO, "metrics": {"enabled": False}}, *KEDA)
    assert "pools.light.autoscaling needs reaper.enabled and metrics.enabled" in err


# --- storage --------------------------------------------------------------------------


def test_s3_storage_uses_a_block_and_credentials_from_a_secret(render):
    docs = render(S3)
    assert docs.names("PersistentVolumeClaim") == {REDIS}
    for name in (f"{FULL}-pool-light", f"{FULL}-pool-heavy"):
        spec = pod_spec(docs.get("Deployment", name))
        env = env_of(spec["containers"][0])
        assert env["FANOUT_STORAGE"] == "s3-bucket/fanout"
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert "shared" not in {v["name"] for v in spec["volumes"]}
    setup = json.loads(docs.get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])
    assert setup["s3"]["bucket"] == "results" and setup["s3"]["endpointUrl"] == "http://minio:9000"
    flow_env = {e["name"]: e for e in setup["env"]}
    assert flow_env["FANOUT_STORAGE"]["value"] == "s3-bucket/fanout"
    # Prefect's default storage follows FANOUT_STORAGE through our plugin, in every pod.
    assert flow_env["PREFECT_PLUGINS_ENABLED"]["value"] == "true"
    assert env["PREFECT_PLUGINS_ENABLED"] == "true"
    assert "AWS_SECRET_ACCESS_KEY" in flow_env
    assert [v["name"] for v in setup["volumes"]] == ["tmp"]


def test_the_bundled_object_store_serves_every_pod_over_s3_from_one_rwo_claim(render):
    """storage.type objectStore: versitygw on a ReadWriteOnce claim that only it mounts;
    every other pod reaches it over S3 (so they may run on any node), with the generated
    keys from its Secret; the setup hook creates the bucket and saves the block."""
    docs = render(OBJECT_STORE)
    name = f"{FULL}-object-store"
    (claim,) = [c for c in docs.all("PersistentVolumeClaim") if c["metadata"]["name"] != REDIS]
    assert claim["metadata"]["name"] == name and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    store = docs.get("Deployment", name)
    assert store["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_spec(store)
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    # the version the Makefile pins (make images builds it, make object-server installs it)
    assert c["image"] == f"versity/versitygw:{VERSITYGW_VERSION}"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert env_of(c)["ROOT_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": name, "key": "AWS_SECRET_ACCESS_KEY"}}
    assert c["readinessProbe"] != c["livenessProbe"]
    # a replaced pod serves on until every node stops sending it new connections
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    keys = docs.get("Secret", name)["data"]
    assert set(keys) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert docs.get("Service", name)["spec"]["ports"][0]["port"] == 7070
    claims = [
        (obj["metadata"]["name"], v["persistentVolumeClaim"]["claimName"])
        for obj in workloads(docs)
        for v in pod_spec(obj).get("volumes", [])
        if "persistentVolumeClaim" in v
    ]
    assert [c for c in claims if c[1] == name] == [(name, name)], claims
    for deployment in (f"{FULL}-pool-light", f"{FULL}-pool-heavy", f"{FULL}-reaper"):  # reaper: the TTL sweep
        env = env_of(pod_spec(docs.get("Deployment", deployment))["containers"][0])
        assert env["FANOUT_STORAGE"] == "s3-bucket/fanout", deployment
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": name, "key": "AWS_ACCESS_KEY_ID"}}
    setup = json.loads(docs.get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])
    assert setup["s3"] == {
        "bucket": "fanout",
        "folder": "fanout",
        "blockName": "fanout",
        "createBucket": True,
        "endpointUrl": f"http://{name}:7070",
    }
    secret = base64.b64decode(keys["AWS_SECRET_ACCESS_KEY"]).decode()
    assert len(secret) == 40 and secret not in json.dumps([d for d in docs if d["kind"] != "Secret"])


def test_hostpath_storage(render):
    docs = render(HOSTPATH)
    assert docs.names("PersistentVolumeClaim") == {REDIS}
    spec = pod_spec(docs.get("Deployment", f"{FULL}-pool-light"))
    assert {v["name"]: v for v in spec["volumes"]}["shared"]["hostPath"] == {"path": "/mnt/fanout", "type": "Directory"}


def test_pvc_storage_creates_one_shared_claim_every_pool_mounts(render):
    docs = render({"storage": {"type": "pvc", "pvc": {"accessMode": "ReadWriteMany"}}})
    (claim,) = [c for c in docs.all("PersistentVolumeClaim") if c["metadata"]["name"] != REDIS]
    assert claim["metadata"]["name"] == f"{FULL}-shared" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pool in ("light", "heavy"):
        spec = pod_spec(docs.get("Deployment", f"{FULL}-pool-{pool}"))
        assert {v["name"]: v for v in spec["volumes"]}["shared"]["persistentVolumeClaim"] == {
            "claimName": f"{FULL}-shared"
        }
        assert env_of(spec["containers"][0])["FANOUT_STORAGE"] == "/shared/fanout"


def test_existing_claim_is_used_and_not_created(render):
    docs = render({"storage": {"type": "pvc", "pvc": {"existingClaim": "team-share"}}})
    assert docs.names("PersistentVolumeClaim") == {REDIS}
    spec = pod_spec(docs.get("Deployment", f"{FULL}-pool-light"))
    assert {v["name"]: v for v in spec["volumes"]}["shared"]["persistentVolumeClaim"] == {"claimName": "team-share"}


def test_kind_values_share_one_directory_and_keep_light_work_off_the_large_node(render):
    """ci/kind-values.yaml: every kind node mounts the same host directory at /shared, so
    pods on any node share storage; only heavy work goes to the large (tainted) node."""
    docs = render(KIND)
    for obj in workloads(docs):
        spec = pod_spec(obj)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        if "shared" in volumes:
            assert volumes["shared"]["hostPath"]["path"] == "/shared", obj["metadata"]["name"]
    light = pod_spec(docs.get("Deployment", f"{FULL}-pool-light"))
    heavy = pod_spec(docs.get("Deployment", f"{FULL}-pool-heavy"))
    assert not light.get("nodeSelector") and not light.get("tolerations")
    assert heavy["nodeSelector"] == {"fanout.io/pool": "large"}
    flow = json.loads(docs.get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])["jobVariables"]
    assert flow["node_selector"] == {"fanout.io/pool": "large"}
    assert flow["tolerations"] == heavy["tolerations"]


# --- the setup hook and the work pool's base job template -------------------------------


def test_setup_hook_runs_the_setup_script_with_the_rendered_config(render):
    docs = render()
    cm = docs.get("ConfigMap", f"{FULL}-setup")
    assert cm["data"]["setup.py"] == (CHART / "files" / "setup.py").read_text()
    job = docs.get("Job", f"{FULL}-setup")
    (c,) = pod_spec(job)["containers"]
    assert c["command"] == ["python", "/etc/fanout/setup.py"]
    assert env_of(c)["PREFECT_API_URL"] == API_URL
    cfg = json.loads(cm["data"]["setup.json"])
    assert cfg["workPool"] == "kubernetes"
    assert cfg["image"] == c["image"] == "fanout/runtime:0.1.0"
    assert cfg["jobVariables"]["namespace"] == NAMESPACE
    assert cfg["jobVariables"]["cpu_request"] == "250m"


def _setup_module():
    sys.path.insert(0, str(CHART / "files"))
    try:
        import setup as setup_script
    finally:
        sys.path.pop(0)
    return setup_script


@pytest.mark.parametrize("name", ["defaults", "s3", "object-store", "kind"])
def test_base_job_template_makes_valid_flow_run_jobs(name, render, openapi):
    """Feed the chart's template through prefect-kubernetes the way its worker does, with
    per-run job variables for a big pod, and validate the Job it would create."""
    pytest.importorskip("prefect_kubernetes")
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    cfg = json.loads(render(VALUE_SETS[name]).get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])
    template = _setup_module().base_job_template(cfg, KubernetesWorker.get_default_base_job_template())
    big = {"cpu_request": "2", "cpu_limit": "2", "memory_request": "2Gi", "memory_limit": "2Gi"}
    # A stand-in client: the template has no block or variable references to resolve, and
    # without one Prefect would start a temporary server to answer nothing.
    job_config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, big, client=object()))
    job_config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="big-run"))
    job = job_config.job_manifest
    assert not openapi.errors(job), openapi.errors(job)
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    assert c["image"] == "fanout/runtime:0.1.0"
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["completions"] == 1 and "completions" not in spec
    env = env_of(c)
    assert env["FANOUT_STORAGE"] == cfg["env"][0]["value"]
    assert "PREFECT__FLOW_RUN_ID" in env  # prefect-kubernetes still adds its own
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False
    assert spec.get("nodeSelector", {}) == cfg["jobVariables"]["node_selector"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}
    if name == "kind":  # hostPath; the others reach their storage over S3
        assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]


def test_base_job_template_defaults_come_from_values(render):
    pytest.importorskip("prefect_kubernetes")
    from prefect_kubernetes.worker import KubernetesWorker

    values = {"flowRuns": {"cpuLimit": "3", "memoryRequest": "3Gi", "nodeSelector": {"fanout.io/pool": "large"}}}
    cfg = json.loads(render(values).get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])
    props = _setup_module().base_job_template(cfg, KubernetesWorker.get_default_base_job_template())["variables"][
        "properties"
    ]
    assert props["cpu_limit"]["default"] == "3"
    assert props["memory_request"]["default"] == "3Gi"
    assert props["node_selector"]["default"] == {"fanout.io/pool": "large"}
    assert props["namespace"]["default"] == NAMESPACE


# --- deployments ------------------------------------------------------------------------


def _setup_cfg(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return json.loads(Rendered(docs).get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])


def _template_of(cfg: dict[str, Any]) -> dict[str, Any]:
    from prefect_kubernetes.worker import KubernetesWorker

    return _setup_module().base_job_template(cfg, KubernetesWorker.get_default_base_job_template())


def test_the_default_deployment_is_the_demos_crunch(render):
    """With default values the hook registers exactly what it did before: `crunch` from the
    runtime image, with the work pool's defaults for its pods."""
    pytest.importorskip("prefect_kubernetes")
    cfg = _setup_cfg(render())
    assert cfg["deployments"] == [CRUNCH]
    assert _setup_module().deployment_entries(cfg, _template_of(cfg)) == [{**CRUNCH, "image": "fanout/runtime:0.1.0"}]
    assert _setup_cfg(render({"deployments": []}))["deployments"] == []


def test_user_deployments_reach_the_setup_hook_with_their_image_and_job_variables(render, openapi):
    """Each entry of `deployments` reaches the hook; its job variables, merged over the work
    pool's defaults the way the Kubernetes worker merges them, make a valid Job: a 2-CPU pod
    on the large node, in the entry's own image."""
    pytest.importorskip("prefect_kubernetes")
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    cfg = _setup_cfg(render(USER_DEPLOYMENTS))
    assert cfg["deployments"] == USER_DEPLOYMENTS["deployments"]
    template = _template_of(cfg)
    entries = {e["name"]: e for e in _setup_module().deployment_entries(cfg, template)}
    assert entries["crunch"]["image"] == entries["script"]["image"] == "fanout/runtime:0.1.0"
    user = entries["heavy-user"]
    assert user["image"] == "myrepo/mywork:1"
    values = {**user["jobVariables"], "image": user["image"]}
    job_config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=object())
    )
    job_config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="user-run"))
    job = job_config.job_manifest
    assert not openapi.errors(job), openapi.errors(job)
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == "myrepo/mywork:1"
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "1Gi"}}
    assert spec["nodeSelector"] == LARGE and spec["tolerations"] == [LARGE_TOLERATION]
    assert env_of(c)["MYWORK_MODE"] == "fast"
    assert env_of(c)["PREFECT_PLUGINS_ENABLED"] == "true"  # the release's own environment stays
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False


def test_setup_hook_names_a_job_variable_the_work_pool_does_not_know(render):
    pytest.importorskip("prefect_kubernetes")
    cfg = _setup_cfg(render())
    cfg["deployments"] = [{"name": "x", "entrypoint": "a.b:c", "jobVariables": {"cpu_limt": "2"}}]
    with pytest.raises(SystemExit, match=r"deployments\[0\] \(x\): job variable\(s\) cpu_limt not in"):
        _setup_module().deployment_entries(cfg, _template_of(cfg))


def test_flow_run_jobs_read_the_auth_string_from_the_secret(render, openapi, monkeypatch):
    """What the Kubernetes worker does with its own PREFECT_API_AUTH_STRING: it copies it
    into every flow-run Job (in place of the template's entry) and, with the secret name
    and key the chart gives it, writes a secretKeyRef there instead of the literal. Runs
    prefect-kubernetes' own job preparation and creation, with only the Kubernetes API
    call replaced."""
    pytest.importorskip("prefect_kubernetes")
    import prefect_kubernetes.worker as k8s_worker
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    docs = render()
    cfg = json.loads(docs.get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])
    assert {"name": "PREFECT_API_AUTH_STRING", "valueFrom": AUTH_REF} in cfg["env"]
    worker_env = env_of(pod_spec(docs.get("Deployment", f"{FULL}-worker"))["containers"][0])
    for key, value in worker_env.items():
        if key.startswith("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_"):
            monkeypatch.setenv(key, value)
    created = []

    class FakeBatchV1Api:
        def __init__(self, api_client: object) -> None:
            pass

        async def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> None:
            created.append(body)

    monkeypatch.setattr(k8s_worker, "BatchV1Api", FakeBatchV1Api)
    template = _setup_module().base_job_template(cfg, k8s_worker.KubernetesWorker.get_default_base_job_template())
    literal = "admin:the-workers-own-copy"

    async def submit() -> None:
        with temporary_settings({PREFECT_API_AUTH_STRING: literal}):
            config = await k8s_worker.KubernetesWorkerJobConfiguration.from_template_and_values(
                template, {}, client=object()
            )
            config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="run"))
            await k8s_worker.KubernetesWorker(work_pool_name="kubernetes")._create_job(config, client=None)

    asyncio.run(submit())
    (job,) = created
    assert literal not in json.dumps(job)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "PREFECT_API_AUTH_STRING"] == [
        {"name": "PREFECT_API_AUTH_STRING", "valueFrom": AUTH_REF}
    ]
    assert not openapi.errors(job), openapi.errors(job)


# --- API auth -------------------------------------------------------------------------


def api_clients(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every container that talks to the Prefect API: all but the server's own (API replicas,
    services, migrations), PostgreSQL's, Redis's and the object store's."""
    return {
        f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}": c
        for obj in workloads(docs)
        if obj["metadata"]["name"] not in (SERVER, SERVICES, REDIS, f"{FULL}-postgresql", STORE)
        and "-migrate-" not in obj["metadata"]["name"]
        for c in pod_spec(obj)["containers"]
    }


def test_api_auth_is_on_by_default_with_a_generated_secret(render):
    docs = render()
    data = docs.get("Secret", AUTH_SECRET)["data"]
    user, _, password = base64.b64decode(data["auth-string"]).decode().partition(":")
    assert user == "admin" and len(password) == 32 and password.isalnum()
    (server,) = pod_spec(docs.get("Deployment", SERVER))["containers"]
    assert env_of(server)["PREFECT_SERVER_API_AUTH_STRING"] == AUTH_REF
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Prefect exempts GET /api/health and /api/ready from auth: the probes need no header.
        assert server[probe]["httpGet"]["path"] in ("/api/health", "/api/ready")
    clients = api_clients(docs)
    assert set(clients) == {
        f"Deployment/{FULL}-pool-light/worker",
        f"Deployment/{FULL}-pool-heavy/worker",
        f"Deployment/{FULL}-worker/worker",
        f"Deployment/{REAPER}/reaper",
        f"Job/{FULL}-setup/setup",
        f"Job/{FULL}-demo/fanout",
    }
    for what, c in clients.items():
        assert env_of(c).get("PREFECT_API_AUTH_STRING") == AUTH_REF, what
    worker = env_of(clients[f"Deployment/{FULL}-worker/worker"])
    assert worker["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"] == AUTH_SECRET
    assert worker["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"] == "auth-string"


@pytest.mark.parametrize("name", ["defaults", "s3", "object-store", "kind"])
def test_the_auth_string_is_only_in_its_secret(name, render):
    docs = render(VALUE_SETS[name])
    secret = docs.get("Secret", AUTH_SECRET)
    encoded = secret["data"]["auth-string"]
    password = base64.b64decode(encoded).decode().partition(":")[2]
    rest = json.dumps([d for d in docs if d is not secret])
    assert password not in rest and encoded not in rest
    cfg = json.loads(docs.get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])
    for env in [c.get("env", []) for obj in workloads(docs) for c in pod_spec(obj)["containers"]] + [cfg["env"]]:
        for e in env:
            if e["name"] in ("PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


def test_existing_auth_secret_is_used_and_not_created(render):
    docs = render(LOCKED_DOWN)
    assert AUTH_SECRET not in docs.names("Secret")
    ref = {"secretKeyRef": {"name": "team-auth", "key": "auth-string"}}
    (server,) = pod_spec(docs.get("Deployment", SERVER))["containers"]
    assert env_of(server)["PREFECT_SERVER_API_AUTH_STRING"] == ref
    clients = api_clients(docs)
    assert len(clients) == 6
    for what, c in clients.items():
        assert env_of(c)["PREFECT_API_AUTH_STRING"] == ref, what
    worker = env_of(clients[f"Deployment/{FULL}-worker/worker"])
    assert worker["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"] == "team-auth"
    cfg = json.loads(docs.get("ConfigMap", f"{FULL}-setup")["data"]["setup.json"])
    assert {"name": "PREFECT_API_AUTH_STRING", "valueFrom": ref} in cfg["env"]


def test_auth_disabled_removes_the_secret_and_every_reference(render):
    docs = render({"auth": {"enabled": False}})
    assert AUTH_SECRET not in docs.names("Secret")
    assert "AUTH_STRING" not in json.dumps(docs)
    reaper = env_of(pod_spec(docs.get("Deployment", REAPER))["containers"][0])
    assert {k: v for k, v in reaper.items() if k.startswith("PREFECT_API")} == {"PREFECT_API_URL": API_URL}


# --- network policy -------------------------------------------------------------------


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_network_policy_lets_only_the_server_reach_postgres_and_redis(render):
    docs = render({"networkPolicy": {"enabled": True}})
    policy = docs.get("NetworkPolicy", f"{FULL}-postgresql")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector, no ipBlock: this namespace only
    # Of every pod the release runs, the policy applies to PostgreSQL's only, and lets in
    # the server's only (the setup hook and everything else use the Prefect API, not the DB).
    pods = {obj["metadata"]["name"]: obj["spec"]["template"]["metadata"]["labels"] for obj in workloads(docs)}
    assert {n for n, labels in pods.items() if matches(spec["podSelector"]["matchLabels"], labels)} == {
        f"{FULL}-postgresql"
    }
    server_pods = {SERVER, SERVICES, *[n for n in pods if n.startswith(f"{FULL}-migrate-")]}
    assert {n for n, labels in pods.items() if matches(peer["podSelector"]["matchLabels"], labels)} == server_pods
    spec = docs.get("NetworkPolicy", REDIS)["spec"]
    assert {n for n, labels in pods.items() if matches(spec["podSelector"]["matchLabels"], labels)} == {REDIS}
    ((peer,),) = [r["from"] for r in spec["ingress"]]
    assert {n for n, labels in pods.items() if matches(peer["podSelector"]["matchLabels"], labels)} == server_pods


def test_network_policy_is_off_by_default_and_only_for_what_the_release_runs(render):
    assert not render().all("NetworkPolicy")
    # An external database: only Redis's policy.
    assert render({"networkPolicy": {"enabled": True}, **EXTERNAL_DB}).names("NetworkPolicy") == {REDIS}
    assert not render({"networkPolicy": {"enabled": True}, **SQLITE}).all("NetworkPolicy")


# --- the demo Job ---------------------------------------------------------------------


def test_demo_job_runs_the_fanout_with_the_worker_environment(render):
    docs = render({"demo": {"items": 777}})
    job = docs.get("Job", f"{FULL}-demo")
    (c,) = pod_spec(job)["containers"]
    assert c["command"][:5] == ["python", "-m", "fanout_demo.flow", "--items", "777"]
    extra = render(None, "--set", "demo.extraArgs={--heavy-cpus,2}").get("Job", f"{FULL}-demo")
    assert pod_spec(extra)["containers"][0]["command"][-2:] == ["--heavy-cpus", "2"]
    env = env_of(c)
    light_env = env_of(pod_spec(docs.get("Deployment", f"{FULL}-pool-light"))["containers"][0])
    for key in ("PREFECT_API_URL", "FANOUT_STORAGE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == light_env[key]
    shared = pod_spec(render({"storage": {"type": "pvc"}}).get("Job", f"{FULL}-demo"))["containers"][0]
    assert {"name": "shared", "mountPath": "/shared"} in shared["volumeMounts"]


# --- lint and rejected values ---------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint(name, helm, tmp_path):
    cmd = [helm, "lint", "--strict", str(CHART), "--kube-version", K8S_VERSION]
    if VALUE_SETS[name]:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(VALUE_SETS[name]))
        cmd += ["-f", str(tmp_path / "v.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


BAD_VALUES = [
    ({"pools": {"light": {"replicas": -1}}}, "/pools/light/replicas"),
    ({"pools": {"light": {"replica": 2}}}, "'replica' not allowed"),
    ({"pools": {"light": {"limit": 0}}}, "/pools/light/limit"),
    ({"pools": {"Heavy_Pool": {"replicas": 1}}}, "Heavy_Pool"),
    ({"pools": {"x" * 31: {"replicas": 1}}}, "x" * 31),
    ({"image": {"tag": ""}}, "/image/tag"),
    ({"image": {"tag": None}}, "tag"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"database": {"type": "mysql"}}, "/database/type"),
    ({"database": {"type": "external"}}, "database.external.existingSecret is required"),
    ({"database": {"postgres": {"password": "p@ss word"}}}, "/database/postgres/password"),
    ({"storage": {"type": "s3"}}, "storage.s3.bucket is required"),
    ({"storage": {"type": "s3", "s3": {"bucket": "b"}}}, "storage.s3.existingSecret is required"),
    ({"storage": {"type": "nfs"}}, "/storage/type"),
    ({"server": {"service": {"port": 0}}}, "/server/service/port"),
    ({"unknownTopLevel": 1}, "'unknownTopLevel' not allowed"),
    ({"reaper": {"interval": 0}}, "/reaper/interval"),
    ({"reaper": {"staleAfter": 0}}, "/reaper/staleAfter"),
    ({"reaper": {"maxDeliveries": 0}}, "/reaper/maxDeliveries"),
    ({"reaper": {"failUnservedAfter": -1}}, "/reaper/failUnservedAfter"),
    ({"reaper": {"replicas": 2}}, "'replicas' not allowed"),
    ({"reaper": {"staleAfter": 10}}, "reaper.staleAfter must be at least 3 times the workers' heartbeat"),
    (
        {"pools": {"heavy": {"extraEnv": [{"name": "FANOUT_HEARTBEAT_SECONDS", "value": "20"}]}}},
        "(FANOUT_HEARTBEAT_SECONDS, 20s): at least 60, got 30",
    ),
    ({"auth": {"enabled": "yes"}}, "/auth/enabled"),
    ({"auth": {"secretName": "x"}}, "'secretName' not allowed"),
    ({"networkPolicy": {"enabled": 1}}, "/networkPolicy/enabled"),
    ({"metrics": {"serviceMonitor": {"interval": "15"}}}, "/metrics/serviceMonitor/interval"),
    ({"metrics": {"port": 9090}}, "'port' not allowed"),
    ({"pools": {"bogus": {"replicas": 1}}}, "pools.bogus.tasks is required"),
    ({"pools": {"heavy": {"warmProcessPool": "lots"}}}, "/pools/heavy/warmProcessPool"),
    ({"pools": {"mine": {"tasks": ["not a task"]}}}, "/pools/mine/tasks/0"),
    ({"imagePools": ["light"]}, "'imagePools' not allowed"),
    ({"deployments": [{"name": "user"}]}, "at '/deployments/0': missing property 'entrypoint'"),
    ({"deployments": [{"entrypoint": "a.b:c"}]}, "at '/deployments/0': missing property 'name'"),
    ({"deployments": [{"name": "u", "entrypoint": "a.b.c"}]}, "/deployments/0/entrypoint"),
    ({"deployments": [{"name": "u", "entrypoint": "flows/x.py:f"}]}, "/deployments/0/entrypoint"),
    ({"deployments": [{"name": "a/b", "entrypoint": "a.b:c"}]}, "/deployments/0/name"),
    ({"deployments": [{"name": "u", "entrypoint": "a.b:c", "cpus": 2}]}, "'cpus' not allowed"),
    (
        {"deployments": [{"name": "u", "entrypoint": "a.b:c", "jobVariables": {"cpuLimit": "2"}}]},
        "'cpuLimit' not allowed",
    ),
    (
        {"deployments": [{"name": "u", "entrypoint": "a.b:c", "jobVariables": {"cpu_limit": 2}}]},
        "/deployments/0/jobVariables/cpu_limit",
    ),
    ({"deployments": [{"name": "u", "entrypoint": "a.b:c", "jobVariables": {"image": "x:1"}}]}, "'image' not allowed"),
    (
        {"deployments": [{"name": "u", "entrypoint": "a.b:c", "jobVariables": {"namespace": "kube-system"}}]},
        "'namespace' not allowed",
    ),
    ({"deployments": {"crunch": {"entrypoint": "a.b:c"}}}, "/deployments"),
    ({"deployments": [CRUNCH, CRUNCH]}, 'deployments[1].name "crunch" is used more than once'),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_bad_values_are_rejected_naming_the_value(values, message, render_error):
    assert message in render_error(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pools": {"light": {"replicas": -1}}}, "pools.light.replicas must be >= 0"),
        ({"pools": {"light": {"replica": 2}}}, "pools.light.replica is not a pool setting"),
        ({"pools": {"Heavy_Pool": {"replicas": 1}}}, "pools.Heavy_Pool: a pool name must be"),
        ({"image": {"tag": ""}}, "image.tag is required"),
        ({"reaper": {"interval": 0}}, "reaper.interval must be >= 1"),
        ({"reaper": {"maxDeliveries": 0}}, "reaper.maxDeliveries must be >= 1"),
        ({"reaper": {"staleAfter": 14}}, "reaper.staleAfter must be at least 3 times"),
        ({"pools": {"bogus": {"replicas": 1}}}, "pools.bogus.tasks is required"),
        ({"deployments": [{"entrypoint": "a.b:c"}]}, "deployments[0].name is required"),
        ({"deployments": [{"name": "u"}]}, 'deployments[0] (u): entrypoint "" must be package.module:flow'),
        ({"deployments": [{"name": "u", "entrypoint": "a.b.c"}]}, 'entrypoint "a.b.c" must be'),
        ({"deployments": [{"name": "u", "entrypoint": "a.b:c", "cpus": 2}]}, "deployments[0].cpus is not a"),
        ({"deployments": ["crunch"]}, "deployments[0] must be a mapping"),
    ],
)
def test_template_validation_also_names_the_value_without_the_schema(values, message, render_error):
    assert message in render_error(values, "--skip-schema-validation")


def test_server_settings_match_the_local_stack(render):
    """The chart's server runs with the same Prefect settings as `make run` and `make bench`
    measure (`fanout.local.SERVER_SETTINGS`), and a user's value reaches the server."""
    env = env_of(_server_container(render()))
    assert {k: env.get(k) for k in SERVER_SETTINGS} == SERVER_SETTINGS
    triggers_off = {"server": {"settings": {"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false"}}}
    (c,) = pod_spec(render(triggers_off).get("Deployment", SERVER))["containers"]
    assert env_of(c)["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] == "false"
    assert env_of(c)["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"] == "20"


def test_server_settings_must_be_prefect_strings(render_error):
    assert "'LOG_LEVEL' does not match pattern '^PREFECT_" in render_error({"server": {"settings": {"LOG_LEVEL": "x"}}})
    assert "/server/settings/PREFECT_X" in render_error({"server": {"settings": {"PREFECT_X": 5}}})


def test_chart_defaults_are_the_codes_defaults():
    """fanout.settings holds every default; the chart's must be the same, not kept in step by hand."""
    values = yaml.safe_load((Path(CHART) / "values.yaml").read_text())
    reaper = values["reaper"]
    assert reaper["interval"] == settings.REAPER_INTERVAL
    assert reaper["staleAfter"] == settings.STALE_AFTER
    assert reaper["maxDeliveries"] == settings.MAX_DELIVERIES
    assert reaper["failUnservedAfter"] == settings.FAIL_UNSERVED_AFTER
    assert reaper["storageTtl"] == settings.STORAGE_TTL
    assert reaper["staleAfter"] >= 3 * settings.HEARTBEAT_SECONDS
