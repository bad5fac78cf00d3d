"""`make bench`: a user's CPU-heavy process-pool subflow on a task worker, timed inside
the worker: Prefect's `ProcessPoolTaskRunner` (a new pool every batch) against our
`WarmProcessPoolTaskRunner` (the pool kept across batches) and the same items serially
in the worker process. The subflows are the user's own (tests/usercode/userwork)."""

from __future__ import annotations

import time

from prefect import task
from userwork.heavy import warm_cpu_batch
from userwork.tasks import burn, cpu_batch


@task
def timed_batch(items: list[int], milliseconds: float, runner: str) -> dict:
    """One batch through the subflow on `runner` ("warm", "plain") or "serial"; seconds."""
    t0 = time.perf_counter()
    if runner == "serial":
        got = [burn(i, milliseconds) for i in items]
    elif runner == "warm":
        got = warm_cpu_batch(items, milliseconds)
    else:
        got = cpu_batch(items, milliseconds)
    seconds = time.perf_counter() - t0
    if got != [i * i for i in items]:
        raise RuntimeError(f"{runner}: wrong results")
    return {"runner": runner, "items": len(items), "milliseconds": milliseconds, "seconds": seconds}
