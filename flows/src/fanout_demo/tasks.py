"""The demo's work: a light per-item function, a CPU-heavy subflow, and its pools.

Task workers subscribe by task key (`<qualname>-<hash of the code>`), so routing work
to a pool is routing task keys: the light pool serves `process_item` (chunks of it, via
`fanout.fan_out`), the heavy pool `heavy_batch`, and a light worker never even hears of
a heavy run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from prefect import flow, task
from prefect.context import serialize_context

from fanout.chunks import log_finished
from fanout.cpu import available_cpus
from fanout.internals import without_settings
from fanout.processpool import discard_pool, process_pool, submitting_to
from fanout.storage import result_storage
from fanout_demo import workload

log = logging.getLogger("fanout.worker")


def worker_id() -> str:
    """`<hostname>-<pid>`: Prefect's task-worker client id; in a pod the hostname is the pod name."""
    return f"{socket.gethostname()}-{os.getpid()}"


def process_item(spec: dict[str, Any]) -> dict[str, Any]:
    """Light work for one item, a plain function fanned out with `fanout.fan_out`.

    `spec` is `{"item": i, "work": name, "sleep": s, "fail": bool, "crash": bool}`:
    `work` names the per-item function (fanout_demo.workload.WORK), `sleep` adds
    per-item latency (standing in for I/O); `fail` raises and `crash` kills the worker
    process outright (like the OOM killer), to exercise error handling and recovery.
    """
    item = spec["item"]
    if spec.get("crash"):
        log.error("item %d: killing this worker process (crash_items)", item)
        os._exit(137)
    if spec.get("sleep"):
        time.sleep(spec["sleep"])
    if spec.get("fail"):
        raise workload.InjectedFailure(f"injected failure for item {item}")
    return {**workload.WORK[spec.get("work", "checksum")](item), "worker": worker_id()}


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
    # This batch's task runs belong to this flow run: its context, serialised once.
    with submitting_to(process_pool(n), without_settings(serialize_context())) as runner:
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
    on_completion=[log_finished],
    on_failure=[log_finished],
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


# The demo's pools: what their workers serve (`python -m fanout.worker --tasks ...`), and
# their environment. The chart's `pools` values and the local stack use the same.
POOL_TASKS: dict[str, str] = {
    "light": "fanout_demo.tasks:process_item",
    "heavy": "fanout_demo.tasks:heavy_batch",
}
# A heavy worker starts its kept process pool at start, not at its first batch.
POOL_ENV: dict[str, dict[str, str]] = {"heavy": {"FANOUT_WARM_PROCESS_POOL": "auto"}}
