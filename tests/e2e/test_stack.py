"""The whole stack on the kind cluster: `helm install` of charts/fanout, fan-outs through the
task-worker pods, scaling and disruption mid-run, a heavy subflow in a 2-CPU pod, RBAC, the
user's own code (a pool, a deployment of their CPU-heavy flow, their fan-out in the Prefect
UI in headless Chromium), upgrade, uninstall and bad values.

One release serves the tests of this module in order (installing it takes minutes on our
2-core machines). The runtime image must be built and loaded into the cluster already:
`make e2e` does that and passes its tag in $FANOUT_RUNTIME_IMAGE.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_browser import (
    ARTIFACTS,
    free_port,
    headless_chromium,
    log_in_to_prefect_ui,
    port_forward,
    screenshot,
    task_runs_of_flow_run,
)
from e2e_kube import BIN_DIR, CLUSTER_NAME, REPO, Cluster, build_image, eventually, scaled

from fanout_demo.workload import checksum_item

HELM = os.environ.get("HELM", str(BIN_DIR / "helm"))
CHART = REPO / "charts" / "fanout"
KIND_VALUES = CHART / "ci" / "kind-values.yaml"
RELEASE = "fanout"
LIGHT = f"{RELEASE}-pool-light"


def _runtime_image() -> tuple[str, str]:
    image = os.environ.get("FANOUT_RUNTIME_IMAGE", "")
    if ":" not in image:
        pytest.fail("set FANOUT_RUNTIME_IMAGE to the loaded runtime image (`make e2e` does)", pytrace=False)
    repo, tag = image.rsplit(":", 1)
    return repo, tag


@dataclass
class Stack:
    cluster: Cluster
    namespace: str
    image: tuple[str, str]
    # Set once the release runs the user's image (user_release): its image, and the local
    # port the browser reaches the server on (server.uiApiUrl names it).
    user: tuple[str, str] | None = None
    ui_port: int = 0
    # More values on top of the kind values (`-f file`, `--set k=v`), for a release of its own.
    values: tuple[str, ...] = ()

    def helm(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        cmd = [HELM, "--kubeconfig", self.cluster.kubeconfig, "-n", self.namespace, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(timeout))
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
        return result

    def image_args(self) -> list[str]:
        return ["--set", f"image.repository={self.image[0]}", "--set", f"image.tag={self.image[1]}"]

    def k(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.namespace, *args, **kw)

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return self.cluster.pods(self.namespace, selector)

    def ready_pods(self, selector: str) -> list[str]:
        return [
            p["metadata"]["name"]
            for p in self.pods(selector)
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]

    def scale(self, deployment: str, replicas: int) -> None:
        self.k("scale", f"deployment/{deployment}", f"--replicas={replicas}")

    def wait_rollout(self, deployment: str, timeout: float = 600) -> None:
        self.k(
            "rollout", "status", f"deployment/{deployment}", f"--timeout={int(scaled(timeout))}s", timeout=timeout + 30
        )

    def progress(self, job: str) -> tuple[int, int]:
        """(items done, task runs running) from the fan-out job's own latest progress line."""
        out = self.k("logs", f"job/{job}", "--tail=30", check=False).stdout
        done = running = 0
        for line in out.splitlines():
            # fanout.fan_out's progress line: "process_item: 5/240 done (0 failed); task runs waiting: 3 running"
            if m := re.search(r"process_item: (\d+)/\d+ done \(\d+ failed\); task runs waiting: (.*)$", line):
                done = int(m.group(1))
                r = re.search(r"(\d+) running", m.group(2))
                running = int(r.group(1)) if r else 0
        return done, running

    def wait_busy(self, job: str, done: int = 5, running: int = 6) -> None:
        """Until the job has finished `done` items and has `running` runs in flight."""

        def busy() -> bool:
            d, r = self.progress(job)
            return d >= done and r >= running

        eventually(busy, timeout=300, interval=1, message=f"{job} under way ({done}+ done, {running}+ running)")

    # --- fan-outs as Jobs, from the chart's own demo Job (same env, volumes, security) ---

    def start_fanout(self, *args: str) -> str:
        rendered = self.helm(
            "template", RELEASE, str(CHART), "--kube-version", os.environ.get("K8S_VERSION", "v1.33.13"),
            "-f", str(KIND_VALUES), *self.values, *self.image_args(), "--show-only", "templates/tests/demo.yaml",
        ).stdout  # fmt: skip
        job = yaml.safe_load(rendered)
        job = copy.deepcopy(job)
        name = f"fanout-e2e-{uuid.uuid4().hex[:6]}"
        job["metadata"]["name"] = name
        job["metadata"].pop("annotations", None)
        container = job["spec"]["template"]["spec"]["containers"][0]
        container["command"] = ["python", "-m", "fanout_demo.flow", "--json", "-", "--timeout", "1200", *args]
        self.k("create", "-f", "-", input=json.dumps(job))
        return name

    def wait_fanout(self, job: str, timeout: float = 1200) -> dict[str, Any]:
        def finished() -> bool:
            status = self.cluster.json("-n", self.namespace, "get", "job", job).get("status", {})
            return bool(status.get("succeeded") or status.get("failed"))

        eventually(finished, timeout=timeout, interval=3, message=f"fan-out job {job} finishes")
        logs = self.k("logs", f"job/{job}", timeout=120).stdout
        for line in logs.splitlines():
            if line.startswith("FANOUT-SUMMARY "):
                return json.loads(line.removeprefix("FANOUT-SUMMARY "))
        raise AssertionError(f"job {job} printed no summary:\n{logs[-4000:]}")


