"""Pattern 3 marked for a warm process pool: the same subflow as `tasks.cpu_batch`,
with the one documented change that keeps its pool across batches on a task worker."""

from __future__ import annotations

from prefect import flow, task

from fanout.processpool import WarmProcessPoolTaskRunner
from userwork.tasks import cpu_item


@flow(task_runner=WarmProcessPoolTaskRunner())
def warm_cpu_batch(items: list[int], milliseconds: float = 5.0) -> list[int]:
    futures = [cpu_item.submit(i, milliseconds) for i in items]
    return [f.result() for f in futures]


@task
def run_warm_cpu_batch(items: list[int], milliseconds: float = 5.0) -> list[int]:
    return warm_cpu_batch(items, milliseconds)


@flow
def warm_batch_fanout(n: int, batch: int = 10, milliseconds: float = 5.0) -> list[int]:
    batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    futures = [run_warm_cpu_batch.delay(b, milliseconds) for b in batches]
    return [x for f in futures for x in f.result()]
