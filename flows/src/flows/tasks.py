"""The fanned-out tasks, the CPU-heavy subflow, and which worker pool serves what.

Task workers subscribe by task key (`<qualname>-<hash of the code>`), so routing work
to a pool is routing task keys: the light pool serves `process_chunk` only, the heavy
pool `heavy_batch` only, and a light worker never even hears of a heavy run.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from prefect import Task, flow, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import SyncClientContext, serialize_context
from prefect.task_runners import ProcessPoolTaskRunner

from flows import workload
from flows.cpu import available_cpus
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


def without_settings(context: dict[str, Any]) -> dict[str, Any]:
    """A serialised run context minus the sender's Prefect settings.

    Prefect rebuilds a whole Settings object from them for every task run that receives
    them: every nested settings model looks for .env and profile files again, over half
    of a task run's CPU (measured with py-spy). The receiving process's own environment
    is the one that applies (a worker's pod, a pool process started by this one).
    """
    return {k: v for k, v in context.items() if k != "settings_context"}


def warm_engine() -> None:
    """Load now what this process's first task or flow run would load: ~2-3 s of CPU on
    our machines, most of it Prefect collections (prefect-kubernetes and its
    dependencies), imported the first time a storage block is validated. Every worker
    does this at start, so its first run, and a new pod's first runs, are not slow."""
    import prefect.flow_engine
    import prefect.task_engine  # noqa: F401
    from prefect.plugins import load_prefect_collections

    load_prefect_collections()


_CHILD_CLIENT: list[SyncClientContext] = []


def _init_child() -> None:
    """Each pool process, once, as it starts: load what its first task run would
    (without this that run took ~2.3 s, later ones ~0.2 s), and hold one API client for
    every task run it will run (Prefect otherwise builds one or two per run, each loading
    the CA bundle into a new SSL context)."""
    warm_engine()
    _CHILD_CLIENT.append(SyncClientContext().__enter__())  # for the life of the process


def _warm_child(seconds: float) -> int:
    """A plain call (no Prefect task run, nothing in the UI) that idles a moment, so that
    the executor starts all its processes now rather than at the first batch."""
    time.sleep(seconds)
    return os.getpid()


# One started process pool per size, kept for the life of this process. Spawning a process
# and importing Prefect in it takes seconds on a small machine, more than a typical batch
# saves; a heavy worker pays it once (and ahead of time, see warm_process_pool), not per batch.
_POOLS_LOCK = threading.Lock()
_WARM_POOLS: dict[int, tuple[ProcessPoolTaskRunner, threading.Lock]] = {}


def _is_broken(runner: ProcessPoolTaskRunner) -> bool:
    """True once one of the pool's processes has died (killed, out of memory): Python's
    ProcessPoolExecutor then refuses all further work, for the life of the pool."""
    executor = runner._executor
    return executor is None or bool(getattr(executor, "_broken", False))


def discard_pool(n: int) -> None:
    """Forget the pool of `n` processes (stopping what is left of it): the next batch
    starts a new one instead of failing on a broken pool."""
    with _POOLS_LOCK:
        entry = _WARM_POOLS.pop(n, None)
    if entry is not None:
        runner, _ = entry
        try:
            runner.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - a broken pool may not shut down cleanly
            log.warning("stopping a broken process pool: %s", exc)


def process_pool(n: int) -> tuple[ProcessPoolTaskRunner, threading.Lock]:
    """The started pool of `n` processes of this process, and the lock to submit under;
    a new one if a process of the kept pool has died since the last batch."""
    with _POOLS_LOCK:
        broken = n in _WARM_POOLS and _is_broken(_WARM_POOLS[n][0])
    if broken:
        log.warning("a process of the pool of %d died since the last batch; starting a new pool", n)
        discard_pool(n)
    with _POOLS_LOCK:
        if n not in _WARM_POOLS:
            if not _WARM_POOLS:
                atexit.register(close_process_pools)
            runner = ProcessPoolTaskRunner(max_workers=n, initializer=_init_child).__enter__()
            _WARM_POOLS[n] = (runner, threading.Lock())
        return _WARM_POOLS[n]


def close_process_pools() -> None:
    """Stop every kept pool and its processes (idempotent). A worker calls this once it
    has drained, so that its pod ends as soon as its last run is done."""
    with _POOLS_LOCK:
        pools = list(_WARM_POOLS.values())
        _WARM_POOLS.clear()
    for runner, lock in pools:
        with lock:
            runner.__exit__(None, None, None)


def warm_process_pool(n: int | None = None) -> float:
    """Start the pool's processes now (each imports Prefect); returns the seconds it took."""
    n = n or available_cpus()
    t0 = time.perf_counter()
    warm_engine()
    runner, _ = process_pool(n)
    executor = runner._executor
    assert executor is not None
    try:
        pids = {f.result() for f in [executor.submit(_warm_child, 1.0) for _ in range(n)]}
    except BrokenProcessPool:  # a process died while starting (killed); the first batch starts a new pool
        log.warning("process pool of %d broken while warming up; the first batch will start a new one", n)
        return time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    log.info("process pool of %d warm in %.1fs (%d processes started)", n, seconds, len(pids))
    return seconds


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
