"""The public fan-out API (`fanout.fan_out`, `afan_out`, `fan_out_iter`) on the user's own
functions over the user's own data (strings), on a real server and real workers.

The user's code is `tests/usercode/userwork/bulk.py` (plain functions; its flows call
the API), on PYTHONPATH, served by `python -m fanout.worker --tasks userwork.bulk:...`.
Every flow runs in its own submitter process with a hard timeout.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import USERCODE, finish, stack_with_reaper, status, submit
from prometheus_client.parser import text_string_to_metric_families

from fanout.local import LocalStack, Proc, wait_until

TASKS = "userwork.bulk:shout,userwork.bulk:slow_shout,userwork.bulk:pad"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with stack_with_reaper(tmp_path_factory, "api", stale_after=6.0) as st:
        yield st


def user_worker(stack: LocalStack, limit: int = 4) -> Proc:
    return stack.start_worker("user", limit=limit, tasks=TASKS, env={"PYTHONPATH": str(USERCODE)})


def start(stack: LocalStack, call: str) -> subprocess.Popen[str]:
    return submit(stack, "userwork.bulk", call)


WORDS = [f"word-{i}" for i in range(1000)]


@pytest.mark.parametrize("call", ["shout_all(WORDS)", "asyncio.run(ashout_all(WORDS))"])
def test_1000_strings_from_a_sync_and_an_async_flow(stack: LocalStack, workers: list[Proc], call: str) -> None:
    workers += [user_worker(stack) for _ in range(2)]
    got = finish(start(stack, call.replace("WORDS", repr(WORDS))), 300)
    assert got["failed"] == {}, list(got["failed"].items())[:3]
    assert got["values"] == [w.upper() + "!" for w in WORDS]  # every item, in item order
    # sized from the live slots (2 workers x 4): every slot busy, far fewer runs than items
    assert 8 <= got["task_runs"] <= 100, got["task_runs"]
    with httpx.Client(base_url=stack.api_url, timeout=30) as c:
        runs = c.post("/task_runs/filter", json={"task_runs": {"name": {"like_": "shout["}}, "limit": 200}).json()
    assert any(r["name"] == f"shout[0:{got['chunk_size']}]" for r in runs), [r["name"] for r in runs][:5]


def test_one_raising_item_fails_alone_and_its_chunk_shows_failed(stack: LocalStack, workers: list[Proc]) -> None:
    workers.append(user_worker(stack))
    words = ["a", "b", "boom", "c", "d"]
    got = finish(start(stack, f"shout_all({words!r}, chunk_size=5)"), 120)
    assert got["failed"] == {"2": "ValueError: boom is not a word"}
    assert got["values"][:2] == ["A!", "B!"] and got["values"][3:] == ["C!", "D!"]
    with httpx.Client(base_url=stack.api_url, timeout=30) as c:
        runs = c.post("/task_runs/filter", json={"task_runs": {"name": {"any_": ["shout[0:5]"]}}}).json()
    assert {r["state"]["type"] for r in runs} == {"FAILED"}  # what the UI shows


def test_kill_9_of_a_busy_worker_mid_fan_out(stack: LocalStack, workers: list[Proc]) -> None:
    workers += [user_worker(stack, limit=2) for _ in range(2)]
    proc = start(stack, "slow_shout_all(40)")
    victim = workers[0]
    wait_until(lambda: status(victim)["running"] > 0, 120, "victim busy")
    victim.signal(signal.SIGKILL)
    got = finish(proc, 300)
    assert [v["word"] for v in got["values"]] == [f"W{i}" for i in range(40)]
    assert got["failed"] == {} and got["redelivered"] >= 1


def test_a_server_restart_mid_fan_out_is_not_seen_by_the_caller(stack: LocalStack, workers: list[Proc]) -> None:
    workers += [user_worker(stack, limit=2) for _ in range(2)]
    proc = start(stack, "slow_shout_all(40)")
    wait_until(lambda: any(status(w)["running"] for w in workers), 120, "the fan-out under way")
    stack.restart_server()
    got = finish(proc, 300)
    assert [v["word"] for v in got["values"]] == [f"W{i}" for i in range(40)]
    assert got["failed"] == {}


def test_20000_results_consumed_as_they_complete_in_bounded_memory(stack: LocalStack, workers: list[Proc]) -> None:
    """10 KB results: holding all 20,000 would take 200 MB; the iterator keeps only the
    task runs in flight."""
    workers += [user_worker(stack, limit=4) for _ in range(2)]
    got = finish(start(stack, "stream_pad(20_000)"), 600)
    assert got["distinct"] == got["ok"] == 20_000
    assert got["bytes"] == 20_000 * 10_000
    assert got["rss_growth_mb"] < 120, got


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A /metrics endpoint's samples: (name, labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape_until(
    port: int, check: Any, timeout: float, what: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape until `check(samples)` holds; those samples."""
    seen: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []

    def ok() -> bool:
        try:
            seen[:] = [scrape(port)]
        except httpx.HTTPError:  # not listening yet
            return False
        return bool(check(seen[0]))

    wait_until(ok, timeout, what)
    return seen[0]


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_metrics_show_the_backlog_the_workers_and_what_was_recovered(stack: LocalStack, workers: list[Proc]) -> None:
    """The reaper's /metrics: the pool's backlog while runs wait, its live workers and
    slots, and the runs it recovered after a kill -9 (as many as the fan-out reported);
    a worker's /metrics: its runs finished by final state, a failed one included."""
    reaper = next(p for p in stack.procs if p.name == "reaper")
    before = scrape_until(reaper.port, lambda m: True, 60, "the reaper's metrics")
    workers += [user_worker(stack, limit=2) for _ in range(2)]
    proc = start(stack, "slow_shout_all(30, chunk_size=1)")  # 30 runs of 1 s on 4 slots
    m = scrape_until(reaper.port, lambda m: sample(m, "fanout_pool_backlog", pool="user") >= 5, 60, "a backlog")
    assert sample(m, "fanout_pool_workers", pool="user") == 2 and sample(m, "fanout_pool_slots", pool="user") == 4, m
    assert sample(m, "fanout_task_runs", pool="user", state="scheduled") == sample(
        m, "fanout_pool_backlog", pool="user"
    )
    assert sample(m, "fanout_oldest_scheduled_seconds", pool="user") > 0
    victim = workers[0]
    wait_until(lambda: status(victim)["running"] > 0, 60, "victim busy")
    victim.signal(signal.SIGKILL)
    got = finish(proc, 300)
    assert got["failed"] == {} and got["redelivered"] >= 1
    after = scrape_until(reaper.port, lambda m: sample(m, "fanout_pool_backlog", pool="user") == 0, 30, "no backlog")
    # The fan-out's `redelivered` is the reaper's ledger for it: runs redelivered (their
    # worker died) and runs requeued (the server lost them with the dead worker's socket).
    recovered = {
        action: sample(after, "fanout_recovered_runs_total", action=action)
        - sample(before, "fanout_recovered_runs_total", action=action)
        for action in ("redelivered", "requeued")
    }
    assert recovered["redelivered"] >= 1, recovered
    assert sum(recovered.values()) == got["redelivered"], (recovered, got["redelivered"])

    survivor = workers[1]
    failed = finish(start(stack, "shout_all(['boom'], chunk_size=1)"), 120)["failed"]
    assert failed == {"0": "ValueError: boom is not a word"}
    w = scrape_until(
        survivor.port, lambda m: sample(m, "fanout_worker_runs_finished_total", state="failed"), 30, "a failed run"
    )
    assert sample(w, "fanout_worker_runs_finished_total", state="completed") >= 1, w
    assert sample(w, "fanout_worker_slots", pool="user") == 2
    assert sample(w, "fanout_worker_run_duration_seconds_count") == sample(w, "fanout_worker_runs_finished_total")


