"""The local stack end to end: real server, real worker processes, real submitter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from fanout.local import LocalStack, free_port, wait_until
from fanout_demo import workload


def api(stack: LocalStack) -> httpx.Client:
    return httpx.Client(base_url=stack.api_url, timeout=30)


def task_run_count(stack: LocalStack) -> int:
    with api(stack) as c:
        return int(c.post("/task_runs/count", json={}).json())


def run_fanout(stack: LocalStack, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "summary.json"
    proc = stack.run_flow([*args, "--json", str(out)], timeout=600)
    summary = json.loads(out.read_text()) if out.exists() else {}
    return proc, summary


def light_workers(stack: LocalStack) -> dict[str, str]:
    return {w.client_id: w.name for w in stack.workers() if "light" in w.name}


def test_fanout_200_items_over_3_workers(stack: LocalStack, tmp_path: Path) -> None:
    proc, s = run_fanout(stack, tmp_path, "--items", "200", "--chunk-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # every result correct, every item exactly once
    items = [r["item"] for r in s["results"]]
    assert sorted(items) == list(range(200))
    for r in s["results"]:
        expected = workload.checksum_item(r["item"])
        assert {k: r[k] for k in expected} == expected
    assert s["failed"] == {}

    # every light worker handled a share, and only light workers did
    per_worker = s["per_worker"]
    assert set(per_worker) == set(light_workers(stack)), per_worker
    assert all(n > 0 for n in per_worker.values()), per_worker
    assert sum(per_worker.values()) == 200

    # Prefect agrees: 100 task runs for this flow run, each completed after one attempt
    with api(stack) as c:
        runs = c.post(
            "/task_runs/filter", json={"flow_runs": {"id": {"any_": [s["flow_run_id"]]}}, "limit": 200}
        ).json()
    assert len(runs) == 100
    assert {r["state"]["type"] for r in runs} == {"COMPLETED"}
    assert {r["run_count"] for r in runs} == {1}

    # one log line per task run on the worker that ran it
    logged = sum(w.output().count(" Completed in ") for w in stack.workers() if "light" in w.name)
    assert logged >= 100


def test_heavy_subflow_runs_on_heavy_pool_with_2_processes(stack: LocalStack, tmp_path: Path) -> None:
    proc, s = run_fanout(
        stack,
        tmp_path,
        "--items",
        "4",
        "--heavy-batches",
        "1",
        "--heavy-segments",
        "4",
        "--heavy-span",
        "40000",  # ~1 s per segment: long enough that both pool processes take some
        "--compare-serial",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (heavy,) = s["heavy"]
    serial = sum(workload.count_primes(p.lo, p.hi) for p in workload.batch_segments(0, 4, 40000))
    assert heavy["primes"] == serial
    assert heavy["processes"] == 2
    assert len(heavy["pids"]) == 2, heavy["pids"]
    heavy_worker = next(w for w in stack.workers() if "heavy" in w.name)
    assert heavy["worker"] == heavy_worker.client_id
    assert heavy_worker.popen.pid not in heavy["pids"]  # real child processes
    # routing: the light pool never even received the heavy run
    for w in stack.workers():
        if "light" in w.name:
            assert "heavy-0" not in w.output()
    assert "heavy-0 Completed" in heavy_worker.output()


def scheduled_events_of(stack: LocalStack, flow_run_id: str) -> int:
    """How many `prefect.task-run.Scheduled` events the server recorded for the task runs
    of a flow run (the event persister writes them within ~1 s)."""
    body = {
        "filter": {
            "event": {"name": ["prefect.task-run.Scheduled"]},
            "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        },
        "limit": 50,
    }
    with api(stack) as c:
        return len(c.post("/events/filter", json=body).json()["events"])


def test_scheduled_events_as_delay_sends_them_unless_turned_off(stack: LocalStack, tmp_path: Path) -> None:
    """By default each run created sends Prefect's Scheduled event, as `.delay()` does
    (automations may react to it); FANOUT_SCHEDULED_EVENTS=0 leaves it out, and the runs
    still complete with their Scheduled state recorded."""
    flow_runs = {}
    for setting in ("0", "1"):  # off first: once the later run's events are in, its would be too
        out = tmp_path / f"events-{setting}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "fanout_demo.flow", "--items", "3", "--chunk-size", "1", "--json", str(out)],
            env=stack.env("submitter", FANOUT_SCHEDULED_EVENTS=setting),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=stack.root,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = json.loads(out.read_text())
        assert s["completed"] == 3
        flow_runs[setting] = s["flow_run_id"]
    wait_until(lambda: scheduled_events_of(stack, flow_runs["1"]) >= 3, 30, "the default run's Scheduled events")
    assert scheduled_events_of(stack, flow_runs["1"]) == 3
    assert scheduled_events_of(stack, flow_runs["0"]) == 0


def test_failing_item_is_reported_and_the_rest_complete(stack: LocalStack, tmp_path: Path) -> None:
    proc, s = run_fanout(stack, tmp_path, "--items", "20", "--chunk-size", "5", "--fail-items", "7", "--timeout", "300")
    assert proc.returncode == 1
    assert s["failed"] == {"7": "InjectedFailure: injected failure for item 7"}
    assert sorted(r["item"] for r in s["results"]) == [i for i in range(20) if i != 7]
    assert "FAILED item 7: InjectedFailure" in proc.stdout


def test_bad_input_fails_clearly_and_creates_no_task_runs(stack: LocalStack, tmp_path: Path) -> None:
    before = task_run_count(stack)
    cases = {
        ("--items", "0"): "items must be >= 1, got 0",
        ("--items", "-5"): "items must be >= 1, got -5",
        ("--items", "10", "--chunk-size", "0"): "chunk_size must be >= 1",
        ("--items", "10", "--chunk-size", "-1"): "chunk_size must be >= 1",
        ("--items", "10", "--heavy-batches", "-1"): "heavy_batches must be >= 0",
        ("--items", "10", "--fail-items", "12"): "fail_items must be item ids in [0, 10)",
        ("--items", "ten"): "invalid int value: 'ten'",
        # oversized: refused up front instead of flooding the server
        ("--items", "1000000000"): "items must be <= 10,000,000 per fan-out",
        ("--items", "1000000", "--chunk-size", "1"): "would create 1,000,000 task runs, more than 20,000",
    }
    for args, message in cases.items():
        proc = stack.run_flow(list(args), timeout=120)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    assert task_run_count(stack) == before


def test_a_worker_told_to_serve_nothing_that_exists_is_rejected(stack: LocalStack) -> None:
    for tasks, message in [
        ("fanout_demo.tasks:nope", "cannot load 'fanout_demo.tasks:nope'"),
        ("", "name at least one task to serve"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "fanout.worker", "--pool", "gpu", "--tasks", tasks],
            env=stack.env("bad-worker"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr


def test_sigterm_stops_an_idle_worker_cleanly(stack: LocalStack) -> None:
    w = stack.start_worker("light", limit=2, name="worker-light-extra")
    w.popen.send_signal(signal.SIGTERM)
    assert w.popen.wait(timeout=30) == 0
    assert "Traceback" not in w.output()


def test_a_worker_started_before_the_server_waits_for_it(stack: LocalStack) -> None:
    """In a cluster a worker pod may start before the server: it waits (probe up, not
    ready) instead of crashing, and still stops cleanly."""
    port, api = free_port(), free_port()
    argv = [sys.executable, "-m", "fanout.worker", "--tasks", stack.pools["light"], "--health-port", str(port)]
    w = stack.spawn(
        "worker-early", argv, stack.env("worker-early", PREFECT_API_URL=f"http://127.0.0.1:{api}/api"), port
    )
    wait_until(lambda: "waiting for the Prefect API" in w.output(), 60, "the worker to wait", w.popen)
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 503  # no runs for it yet
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 503
    live = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5)  # but alive: not to be restarted
    assert live.status_code == 200 and live.json()["ok"], live.text
    w.popen.send_signal(signal.SIGTERM)
    assert w.popen.wait(timeout=30) == 0, w.output()[-2000:]
    assert "Traceback" not in w.output()


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def test_a_killed_pool_process_fails_its_batch_and_the_next_batch_gets_a_new_pool(
    stack: LocalStack, tmp_path: Path
) -> None:
    """A pool process killed mid-batch (the OOM killer, in a pod) fails that batch with
    its reason; the heavy worker does not keep the broken pool and fail every later
    batch, it starts a new one."""
    short = ("--items", "1", "--heavy-batches", "1", "--heavy-segments", "4", "--heavy-span", "20000")
    proc, s = run_fanout(stack, tmp_path / "a", *short)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = s["heavy"][0]["pids"]

    long = (
        "--items",
        "1",
        "--heavy-batches",
        "1",
        "--heavy-segments",
        "400",
        "--heavy-span",
        str(workload.CPU_ITEM_SPAN),
    )
    done: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: done.update(zip(("proc", "s"), run_fanout(stack, tmp_path / "b", *long), strict=True))
    )
    busy_before = cpu_seconds(old)
    runner.start()
    wait_until(lambda: cpu_seconds(old) - busy_before > 1.0, 120, "the long batch to be computing on the pool")
    os.kill(old[0], signal.SIGKILL)
    runner.join(300)
    assert done["proc"].returncode == 1, done["proc"].stderr[-3000:]
    assert not done["s"]["heavy"]
    assert "a process of the pool died while running it" in done["s"]["heavy_failed"]["0"], done["s"]["heavy_failed"]

    proc, s = run_fanout(stack, tmp_path / "c", *short)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (heavy,) = s["heavy"]
    assert len(heavy["pids"]) == 2 and not set(heavy["pids"]) & set(old), (heavy["pids"], old)


def test_sigterm_ends_a_heavy_worker_and_its_pool_after_a_batch(stack: LocalStack, tmp_path: Path) -> None:
    """A heavy pod scaled down after real work must end, not hang in Terminating.

    Last in this module: it stops the stack's heavy worker.
    """
    proc, s = run_fanout(
        stack, tmp_path, "--items", "1", "--heavy-batches", "1", "--heavy-segments", "4", "--heavy-span", "20000"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (heavy,) = s["heavy"]
    heavy_worker = next(w for w in stack.workers() if "heavy" in w.name)
    heavy_worker.popen.send_signal(signal.SIGTERM)
    assert heavy_worker.popen.wait(timeout=30) == 0, heavy_worker.output()[-3000:]
    assert "stopped after" in heavy_worker.output()
    wait_until(lambda: not any(alive(pid) for pid in heavy["pids"]), 10, "the pool's processes to end")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_run_fans_out_and_prints_each_pools_figures(tmp_path: Path) -> None:
    """`make run` (python -m fanout_demo.demo) on a stack of its own: every item handled by
    one of its two light workers, and the pools table from the metrics: the light pool's
    2 live workers, no backlog left, its task runs completed, none failed or recovered."""
    argv = [sys.executable, "-m", "fanout_demo.demo", "--items", "120", "--heavy-batches", "0", "--dir", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    per_worker = [
        int(line.split()[-1])
        for line in out.split("items per worker process:")[1].split("\n\n")[0].splitlines()
        if line.strip()
    ]
    assert sum(per_worker) == 120 and len(per_worker) == 2, out
    table = out.split("task runs per pool (the dashboard's metrics):\n")[1].splitlines()
    assert table[0].split() == ["pool", "workers", "slots", "backlog", "completed", "failed", "recovered"], out
    light = next(line.split() for line in table if line.startswith("light"))
    workers, slots, backlog, completed, failed, recovered = map(int, light[1:])
    assert (workers, slots, backlog, failed, recovered) == (2, 16, 0, 0, 0), out
    assert completed >= 1, out
