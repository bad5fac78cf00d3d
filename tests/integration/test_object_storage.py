"""Shared storage through the S3 protocol, on a real S3-compatible object server.

versitygw (the chart's bundled object store, `make object-server`) serves a bucket from a
local directory; the stack's FANOUT_STORAGE is an `s3-bucket` block saved by
`python -m fanout.storage s3`, as the chart's setup hook does. The user's plain Prefect
tasks (no `result_storage=`) and the public fan-out API run unchanged on it, and every
parameter and result goes through the bucket: nothing is written to a local directory.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from conftest import USERCODE, finish, status, submit

from fanout.local import LocalStack, Proc, free_port, http_ok, wait_until

REPO = Path(__file__).resolve().parents[2]
VERSITYGW = os.environ.get("VERSITYGW") or str(REPO / ".bin" / "versitygw")
BUCKET = "fanout-it"
KEYS = {"AWS_ACCESS_KEY_ID": "it-access", "AWS_SECRET_ACCESS_KEY": "it-secret-key-0123456789"}
TASKS = "userwork.tasks:square,userwork.tasks:asquare,userwork.bulk:shout,userwork.bulk:slow_shout"


class ObjectStack(LocalStack):
    """A LocalStack whose storage is a bucket on a versitygw process it runs itself."""

    def __init__(self, root: Path) -> None:
        self.s3_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        env = {**KEYS, "AWS_DEFAULT_REGION": "us-east-1"}
        super().__init__(root, ui=False, storage="s3-bucket/it", env=env)
        self.object_server: Proc | None = None

    def start_object_server(self) -> Proc:
        """versitygw on the same port and data each time (a restart keeps the objects).

        The root keys come from its environment, never its command line."""
        assert Path(VERSITYGW).is_file(), f"no versitygw at {VERSITYGW}: run `make object-server`"
        data, meta = self.root / "s3" / "data", self.root / "s3" / "meta"
        data.mkdir(parents=True, exist_ok=True)
        meta.mkdir(parents=True, exist_ok=True)
        env = {"ROOT_ACCESS_KEY_ID": KEYS["AWS_ACCESS_KEY_ID"], "ROOT_SECRET_ACCESS_KEY": KEYS["AWS_SECRET_ACCESS_KEY"]}
        argv = [VERSITYGW, "--port", f"127.0.0.1:{self.s3_port}", "--health", "/health", "posix"]
        proc = self.spawn("versitygw", [*argv, "--sidecar", str(meta), str(data)], env, self.s3_port)
        wait_until(lambda: http_ok(f"{self.endpoint}/health"), 30, "versitygw", proc.popen)
        self.object_server = proc
        return proc

    def objects(self) -> list[str]:
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **_boto_keys())
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStack]:
    with ObjectStack(tmp_path_factory.mktemp("s3")) as st:
        st.start_object_server()
        args = ["s3", "--block", "it", "--bucket", BUCKET, "--endpoint-url", st.endpoint, "--create-bucket"]
        saved = st.run_module("fanout.storage", args)
        assert saved.returncode == 0, saved.stdout + saved.stderr
        assert f"created bucket {BUCKET}" in saved.stdout, saved.stdout
        st.start_reaper(interval=1.0, stale_after=6.0)
        yield st


def user_worker(stack: LocalStack, limit: int = 4) -> Proc:
    return stack.start_worker("user", limit=limit, tasks=TASKS, env={"PYTHONPATH": str(USERCODE)})


def local_files(stack: LocalStack) -> list[Path]:
    """Files under any directory Prefect or we would fall back to on local disk."""
    places = [stack.root / "storage", *(stack.root / "home").glob("*/storage")]
    return [f for p in places if p.exists() for f in p.rglob("*") if f.is_file()]


def test_plain_prefect_tasks_keep_parameters_and_results_in_the_bucket(stack: ObjectStack, workers: list[Proc]) -> None:
    workers += [user_worker(stack) for _ in range(2)]
    before = len(stack.objects())
    for call in ("sync_fanout(20)", "asyncio.run(async_fanout(20))"):
        got = finish(submit(stack, "userwork.tasks", call), 180)
        assert [r["item"] for r in got] == list(range(20))
        assert all(r["value"] == r["item"] ** 2 for r in got)
    # each run's parameters and result, at least (the time-to-live sweep bounds them)
    assert len(stack.objects()) >= before + 2 * 20 * 2, stack.objects()[:5]
    assert local_files(stack) == []


def test_the_fan_out_api_over_the_bucket(stack: ObjectStack, workers: list[Proc]) -> None:
    workers += [user_worker(stack) for _ in range(2)]
    words = [f"word-{i}" for i in range(1000)]
    got = finish(submit(stack, "userwork.bulk", f"shout_all({words!r})"), 300)
    assert got["failed"] == {}, list(got["failed"].items())[:3]
    assert got["values"] == [w.upper() + "!" for w in words]
    assert local_files(stack) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_an_object_server_stopped_mid_run_loses_nothing(stack: ObjectStack, workers: list[Proc], sig: int) -> None:
    """The object server is killed (-9), or stopped as Kubernetes stops a pod (SIGTERM),
    while runs read parameters and write results, and comes back 5 s later: every item
    completes once (boto3's retries, see fanout.settings.OBJECT_STORE_RETRIES, ride out the
    gap; without them a run whose parameters could not be read is deleted by the worker
    and reported failed)."""
    workers += [user_worker(stack) for _ in range(2)]
    proc = submit(stack, "userwork.bulk", "slow_shout_all(60, chunk_size=1)")
    wait_until(lambda: sum(status(w)["finished"] for w in workers) >= 8, 120, "the fan-out under way")
    assert stack.object_server is not None
    stack.object_server.signal(sig)
    stack.object_server.popen.wait(10)
    time.sleep(5)
    stack.start_object_server()
    got = finish(proc, 300)
    assert got["failed"] == {}, got["failed"]
    assert [v["word"] for v in got["values"]] == [f"W{i}" for i in range(60)]


def test_a_collected_fan_out_leaves_nothing_in_the_bucket(stack: ObjectStack, workers: list[Proc]) -> None:
    """2,000 items: once the parent has read each chunk's result, it deletes that run's
    parameters and result (fanout.retention); the bucket is as it was before."""
    workers += [user_worker(stack) for _ in range(2)]
    before = set(stack.objects())
    words = [f"w{i}" for i in range(2000)]
    got = finish(submit(stack, "userwork.bulk", f"shout_all({words!r}, chunk_size=20)"), 300)
    assert got["failed"] == {} and len(got["values"]) == 2000
    # What stays is the user's flow's own return value (Prefect persists every flow's
    # result): one object, not the 200 of the fan-out's 100 runs.
    left = set(stack.objects()) - before
    assert len(left) <= 1 and not [k for k in left if "parameters/" in k], sorted(left)[:5]


def test_the_reapers_time_to_live_sweep_removes_what_a_killed_parent_left(
    stack: ObjectStack, workers: list[Proc]
) -> None:
    """A parent killed mid-run never collects: its runs' parameters and results stay until
    a reaper with a short time-to-live deletes everything older than it."""
    workers += [user_worker(stack) for _ in range(2)]
    before = set(stack.objects())
    parent = submit(stack, "userwork.bulk", "slow_shout_all(16, chunk_size=1)")
    wait_until(lambda: len(set(stack.objects()) - before) >= 16, 120, "the parent's runs stored")
    parent.kill()
    parent.wait(10)
    # Its runs created before it died still run; their parameters and results stay.
    seen: list[int] = []

    def settled() -> bool:
        seen.append(len(stack.objects()))
        return len(seen) > 10 and len(set(seen[-10:])) == 1 and not any(status(w)["running"] for w in workers)

    wait_until(settled, 120, "the orphaned runs finished")
    left = set(stack.objects()) - before
    assert [k for k in left if "parameters/" in k], sorted(left)[:5]  # (it collected a few first)
    sweeper = stack.start_reaper(interval=1.0, stale_after=6.0, storage_ttl=5, storage_sweep_every=2)
    try:
        wait_until(lambda: not set(stack.objects()) & left, 90, "the sweep deleted them")
    finally:
        sweeper.stop()
    assert "older than 5s" in sweeper.output(), sweeper.output()[-2000:]


def test_a_finished_run_offered_again_is_skipped_not_deleted(stack: ObjectStack, workers: list[Proc]) -> None:
    """A finished run whose parameters are gone is offered again (as after a dropped
    ack): the worker skips it; Prefect's own worker would fail to read the parameters and
    delete the run. The run stays Completed, ran once, and the worker keeps serving."""
    w = user_worker(stack, limit=1)
    workers.append(w)
    proc = submit(stack, "userwork.tasks", "sync_fanout(1, sleep=8)")
    wait_until(lambda: status(w)["running"] == 1, 120, "worker busy")
    with httpx.Client(base_url=stack.api_url, timeout=30) as c:

        def running() -> list[dict]:  # states reach the database up to a second later
            found = c.post("/task_runs/filter", json={"task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}).json()
            return [r for r in found if r["name"].startswith("square")]

        wait_until(lambda: running(), 30, "the run's Running state recorded")
        (run,) = running()
        states = c.get("/task_run_states/", params={"task_run_id": run["id"]}).json()
        params_id = next(
            s["state_details"]["task_parameters_id"] for s in states if s["state_details"].get("task_parameters_id")
        )
        # Queued again while it runs on the only slot: the copy reaches the worker once the
        # run is Completed; by then its parameters are gone (deleted, as by the sweep).
        again = {"type": "SCHEDULED", "name": "Scheduled",
                 "state_details": {"deferred": True, "task_parameters_id": params_id}}  # fmt: skip
        resp = c.post(f"/task_runs/{run['id']}/set_state", json={"state": again, "force": True})
        assert resp.json()["status"] == "ACCEPT", resp.text
        s3 = boto3.client("s3", endpoint_url=stack.endpoint, region_name="us-east-1", **_boto_keys())
        s3.delete_object(Bucket=BUCKET, Key=f"parameters/{params_id}")
        assert finish(proc, 120)[0]["value"] == 0
        try:
            wait_until(lambda: "offered again after it finished (Completed); skipped" in w.output(), 60, "the skip")
        except TimeoutError:
            raise AssertionError(w.output()[-5000:]) from None
        after = c.get(f"/task_runs/{run['id']}")
        assert after.status_code == 200, "the run was deleted"
        assert after.json()["state"]["type"] == "COMPLETED" and after.json()["run_count"] == 1, after.json()
    assert finish(submit(stack, "userwork.tasks", "sync_fanout(3)"), 120)[2]["value"] == 4  # still serving