def test_a_backlog_longer_than_a_sweep_reads_is_counted_by_the_server(stack: LocalStack, workers: list[Proc]) -> None:
    """A reaper that reads only the 3 oldest runs per state (`--backlog-scan 3`; an
    observer: its stale-after of an hour recovers nothing) still reports the whole backlog:
    the server's exact count, the pool's share extrapolated and flagged as estimated."""
    observer = stack.start_reaper(interval=1.0, stale_after=3600, backlog_scan=3)
    try:
        workers.append(user_worker(stack, limit=1))
        proc = start(stack, "slow_shout_all(12, chunk_size=1)")  # 12 runs of 1 s on 1 slot

        def long_backlog(m: Any) -> bool:
            return sample(m, "fanout_all_task_runs", state="scheduled") >= 6

        m = scrape_until(observer.port, long_backlog, 60, "a backlog of 6 or more")
        total = sample(m, "fanout_all_task_runs", state="scheduled")
        assert sample(m, "fanout_backlog_estimated") == 1, m
        assert 3 < sample(m, "fanout_pool_backlog", pool="user") <= total, m
        assert finish(proc, 300)["failed"] == {}
        m = scrape_until(observer.port, lambda m: sample(m, "fanout_pool_backlog", pool="user") == 0, 30, "no backlog")
        assert sample(m, "fanout_backlog_estimated") == 0, m
    finally:
        observer.stop()
        stack.procs.remove(observer)
