"""Several Prefect API replicas (Prefect's HA layout: API processes with `--no-services`,
one services process, PostgreSQL and Redis), with `.delay()` delivery across them.

Prefect keeps the runs created through a replica in that replica's memory and offers
them only to workers subscribed to it; our workers subscribe to every replica
(FANOUT_API_REPLICAS), and the reaper requeues what a dead replica forgot. The user's
flows run in submitter processes of their own, each talking to one replica, as a flow
pod reaches one through the Service.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import USERCODE, assert_all_stopped, finish, status

from fanout.local import LocalStack, Proc, wait_until

TASKS = "userwork.bulk:shout,userwork.bulk:slow_shout,userwork.tasks:square,userwork.tasks:asquare"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("replicas"), ui=False, replicas=2) as st:
        st.start_reaper(interval=1.0, stale_after=6.0)
        pids = [p.popen.pid for p in st.procs]
        yield st
    assert_all_stopped(pids)


@pytest.fixture
def workers(stack: LocalStack) -> Iterator[list[Proc]]:
    started = [
        stack.start_worker("user", limit=2, tasks=TASKS, env={"PYTHONPATH": str(USERCODE)}, wait=False)
        for _ in range(2)
    ]
    for w in started:
        stack.wait_healthy(w)
    yield started
    for w in started:
        w.stop()


def submit_via(stack: LocalStack, api_url: str, call: str, module: str = "userwork.bulk") -> subprocess.Popen[str]:
    """The user's flow `call` from `module`, in its own process, talking to the replica
    at `api_url` only."""
    code = f"import asyncio, json; from {module} import *; print('RESULT ' + json.dumps({call}))"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=stack.env("submitter", PYTHONPATH=str(USERCODE), PREFECT_API_URL=api_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def runs_of(stack: LocalStack, name_like: str) -> list[dict]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as c:
        body = {"task_runs": {"name": {"like_": name_like}}, "limit": 200}
        return c.post("/task_runs/filter", json=body).json()


def test_runs_created_through_either_replica_run_once_on_workers_subscribed_to_both(
    stack: LocalStack, workers: list[Proc]
) -> None:
    """500 items, half through each replica at once: every item once, in order; every
    task run once; both workers took runs from both replicas."""
    a, b = stack.api_urls
    words = [f"w{i}" for i in range(250)]
    procs = [submit_via(stack, url, f"shout_all({words!r}, chunk_size=5)") for url in (a, b)]
    for proc in procs:
        got = finish(proc, 300)
        assert got["failed"] == {}, list(got["failed"].items())[:3]
        assert got["values"] == [w.upper() + "!" for w in words]
        assert got["task_runs"] == 50
    runs = runs_of(stack, "shout[")
    assert len(runs) == 100, len(runs)
    assert {(r["state"]["type"], r["run_count"]) for r in runs} == {("COMPLETED", 1)}
    for w in workers:
        taken = status(w)["replicas"]
        assert set(taken) == {a, b} and min(taken.values()) > 0, taken


@pytest.mark.parametrize("call", ["sync_fanout(20)", "asyncio.run(async_fanout(20))"])
def test_prefects_own_delay_and_result_through_the_second_replica(
    stack: LocalStack, workers: list[Proc], call: str
) -> None:
    """Prefect's plain patterns (`.delay()`, then `.result()` or `gather(result_async())`)
    through the second replica: every future returns its result."""
    got = finish(submit_via(stack, stack.api_urls[1], call, module="userwork.tasks"), 120)
    assert [r["value"] for r in got] == [i * i for i in range(20)]


def test_a_replica_killed_mid_run_costs_no_item(stack: LocalStack, workers: list[Proc]) -> None:
    """kill -9 of the replica one fan-out talks to, while both fan-outs' runs wait and run;
    the replica comes back 3 s later (its pod restarted): both fan-outs return every
    item, none failed; the runs it held only in memory were requeued by the reaper, and
    no task run ran twice."""
    a, b = stack.api_urls
    n = 16  # per fan-out: 8 runs of 2 x 1 s each, 16 runs on 4 slots
    procs = [submit_via(stack, url, f"slow_shout_all({n})") for url in (a, b)]
    wait_until(lambda: sum(status(w)["running"] for w in workers) >= 3, 120, "both fan-outs under way")
    port = stack.stop_server("server-1", kill=True)
    time.sleep(3)
    stack.start_replica("server-1", port)
    results = [finish(proc, 300) for proc in procs]
    for got in results:
        assert got["failed"] == {}, got["failed"]
        assert [v["word"] for v in got["values"]] == [f"W{i}" for i in range(n)]
    runs = runs_of(stack, "slow_shout[")
    assert len(runs) == 2 * (n // 2), len(runs)  # two fan-outs of n/2 runs
    assert {r["state"]["type"] for r in runs} == {"COMPLETED"}
    assert {r["run_count"] for r in runs} == {1}, sorted(r["run_count"] for r in runs)
    requeued = results[1]["redelivered"]
    assert requeued >= 1, "no run was in the killed replica's queue: the test proved nothing"


def test_a_worker_drains_every_subscription_on_sigterm(stack: LocalStack, workers: list[Proc]) -> None:
    """SIGTERM: the worker closes its subscriptions to both replicas and exits 0."""
    w = workers[0]
    assert status(w)["connected"]
    w.signal(signal.SIGTERM)
    assert w.popen.wait(30) == 0
    log = w.output()
    assert "subscribing to API replica" in log