@contextlib.contextmanager
def installed(
    cluster: Cluster,
    request: pytest.FixtureRequest,
    prefix: str,
    values: tuple[str, ...] = (),
    before: Callable[[Stack], None] | None = None,
) -> Iterator[Stack]:
    """The chart installed (kind values, then `values`) into a new namespace `<prefix>-xxxxx`
    until every pod is ready (`before(stack)` runs first, in that namespace); uninstalled
    and the namespace deleted afterwards, its state printed first if a test failed."""
    ns = f"{prefix}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", ns, "fanout.io/e2e=true")
    s = Stack(cluster, ns, _runtime_image(), values=values)
    failed = False
    try:
        if before:
            before(s)
        s.helm(
            "install", RELEASE, str(CHART), "-f", str(KIND_VALUES), *values, *s.image_args(),
            "--wait", "--wait-for-jobs", "--timeout", f"{int(scaled(900))}s", timeout=960,
        )  # fmt: skip
        yield s
        failed = request.session.testsfailed > 0
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            print(f"\n===== state of {ns} (a test failed) =====\n{cluster.dump(ns)}")
        s.helm("uninstall", RELEASE, "--wait", "--timeout", "300s", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def stack(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Stack]:
    with installed(cluster, request, "e2e-stack") as s:
        yield s


def _items_exactly_once(summary: dict[str, Any], n: int) -> None:
    items = [r["item"] for r in summary["results"]]
    assert summary["failed"] == {}, summary["failed"]
    assert sorted(items) == list(range(n)), "every item exactly once"


def _pod_of(worker_id: str) -> str:
    return worker_id.rsplit("-", 1)[0]  # "<pod name>-<pid>"


# --- install and fan out ----------------------------------------------------------------


def test_helm_install_brings_every_pod_ready(stack: Stack) -> None:
    pods = stack.pods(f"app.kubernetes.io/instance={RELEASE}")
    running = [p for p in pods if p["status"]["phase"] == "Running"]
    assert running, "no pods"
    for p in running:
        name = p["metadata"]["name"]
        assert all(c["ready"] for c in p["status"]["containerStatuses"]), f"{name} not ready"
    assert len(stack.ready_pods("fanout.io/pool=light")) == 3
    assert len(stack.ready_pods("fanout.io/pool=heavy")) == 1
    # The setup hook (deleted once it succeeded) registered the heavy subflow's deployment.
    crunch = stack.k("exec", f"deploy/{RELEASE}-worker", "--", "prefect", "deployment", "inspect", "crunch/crunch")
    assert "'work_pool_name': 'kubernetes'" in crunch.stdout, crunch.stdout


def test_fanout_of_500_items_spreads_over_the_light_pods(stack: Stack) -> None:
    light = set(stack.ready_pods("fanout.io/pool=light"))
    summary = stack.wait_fanout(stack.start_fanout("--items", "500", "--chunk-size", "5", "--heavy-batches", "0"))
    _items_exactly_once(summary, 500)
    for r in summary["results"]:
        want = checksum_item(r["item"])
        assert {k: r[k] for k in want} == json.loads(json.dumps(want)), r
    per_pod: dict[str, int] = {}
    for worker, n in summary["per_worker"].items():
        per_pod[_pod_of(worker)] = per_pod.get(_pod_of(worker), 0) + n
    assert set(per_pod) == light, f"every light pod handled a share: {per_pod}"


def test_scaling_the_light_pool_up_mid_run_puts_new_pods_to_work(stack: Stack) -> None:
    # 480 runs of 3 s on 3 pods of 8 slots: ~60 s of work, so that the two new pods (ready in
    # ~10-25 s on a busy 2-core machine) find runs left; with 240 (30 s) CI once saw the
    # fan-out end before they were ready.
    before = set(stack.ready_pods("fanout.io/pool=light"))
    job = stack.start_fanout("--items", "480", "--chunk-size", "1", "--item-sleep", "3", "--heavy-batches", "0")
    stack.wait_busy(job, done=1)
    stack.scale(LIGHT, 5)
    started = time.monotonic()
    eventually(lambda: len(set(stack.ready_pods("fanout.io/pool=light")) - before) == 2, timeout=120)
    ready_after = time.monotonic() - started
    done, _ = stack.progress(job)
    summary = stack.wait_fanout(job)
    _items_exactly_once(summary, 480)
    pods = {_pod_of(w) for w in summary["per_worker"]}
    assert pods - before, (
        f"the new pods took work (ready {ready_after:.0f} s after the scale, {done}/480 items done then): "
        f"{summary['per_worker']}"
    )
    stack.wait_rollout(LIGHT)


def test_scaling_the_light_pool_down_mid_run_loses_nothing(stack: Stack) -> None:
    stack.scale(LIGHT, 5)
    stack.wait_rollout(LIGHT)
    job = stack.start_fanout("--items", "150", "--chunk-size", "1", "--item-sleep", "2", "--heavy-batches", "0")
    stack.wait_busy(job, done=10)
    stack.scale(LIGHT, 1)
    summary = stack.wait_fanout(job)
    _items_exactly_once(summary, 150)
    stack.wait_rollout(LIGHT)


def test_force_deleting_busy_workers_loses_nothing(stack: Stack) -> None:
    stack.scale(LIGHT, 3)
    stack.wait_rollout(LIGHT)
    # Items of 8 s: a force-deleted pod still gets SIGTERM and the kubelet's minimum grace
    # (2 s) before SIGKILL, and drains what it can in that time. With 3 s items the runs in
    # flight could all finish in those 2 s (nothing to redeliver, seen once in CI); with
    # 8 s they cannot.
    job = stack.start_fanout("--items", "120", "--chunk-size", "1", "--item-sleep", "8", "--heavy-batches", "0")
    stack.wait_busy(job, done=5)
    victims = stack.ready_pods("fanout.io/pool=light")[:2]
    stack.k("delete", "pod", *victims, "--force", "--grace-period=0")
    summary = stack.wait_fanout(job)
    _items_exactly_once(summary, 120)
    assert summary["redelivered"] > 0, "runs held by the killed pods were delivered again"
    stack.wait_rollout(LIGHT)


def test_deleting_the_server_pod_mid_run_loses_nothing(stack: Stack) -> None:
    job = stack.start_fanout("--items", "120", "--chunk-size", "1", "--item-sleep", "2", "--heavy-batches", "0")
    stack.wait_busy(job, done=5)
    stack.k("delete", "pod", "-l", "app.kubernetes.io/component=server", "--wait=false")
    summary = stack.wait_fanout(job)
    _items_exactly_once(summary, 120)
    stack.wait_rollout(f"{RELEASE}-server")


# --- a heavy subflow in a big pod -------------------------------------------------------


def test_heavy_subflow_runs_in_a_pod_of_2_cpus_on_the_large_node(stack: Stack) -> None:
    summary = stack.wait_fanout(
        stack.start_fanout("--items", "4", "--heavy-batches", "1", "--heavy-cpus", "2", "--heavy-memory", "1Gi")
    )
    assert summary["heavy_failed"] == {}, summary["heavy_failed"]
    (heavy,) = summary["heavy"]
    assert heavy["processes"] == 2 and len(heavy["pids"]) == 2, heavy
    pod_name = _pod_of(heavy["worker"])
    pod = stack.cluster.json("-n", stack.namespace, "get", "pod", pod_name)
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == "2" and resources["limits"]["cpu"] == "2", resources
    node = stack.cluster.json("get", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"].get("fanout.io/pool") == "large"


# --- least privilege --------------------------------------------------------------------


def test_service_accounts_cannot_read_secrets(stack: Stack) -> None:
    def can(sa: str, verb: str, resource: str, namespace: str) -> bool:
        r = stack.cluster.kubectl(
            "auth", "can-i", verb, resource, "-n", namespace,
            f"--as=system:serviceaccount:{stack.namespace}:{sa}", check=False,
        )  # fmt: skip
        return r.stdout.strip() == "yes"

    accounts = {
        p["spec"].get("serviceAccountName", "default") for p in stack.pods(f"app.kubernetes.io/instance={RELEASE}")
    }
    assert f"{RELEASE}-worker" in accounts
    for sa in accounts:
        for verb in ("get", "list"):
            assert not can(sa, verb, "secrets", stack.namespace), f"{sa} can {verb} secrets"
            assert not can(sa, verb, "secrets", "kube-system"), f"{sa} can {verb} secrets in kube-system"
    # The Kubernetes worker launches flow-run Jobs here, and nowhere else.
    assert can(f"{RELEASE}-worker", "create", "jobs", stack.namespace)
    assert not can(f"{RELEASE}-worker", "create", "jobs", "default")


# --- the user's own code ------------------------------------------------------------------

USERCODE = REPO / "tests" / "usercode" / "userwork"
USER_POOL = f"{RELEASE}-pool-user"


def user_image(stack: Stack) -> tuple[str, str]:
    """The user's package (tests/usercode, which the chart has never heard of) installed
    into an image built on top of the runtime image, as a user builds theirs."""
    repo, tag = stack.image
    user_tag = f"{tag}-userwork"
    site = "/opt/fanout/lib/python3.11/site-packages/userwork"
    build_image(
        f"fanout-e2e/userwork:{user_tag}",
        f"""\
FROM {repo}:{tag}
COPY __init__.py tasks.py bulk.py heavy.py {site}/
USER 0
RUN python -m compileall -q {site}
USER 10001:10001
""",
        files={name: (USERCODE / name).read_text() for name in ("__init__.py", "tasks.py", "bulk.py", "heavy.py")},
    )
    stack.cluster.kind("load", "docker-image", f"fanout-e2e/userwork:{user_tag}", "--name", CLUSTER_NAME)
    return "fanout-e2e/userwork", user_tag


def worker_status(stack: Stack, pod: str) -> dict[str, Any]:
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/status').read().decode())"
    r = stack.k("exec", pod, "--", "python", "-c", code, check=False, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 else {}


USER_TASKS = ["userwork.tasks:square", "userwork.bulk:slow_shout", "userwork.bulk:shout"]
# A pool KEDA sizes on its demand, from zero: fast polling and a short cooldown so that the
# test sees a whole cycle in minutes (the chart's defaults: 5 s, 60 s, 60 s).
AUTO = f"{RELEASE}-pool-auto"
AUTOSCALING = {"enabled": True, "minReplicas": 0, "maxReplicas": 4, "pollingInterval": 2, "cooldownPeriod": 20,
               "scaleDownStabilizationSeconds": 10}  # fmt: skip
LARGE_NODE = {
    "node_selector": {"fanout.io/pool": "large"},
    "tolerations": [{"key": "fanout.io/pool", "operator": "Equal", "value": "large", "effect": "NoSchedule"}],
}


def user_release(stack: Stack) -> tuple[str, str]:
    """Upgrade the release, once per module, to the user's image with the user's values: a
    pool serving the user's functions, the user's CPU-heavy flow as a deployment next to
    the demo's `crunch` (`deployments`), and the UI's API URL on a local port for the
    browser. The tests after the user's ones upgrade back to the runtime image."""
    if stack.user:
        return stack.user
    repo, tag = user_image(stack)
    stack.ui_port = free_port()
    values = {
        "pools": {
            "user": {"replicas": 2, "limit": 4, "tasks": USER_TASKS},
            "auto": {
                "limit": 2,
                "tasks": ["userwork.bulk:nap"],
                "autoscaling": AUTOSCALING,
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
            },
        },
        "deployments": [
            {"name": "crunch", "entrypoint": "fanout_demo.tasks:crunch"},
            {
                "name": "user-census",
                "entrypoint": "userwork.heavy:cpu_census",
                "image": f"{repo}:{tag}",
                "description": "the user's CPU-heavy flow in a 2-CPU pod on the large node",
                # Finished flow-run Jobs are deleted after 120 s (kind values: 30 s): time to
                # inspect the pod, and still gone long before the uninstall test looks.
                "jobVariables": {
                    "cpu_request": "2",
                    "cpu_limit": "2",
                    "memory_request": "1Gi",
                    "memory_limit": "1Gi",
                    **LARGE_NODE,
                    "finished_job_ttl": 120,
                },
            },
        ],
        "server": {"uiApiUrl": f"http://127.0.0.1:{stack.ui_port}/api"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "user-values.yaml")
        path.write_text(yaml.safe_dump(values))
        stack.helm(
            "upgrade", RELEASE, str(CHART), "-f", str(KIND_VALUES), "-f", str(path),
            "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
            "--wait", "--wait-for-jobs", "--timeout", f"{int(scaled(900))}s", timeout=960,
        )  # fmt: skip
    eventually(lambda: len(stack.ready_pods("fanout.io/pool=user")) == 2, timeout=300, message="user pool ready")
    stack.user = (repo, tag)
    return stack.user


def test_a_pool_of_the_users_own_code_loses_nothing_when_a_busy_pod_is_force_deleted(stack: Stack) -> None:
    """A chart pool with `tasks:` naming the user's code (in their own image, which the
    chart has never seen). Two of the user's flows run at once, each from a Job: one fans
    out with Prefect's plain `.delay()` and `.result()`, one through our public API
    (`fanout.fan_out`); a busy pod of the pool is force-deleted mid-run: every item of
    both correct, exactly once, and neither flow sees an error."""
    repo, tag = user_release(stack)
    plain = start_job(stack, user_call("sync_fanout(24, sleep=10)", "userwork.tasks"), image=f"{repo}:{tag}")
    api = start_job(stack, user_call("slow_shout_all(60, chunk_size=1)", "userwork.bulk"), image=f"{repo}:{tag}")

    def busy_pod() -> str | None:
        """A pod holding two runs or more, one of them a 10 s `square` it took under 3 s
        ago: deleted now, that run cannot finish in the kubelet's short kill grace (a pod
        busy only with 1 s runs could, and nothing would need delivering again)."""
        for pod in stack.ready_pods("fanout.io/pool=user"):
            runs = worker_status(stack, pod).get("runs", {}).values()
            if len(runs) >= 2 and any(r["name"].startswith("square") and r["seconds"] < 3 for r in runs):
                return pod
        return None

    victim = eventually(busy_pod, timeout=300, interval=0.5, message="a user pod busy with a fresh 10 s run")
    stack.k("delete", "pod", victim, "--force", "--grace-period=0")

    results = wait_user_job(stack, plain)
    assert [r["item"] for r in results] == list(range(24)), "every item exactly once, in order"
    assert all(r["value"] == r["item"] ** 2 for r in results)
    through_api = wait_user_job(stack, api)
    assert through_api["failed"] == {}, through_api["failed"]
    assert [v["word"] for v in through_api["values"]] == [f"W{i}" for i in range(60)]
    reaper = stack.k("logs", f"deploy/{RELEASE}-reaper", timeout=120).stdout
    assert "redelivered (delivery 2)" in reaper, "the killed pod's runs were delivered again"


SCRAPE = """
import json, socket, sys, urllib.request
def get(host):
    return urllib.request.urlopen(f"http://{host}:8080/metrics", timeout=10).read().decode()
ips = sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[2], 8080, proto=socket.IPPROTO_TCP)})
print(json.dumps({"pools": get(sys.argv[1]), "workers": {ip: get(ip) for ip in ips}}))
"""


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of `name`'s samples (Prometheus text) whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        if metric_name == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def test_the_release_serves_pool_and_worker_metrics_to_the_cluster(stack: Stack) -> None:
    """Scraped from inside the cluster, as Prometheus would: the reaper's Service gives
    the user pool's live workers and slots, and as many redeliveries as the reaper
    logged; the task workers' headless Service reaches every ready pool pod, each
    serving its own slots and finished runs."""
    user_release(stack)
    (pod, *_) = stack.ready_pods("fanout.io/pool=user")

    def scraped() -> dict[str, Any]:
        r = stack.k("exec", pod, "--", "python", "-c", SCRAPE, f"{RELEASE}-reaper", f"{RELEASE}-task-workers",
                    check=False, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout)
        assert metric(got["pools"], "fanout_pool_workers", pool="user") == 2, got["pools"]
        return got

    got = eventually(scraped, timeout=120, interval=5, message="the user pool's 2 workers in the metrics")
    assert metric(got["pools"], "fanout_pool_slots", pool="user") == 8  # 2 pods x limit 4
    logs = stack.k("logs", f"deploy/{RELEASE}-reaper", timeout=120).stdout
    redelivered = metric(got["pools"], "fanout_recovered_runs_total", action="redelivered")
    assert redelivered == logs.count("; redelivered (delivery"), (redelivered, logs[-2000:])
    pods = stack.ready_pods("fanout.io/role=task-worker")
    assert len(got["workers"]) == len(pods) >= 2, (sorted(got["workers"]), pods)
    for ip, text in got["workers"].items():
        assert metric(text, "fanout_worker_slots") >= 1, (ip, text[:2000])
    finished = sum(metric(t, "fanout_worker_runs_finished_total", pool="user") for t in got["workers"].values())
    assert finished >= 1, "the user pool's pods ran the user's fan-outs"


def test_an_autoscaled_pool_grows_from_zero_with_its_backlog_and_goes_back_to_zero(stack: Stack) -> None:
    """A pool with KEDA autoscaling (minReplicas 0, maxReplicas 4, 2 runs per pod) has no
    pod; the user's fan-out of 300 one-second items (100 task runs, the last one 45 s
    long) brings its first pod within 30 s, takes it to 4 pods and never more, scales it
    down while that last run is still in flight, and back to 0 pods within cooldown + 60 s
    of the end: every item exactly once. The times go to tests/.artifacts/autoscaling.json."""
    repo, tag = user_release(stack)

    def replicas() -> int:
        return int(stack.cluster.json("-n", stack.namespace, "get", "deployment", AUTO)["spec"].get("replicas", 0))

    eventually(lambda: replicas() == 0 and not stack.pods("fanout.io/pool=auto"), timeout=240, interval=2,
               message="the autoscaled pool at zero pods before any work")  # fmt: skip
    job = start_job(stack, user_call("nap_all(300, seconds=1.0, last=45.0)", "userwork.bulk"), image=f"{repo}:{tag}")
    seen: list[tuple[float, int]] = []  # (time, spec.replicas)
    deadline = time.time() + scaled(600)
    while time.time() < deadline:
        seen.append((time.time(), replicas()))
        status = stack.cluster.json("-n", stack.namespace, "get", "job", job).get("status", {})
        if status.get("succeeded") or status.get("failed"):
            break
        time.sleep(1)
    got = wait_user_job(stack, job)
    assert got["failed"] == {}, got["failed"]
    assert [v.split("@")[0] for v in got["values"]] == [f"n{i}" for i in range(300)], "every item once, in order"
    assert len({v.split("@")[1] for v in got["values"]}) >= 2, "the work spread over the new pods"
    first_up = next(t for t, r in seen if r >= 1)
    peak = max(r for _, r in seen)
    at_peak = next(t for t, r in seen if r == peak)
    down_in_flight = [t for t, r in seen if t > at_peak and r < peak]
    assert peak == 4, f"rose to maxReplicas 4 and no more, saw {peak}"
    assert down_in_flight, "scaled down while the last (45 s) run was still in flight"
    zero_within = AUTOSCALING["cooldownPeriod"] + 60
    eventually(lambda: replicas() == 0 and not stack.pods("fanout.io/pool=auto"), timeout=zero_within + 30,
               interval=1, message="back to zero pods")  # fmt: skip
    back_to_zero = time.time() - got["ended"]
    times = {
        "scale_up_seconds": round(first_up - got["started"], 1),
        "to_max_seconds": round(at_peak - got["started"], 1),
        "fan_out_seconds": round(got["ended"] - got["started"], 1),
        "back_to_zero_seconds": round(back_to_zero, 1),
        "task_runs": got["task_runs"],
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "autoscaling.json").write_text(json.dumps(times, indent=2))
    print("autoscaling:", times)
    assert times["scale_up_seconds"] <= 30, times
    assert back_to_zero <= zero_within, times
    # Pods taken away drained first: the reaper never had to deliver a run of a worker
    # that vanished ("redelivered"). A run it put back into the queue ("requeued": one
    # Scheduled for longer than staleAfter while a worker had free slots) loses nothing
    # either; CI once saw one such run here. Both are named in the reaper's log.
    reaper = stack.k("logs", f"deploy/{RELEASE}-reaper", timeout=120).stdout
    recovered = [line for line in reaper.splitlines() if "nap[" in line and "(delivery" in line]
    print("recovered runs of this fan-out:", recovered)
    assert not [line for line in recovered if "; redelivered (delivery" in line], recovered
    assert got["redelivered"] == len(recovered), (got["redelivered"], recovered)


def test_the_users_cpu_heavy_flow_runs_as_a_deployment_in_a_2_cpu_pod_on_the_large_node(stack: Stack) -> None:
    """The user's own flow (`userwork.heavy:cpu_census`, a process pool over every CPU its
    pod is given), registered by the chart from `deployments` with a 2-CPU pod on the large
    node as its job variables, run with Prefect's `run_deployment` from a Job of the user:
    Completed with correct results, in a pod limited to 2 CPUs on the large node, on 2
    processes."""
    repo, tag = user_release(stack)
    job = start_job(
        stack, user_call("run_census('cpu-census/user-census', 12, 400)", "userwork.heavy"), f"{repo}:{tag}"
    )
    run = wait_user_job(stack, job)
    assert run["state"] == "Completed", run
    census = run["result"]
    assert census["values"] == [i * i for i in range(12)], census
    assert census["cpus"] == 2, f"the flow saw its pod's CPU limit: {census}"
    assert census["processes"] == 2 and len(census["pids"]) == 2, f"both processes of its pool worked: {census}"
    pod = stack.cluster.json("-n", stack.namespace, "get", "pod", census["host"])
    (container,) = pod["spec"]["containers"]
    assert container["image"] == f"{repo}:{tag}"
    assert container["resources"]["limits"]["cpu"] == "2" and container["resources"]["requests"]["cpu"] == "2"
    node = stack.cluster.json("get", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"].get("fanout.io/pool") == "large", pod["spec"]["nodeName"]


def test_the_prefect_ui_shows_a_fan_out_and_its_chunk_task_runs_after_login(stack: Stack) -> None:
    """What a user looks at: the release's Prefect UI through `kubectl port-forward` in
    headless Chromium. It asks for the auth string (the release's generated Secret); after
    logging in, the flow run of a fan-out of the user's function through `fanout.fan_out`
    lists its chunk task runs, named after the function and item range."""
    repo, tag = user_release(stack)
    code = (
        "import json; from userwork.bulk import shout_all; "
        "state = shout_all([f'w{i}' for i in range(20)], chunk_size=5, return_state=True); "
        "print('USER-RESULT ' + json.dumps({'flow_run': str(state.state_details.flow_run_id), "
        "'state': state.name, 'summary': state.result()}))"
    )
    fanned = wait_user_job(stack, start_job(stack, ["python", "-c", code], image=f"{repo}:{tag}"))
    assert fanned["state"] == "Completed" and fanned["summary"]["failed"] == {}, fanned
    assert fanned["summary"]["values"] == [f"W{i}!" for i in range(20)]
    chunks = [f"shout[{s}:{s + 5}]" for s in range(0, 20, 5)]
    secret = stack.k("get", "secret", f"{RELEASE}-auth", "-o", "jsonpath={.data.auth-string}").stdout
    auth = base64.b64decode(secret).decode()

    with (
        port_forward(stack.cluster, stack.namespace, f"svc/{RELEASE}-server", stack.ui_port, 4200) as url,
        headless_chromium() as browser,
    ):
        try:
            base = log_in_to_prefect_ui(browser, url, auth)
            text = task_runs_of_flow_run(browser, base, fanned["flow_run"], "shout-all", *chunks)
            assert "4 Task runs" in text and "(4 Completed)" in text, text[:2000]
            print(f"screenshot: {screenshot(browser, 'prefect-ui-flow-run-task-runs')}")
        except BaseException:
            with contextlib.suppress(Exception):
                print(f"screenshot: {screenshot(browser, 'prefect-ui-failed')}")
            raise


def user_call(call: str, module: str) -> list[str]:
    return ["python", "-c", f"import json; from {module} import *; print('USER-RESULT ' + json.dumps({call}))"]


def wait_user_job(stack: Stack, job: str) -> Any:
    def finished() -> bool:
        status = stack.cluster.json("-n", stack.namespace, "get", "job", job).get("status", {})
        return bool(status.get("succeeded") or status.get("failed"))

    eventually(finished, timeout=900, interval=3, message=f"user job {job} finishes")
    logs = stack.k("logs", f"job/{job}", timeout=120).stdout
    lines = [ln for ln in logs.splitlines() if ln.startswith("USER-RESULT ")]
    assert lines, f"the user's flow printed no result:\n{logs[-4000:]}"
    return json.loads(lines[-1].removeprefix("USER-RESULT "))


def start_job(stack: Stack, command: list[str], image: str) -> str:
    """A Job like the chart's demo Job (env, volumes, security), running `command`."""
    rendered = stack.helm(
        "template", RELEASE, str(CHART), "--kube-version", os.environ.get("K8S_VERSION", "v1.33.13"),
        "-f", str(KIND_VALUES), *stack.image_args(), "--show-only", "templates/tests/demo.yaml",
    ).stdout  # fmt: skip
    job = yaml.safe_load(rendered)
    name = f"fanout-e2e-user-{uuid.uuid4().hex[:6]}"
    job["metadata"]["name"] = name
    job["metadata"].pop("annotations", None)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = command
    container["image"] = image
    stack.k("create", "-f", "-", input=json.dumps(job))
    return name


# --- upgrade, uninstall -----------------------------------------------------------------


def test_helm_upgrade_resizes_pools_then_uninstall_leaves_nothing(stack: Stack) -> None:
    # Also back from the user's image and values (user_release) to the runtime image and
    # the chart's defaults: every pod is replaced then, hence the longer timeout.
    stack.helm(
        "upgrade", RELEASE, str(CHART), "-f", str(KIND_VALUES), *stack.image_args(),
        "--set", "pools.light.replicas=2", "--set", "pools.heavy.replicas=0",
        "--wait", "--timeout", f"{int(scaled(900))}s", timeout=960,
    )  # fmt: skip
    eventually(lambda: not stack.pods("fanout.io/pool=user"), timeout=300, message="the user's pool gone")
    eventually(lambda: len(stack.pods("fanout.io/pool=light")) == 2, timeout=300, message="light pool at 2")
    eventually(lambda: not stack.pods("fanout.io/pool=heavy"), timeout=300, message="heavy pool at 0")
    assert len(stack.ready_pods("fanout.io/pool=light")) == 2

    stack.helm("uninstall", RELEASE, "--wait", "--timeout", f"{int(scaled(300))}s")
    kinds = "all,pvc,secret,configmap,serviceaccount,role,rolebinding,pdb,networkpolicy"

    def leftovers() -> list[str]:
        items = stack.cluster.json("-n", stack.namespace, "get", kinds)["items"]
        names = [f"{i['kind']}/{i['metadata']['name']}" for i in items]
        # What every namespace has; and the e2e fan-out Jobs this module created itself.
        return [
            n for n in names
            if n not in ("ServiceAccount/default", "ConfigMap/kube-root-ca.crt") and "fanout-e2e-" not in n
        ]  # fmt: skip

    def nothing_left() -> bool:
        left = leftovers()
        assert not left, f"left after uninstall: {left}"
        return True

    eventually(nothing_left, timeout=180, message="nothing left after uninstall")


# --- bad values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (["--set", "pools.light.replicas=-1"], "replicas"),
        (["--set", "pools.bogus.replicas=1"], "bogus"),
        (["--set", "image.repository="], "/image/repository"),
    ],
)
def test_helm_install_with_bad_values_fails_naming_the_value(
    cluster: Cluster, values: list[str], named: str, tmp_path: Any
) -> None:
    ns = f"e2e-bad-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        s = Stack(cluster, ns, ("fanout/runtime", "x"))
        # A short --timeout: should the values get through, the install fails fast, not hangs.
        r = s.helm(
            "install", "bad", str(CHART), "-f", str(KIND_VALUES), *values, "--timeout", "60s",
            check=False, timeout=120,
        )  # fmt: skip
        assert r.returncode != 0
        assert named in r.stderr, r.stderr
        items = cluster.json("-n", ns, "get", "all,secret,configmap,pvc")["items"]
        assert [i["metadata"]["name"] for i in items if i["kind"] != "ConfigMap"] == [], "nothing half-done"
        assert s.helm("list", "-q").stdout.strip() == ""
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
