"""The Celery peer of `make bench`: one task running the same per-item functions."""

from __future__ import annotations

import os
import time

from celery import Celery

from fanout_demo import workload

BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=BROKER, backend=BROKER)
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=False, result_expires=600, broker_pool_limit=32)


@app.task(name="bench.run_item")
def run_item(work: str, item: int, sleep_s: float) -> dict:
    if sleep_s:
        time.sleep(sleep_s)
    return workload.WORK[work](item)
