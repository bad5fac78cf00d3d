"""Pattern 3 marked for a warm process pool: the same subflow as `tasks.cpu_batch`,
with the one documented change that keeps its pool across batches on a task worker; and
`cpu_census`, a CPU-heavy flow the chart registers as a deployment (`deployments` values)
to run in a pod of its own size."""

from __future__ import annotations

import os
import socket

from prefect import flow, task
from prefect.deployments import run_deployment

from fanout.cpu import available_cpus
from fanout.processpool import WarmProcessPoolTaskRunner
from userwork.tasks import burn, cpu_item


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


# --- a CPU-heavy flow of the user's own, run as a deployment in a pod of its own size ----


@task
def census_item(item: int, milliseconds: float = 300.0) -> dict:
    """One CPU-bound element; says which process ran it."""
    return {"item": item, "value": burn(item, milliseconds), "pid": os.getpid()}


@flow(task_runner=WarmProcessPoolTaskRunner())
def cpu_census(n: int = 8, milliseconds: float = 300.0) -> dict:
    """CPU-bound elements on a process pool over every CPU this pod is given (its CPU
    limit, not the node's cores): the results, and which processes and host ran them."""
    done = [f.result() for f in [census_item.submit(i, milliseconds) for i in range(n)]]
    pids = sorted({d["pid"] for d in done})
    return {
        "values": [d["value"] for d in done],
        "pids": pids,
        "processes": len(pids),
        "cpus": available_cpus(),
        "host": socket.gethostname(),
    }


def run_census(deployment: str, n: int = 8, milliseconds: float = 300.0, timeout: float = 600) -> dict:
    """What a user runs: the deployment (its pod size comes from the deployment's job
    variables), waited for; its final state and result."""
    run = run_deployment(deployment, parameters={"n": n, "milliseconds": milliseconds}, timeout=timeout)
    return {
        "flow_run": str(run.id),
        "flow_run_name": run.name,
        "state": run.state.name if run.state else None,
        "result": run.state.result(raise_on_failure=False) if run.state and run.state.is_completed() else None,
    }
