"""The fanned-out tasks, the CPU-heavy subflow, and which worker pool serves what.

Task workers subscribe by task key (`<qualname>-<hash of the code>`), so routing work
to a pool is routing task keys: the light pool serves `process_chunk` only, the heavy
pool `heavy_batch` only, and a light worker never even hears of a heavy run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from prefect import Task, flow, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import serialize_context

from flows import workload
from flows.cpu import available_cpus
from flows.internals import without_settings
from flows.processpool import discard_pool, process_pool, warm_process_pool
from flows.storage import result_storage

log = logging.getLogger("flows.worker")


def worker_id() -> str:
    """`<hostname>-<pid>`: Prefect's task-worker client id; in a pod the hostname is the pod name."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _log_finished(tsk: Task[..., Any], run: TaskRun, state: State) -> None:
    """One log line per finished task run, on the worker that ran it."""
    took = ""
    if run.start_time is not None:
        took = f" in {(state.timestamp - run.start_time).total_seconds():.2f}s"
    reason = f": {state.message}" if state.is_failed() and state.message else ""
    log.info("%s %s%s%s", run.name, state.name, took, reason)


class ChunkFailed(Exception):
    """Some items of a chunk raised; carries the results of the others.

    Raising (rather than returning the errors) marks the task run Failed where users
    look (UI, API), while the parent still gets every good result of the chunk.
    """

    def __init__(self, results: list[dict[str, Any]], errors: dict[int, str]) -> None:
        super().__init__(results, errors)
        self.results = results
        self.errors = errors

    def __repr__(self) -> str:  # Prefect logs repr(exc): keep the results out of it
        return f"ChunkFailed({str(self)!r})"

    def __str__(self) -> str:
        shown = "; ".join(f"item {i}: {e}" for i, e in list(self.errors.items())[:5])
        more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        return f"{len(self.errors)} of {len(self.errors) + len(self.results)} items failed: {shown}{more}"


@task(
    name="process_chunk",
    task_run_name="items-{start}-{stop}",
    result_storage=result_storage(),
    on_completion=[_log_finished],
    on_failure=[_log_finished],
)
def process_chunk(
    start: int,
    stop: int,
    fail_items: list[int] | None = None,
    sleep_s: float = 0.0,
    crash_items: list[int] | None = None,
    work: str = "checksum",
) -> list[dict[str, Any]]:
    """Light work: checksum items start..stop-1, each independently.

    One bad item must not sink its neighbours: every item is tried, and if any raised
    the run fails with ChunkFailed holding the others' results. `work` names the
    per-item function (flows.workload.WORK). `sleep_s` adds per-item
    latency (standing in for I/O); `fail_items` raise and `crash_items` kill the worker
    process outright (like the OOM killer) to exercise error handling and recovery.
    """
    me = worker_id()
    fn = workload.WORK[work]
    fail = set(fail_items or ())
    crash = set(crash_items or ())
    results: list[dict[str, Any]] = []
    errors: dict[int, str] = {}
    for item in range(start, stop):
        if item in crash:
            log.error("item %d: killing this worker process (crash_items)", item)
            os._exit(137)
        try:
            if sleep_s:
                time.sleep(sleep_s)
            if item in fail:
                raise workload.InjectedFailure(f"injected failure for item {item}")
            results.append({**fn(item), "worker": me})
        except Exception as exc:  # noqa: BLE001 - reported per item to the parent
            errors[item] = f"{type(exc).__name__}: {exc}"
    if errors:
        raise ChunkFailed(results, errors)
    return results


