"""Prefect's recommended fan-out patterns, written the way Prefect documents them.

No `result_storage=`, no imports of the stack's package: this is what a user brings.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from prefect import flow, task
from prefect.task_runners import ProcessPoolTaskRunner


def burn(item: int, milliseconds: float) -> int:
    """CPU-bound work for about `milliseconds`; a result that depends only on `item`."""
    end = time.process_time() + milliseconds / 1000
    while time.process_time() < end:
        sum(i * i for i in range(500))
    return item * item


@task
def square(x: int, sleep: float = 0.0) -> dict:
    """Pattern 2's task: sync; `sleep` keeps it busy for kill tests."""
    if sleep:
        time.sleep(sleep)
    return {"item": x, "value": x * x, "worker": f"{socket.gethostname()}-{os.getpid()}"}


@task
async def asquare(x: int, sleep: float = 0.0) -> dict:
    """Pattern 1's task: async."""
    if sleep:
        await asyncio.sleep(sleep)
    return {"item": x, "value": x * x, "worker": f"{socket.gethostname()}-{os.getpid()}"}


@task
def explode(x: int) -> int:
    """Always raises, naming its input."""
    raise ValueError(f"cannot handle item {x}")


@task
def cpu_item(item: int, milliseconds: float = 5.0) -> int:
    """One element of a CPU-heavy batch."""
    return burn(item, milliseconds)


@flow(task_runner=ProcessPoolTaskRunner(max_workers=2))
def cpu_batch(items: list[int], milliseconds: float = 5.0) -> list[int]:
    """Pattern 3: CPU parallelism on one machine, a task per element on a process pool."""
    futures = [cpu_item.submit(i, milliseconds) for i in items]
    return [f.result() for f in futures]


@task
def run_cpu_batch(items: list[int], milliseconds: float = 5.0) -> list[int]:
    """Flows have no .delay(): a task that calls the subflow is what gets fanned out."""
    return cpu_batch(items, milliseconds)


@flow
async def async_fanout(n: int, sleep: float = 0.0) -> list[dict]:
    futures = [asquare.with_options(name=f"asquare-{i}").delay(i, sleep) for i in range(n)]
    return await asyncio.gather(*(f.result_async() for f in futures))


@flow
def sync_fanout(n: int, sleep: float = 0.0) -> list[dict]:
    futures = [square.delay(i, sleep) for i in range(n)]
    return [f.result() for f in futures]


@flow
def batch_fanout(n: int, batch: int = 10, milliseconds: float = 5.0) -> list[int]:
    batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    futures = [run_cpu_batch.delay(b, milliseconds) for b in batches]
    return [x for f in futures for x in f.result()]


@flow
def explode_fanout() -> str:
    try:
        explode.delay(7).result()
    except ValueError as exc:
        return f"raised: {exc}"
    return "did not raise"


@flow
def paced_fanout(n: int, gap: float = 0.2, sleep: float = 0.0) -> list[dict]:
    """Submits one item every `gap` seconds (a submitter still submitting while
    something happens to the server), then waits for all."""
    futures = []
    for i in range(n):
        futures.append(square.delay(i, sleep))
        time.sleep(gap)
    return [f.result() for f in futures]
