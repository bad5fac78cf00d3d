"""No lost work on the local stack: workers killed, drained, a server restarted.

Each test runs a real parent flow in its own process against a real server, real
worker processes and the reaper (`python -m fanout.reaper`), breaks something while
items are in flight, and checks that every item still ends with exactly one correct
result (or, for poison, is reported failed with its reason).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import stack_with_reaper, status

from fanout.local import LocalStack, Proc, wait_until
from fanout_demo import workload

STALE_AFTER = 6.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with stack_with_reaper(tmp_path_factory, "nolost", stale_after=STALE_AFTER, max_deliveries=3) as st:
        yield st


def submit(stack: LocalStack, out: Path, *args: str) -> subprocess.Popen[str]:
    log = out.with_suffix(".log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "fanout_demo.flow", *args, "--json", str(out)],
        env=stack.env("submitter"),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def busy(w: Proc) -> bool:
    return status(w)["running"] > 0


def finish(proc: subprocess.Popen[str], out: Path, timeout: float = 300) -> tuple[int, dict]:
    rc = proc.wait(timeout=timeout)
    assert out.exists(), out.with_suffix(".log").read_text()[-3000:]
    return rc, json.loads(out.read_text())


def assert_all_correct(summary: dict, items: int) -> None:
    got = sorted(r["item"] for r in summary["results"])
    assert got == list(range(items)), f"missing {set(range(items)) - set(got)}, failed {summary['failed']}"
    for r in summary["results"]:
        expected = workload.checksum_item(r["item"])
        assert {k: r[k] for k in expected} == expected


def test_kill_9_of_a_busy_worker_loses_nothing(stack: LocalStack, workers: list[Proc], tmp_path: Path) -> None:
    workers += [stack.start_worker("light", limit=2) for _ in range(2)]
    out = tmp_path / "kill.json"
    proc = submit(stack, out, "--items", "16", "--chunk-size", "1", "--item-sleep", "1.5", "--timeout", "240")
    victim = workers[0]
    wait_until(lambda: busy(victim), 120, "victim busy")
    victim.signal(signal.SIGKILL)
    rc, s = finish(proc, out)
    assert rc == 0, s["failed"]
    assert_all_correct(s, 16)
    assert s["redelivered"] >= 1  # the killed worker's runs were delivered again


def test_sigterm_drains_in_flight_runs(stack: LocalStack, workers: list[Proc], tmp_path: Path) -> None:
    workers += [stack.start_worker("light", limit=2) for _ in range(2)]
    out = tmp_path / "drain.json"
    proc = submit(stack, out, "--items", "12", "--chunk-size", "1", "--item-sleep", "1.5", "--timeout", "240")
    leaving = workers[0]
    wait_until(lambda: busy(leaving), 120, "worker busy")
    leaving.signal(signal.SIGTERM)
    assert leaving.popen.wait(timeout=60) == 0
    log = leaving.output()
    assert "draining" in log and "Traceback" not in log
    rc, s = finish(proc, out)
    assert rc == 0, s["failed"]
    assert_all_correct(s, 12)
    assert s["redelivered"] == 0  # a drain hands nothing to the reaper
    assert leaving.client_id in s["per_worker"]  # it finished what it had started


def test_server_restart_mid_run_loses_nothing(stack: LocalStack, workers: list[Proc], tmp_path: Path) -> None:
    workers.append(stack.start_worker("light", limit=1))
    out = tmp_path / "restart.json"
    before = httpx.post(f"{stack.api_url}/task_runs/count", json={}).json()
    proc = submit(stack, out, "--items", "10", "--chunk-size", "1", "--item-sleep", "1", "--timeout", "300")
    # restart once every run is submitted, so most sit in the server's in-memory queue
    wait_until(lambda: httpx.post(f"{stack.api_url}/task_runs/count", json={}).json() >= before + 10, 120, "submitted")
    stack.restart_server()
    rc, s = finish(proc, out)
    assert rc == 0, s["failed"]
    assert_all_correct(s, 10)
    assert s["redelivered"] >= 1  # runs the old server forgot were enqueued again


def test_an_item_that_keeps_killing_workers_is_failed_as_poison(
    stack: LocalStack, workers: list[Proc], tmp_path: Path
) -> None:
    """Like a Deployment, keep two workers alive; item 2 kills whichever runs it."""
    workers += [stack.start_worker("light", limit=1) for _ in range(2)]
    stop = threading.Event()

    def replace_dead() -> None:
        while not stop.is_set():
            for i, w in enumerate(list(workers)):
                if not w.alive() and not stop.is_set():
                    workers[i] = stack.start_worker("light", limit=1, wait=False)
            time.sleep(0.5)

    keeper = threading.Thread(target=replace_dead, daemon=True)
    keeper.start()
    try:
        out = tmp_path / "poison.json"
        proc = submit(stack, out, "--items", "6", "--chunk-size", "1", "--crash-items", "2", "--timeout", "240")
        rc, s = finish(proc, out)
    finally:
        stop.set()
        keeper.join()
    assert rc == 1
    assert list(s["failed"]) == ["2"]
    assert "poison: delivered 3 times and never finished" in s["failed"]["2"]
    assert sorted(r["item"] for r in s["results"]) == [0, 1, 3, 4, 5]


def test_a_worker_told_to_stop_while_the_server_is_away_exits_promptly(stack: LocalStack, workers: list[Proc]) -> None:
    """A pod scaled down during a server outage must not sit in Terminating: Prefect's
    client retries a refused connection for about a minute, and the worker's last call
    (removing its heartbeat) would wait that long."""
    w = stack.start_worker("light", limit=1)
    workers.append(w)
    port = stack.stop_server()
    try:
        wait_until(lambda: not status(w)["connected"], 30, "the worker to notice the server is gone")
        t0 = time.monotonic()
        w.popen.send_signal(signal.SIGTERM)  # to the worker only, as Kubernetes does
        assert w.popen.wait(timeout=30) == 0, w.output()[-2000:]
        assert time.monotonic() - t0 < 15, w.output()[-2000:]
        assert "stopped after" in w.output()
    finally:
        stack.start_server(port=port)