@task(name="count_segments")
def count_segments(ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """Some segments of a heavy batch, run in one process of the subflow's pool."""
    t0 = time.perf_counter()
    primes = sum(workload.count_primes(lo, hi) for lo, hi in ranges)
    return {"primes": primes, "pid": os.getpid(), "seconds": time.perf_counter() - t0}


# Task runs per pool process in one batch. Segments are grouped because each task run
# has a Prefect cost (a batch of two near-empty task runs takes ~0.05 s); four groups per
# process let a process slowed by a neighbour hand work to the other (200 CPU items on 2
# processes: median speed-up 1.76-1.85x with four, 1.57-1.77x with two, same runs). Groups
# are dealt round-robin: each gets its share of the cheap and the expensive segments.
GROUPS_PER_PROCESS = 4


def group_segments(parts: list[workload.Segment], processes: int) -> list[list[tuple[int, int]]]:
    """Deal segments round-robin into at most processes * GROUPS_PER_PROCESS groups."""
    groups = min(len(parts), processes * GROUPS_PER_PROCESS)
    return [[(p.lo, p.hi) for p in parts[g::groups]] for g in range(groups)]


@flow(name="crunch", persist_result=True, result_storage=result_storage())
def crunch(batch: int, segments: int, span: int, processes: int | None = None) -> dict[str, Any]:
    """The CPU-heavy subflow: all segments of one batch on a process pool.

    The result is persisted to shared storage so that a parent can read it when this
    runs as a deployment in another pod. The pool is sized here, when the flow runs,
    from the CPUs of the process that runs it (a heavy worker, or a large flow-run pod
    started with bigger `job_variables`), never from the node's CPU count. `processes`
    overrides that, e.g. 1 for a baseline.
    """
    n = processes or available_cpus()
    t0 = time.perf_counter()
    parts = workload.batch_segments(batch, segments, span)
    runner, lock = process_pool(n)
    with lock:
        # The runner caches the serialised run context per lifecycle; this batch's task
        # runs belong to this flow run, so refresh it. The pool's processes were started
        # from this one and have its environment.
        runner._cached_context, runner._cached_env = without_settings(serialize_context()), dict(os.environ)
        futures = [runner.submit(count_segments, {"ranges": g}) for g in group_segments(parts, n)]
    try:
        done = [f.result() for f in futures]
    except BrokenProcessPool as exc:
        discard_pool(n)
        raise RuntimeError(
            f"batch {batch}: a process of the pool died while running it (killed, or out of memory: "
            f"pool of {n} processes for {segments} segments); the next batch starts a new pool"
        ) from exc
    return {
        "batch": batch,
        "primes": sum(d["primes"] for d in done),
        "processes": n,
        "worker": worker_id(),
        "pids": sorted({d["pid"] for d in done}),
        "busy_seconds": sum(d["seconds"] for d in done),
        "seconds": time.perf_counter() - t0,
    }


@task(
    name="heavy_batch",
    task_run_name="heavy-{batch}",
    result_storage=result_storage(),
    on_completion=[_log_finished],
    on_failure=[_log_finished],
)
def heavy_batch(batch: int, segments: int, span: int, compare_serial: bool = False) -> dict[str, Any]:
    """Heavy work, served by the heavy pool only: runs the process-pool subflow.

    With `compare_serial` it also runs the same batch serially in this process, so the
    speed-up is measured on the same machine in the same run.
    """
    result = crunch(batch, segments, span)
    if compare_serial:
        t0 = time.perf_counter()
        serial = sum(workload.count_primes(p.lo, p.hi) for p in workload.batch_segments(batch, segments, span))
        result["serial_seconds"] = time.perf_counter() - t0
        if serial != result["primes"]:
            raise RuntimeError(f"batch {batch}: pool counted {result['primes']} primes, serial {serial}")
    return result


POOLS: dict[str, list[Task[..., Any]]] = {
    "light": [process_chunk],
    "heavy": [heavy_batch],
}

# What a worker of a pool does once at start, in the background (others: warm_engine).
POOL_WARMUP: dict[str, Callable[[], object]] = {"heavy": warm_process_pool}


def pool_tasks(pool: str) -> list[Task[..., Any]]:
    """The tasks a worker of `pool` serves; a clear error for an unknown pool."""
    try:
        return POOLS[pool]
    except KeyError:
        raise ValueError(f"unknown pool {pool!r}; known pools: {', '.join(sorted(POOLS))}") from None
