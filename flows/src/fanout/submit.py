"""Submit many background task runs at once.

`task.delay()` pays fixed costs on every call that have nothing to do with the run
(measured with cProfile on prefect 3.8.8): a fresh API client for the call and another
one to resolve the task's result storage (each loads the CA bundle, ~35-55 ms), and a
serialisation of the whole settings object into the run's context (~50-100 ms of CPU),
then one HTTP create. For a fan-out of thousands that is most of the wall time.

`submit_many` creates exactly the same deferred task runs (parameters in the task's
storage, SCHEDULED state, the same event Prefect emits unless `FANOUT_SCHEDULED_EVENTS=0`)
through Prefect's own
`Task.create_run`, but with one shared client (an `AsyncClientContext`, which Prefect's
`get_client()` returns inside it), the task's storage resolved once, the run context
serialised once per batch (it cannot change during one), and `concurrency` creates in
flight at a time (32 by default: 1,000 unchunked runs went at 25-29 runs/s against 23 with
16; the server does less work per run when its requests and events come in bunches;
Prefect's client puts at most 16 of them on the wire at once, the others wait ready).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

import cloudpickle
import prefect.tasks
from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.context import AsyncClientContext, serialize_context
from prefect.results import aresolve_result_storage
from prefect.utilities.engine import emit_task_run_state_change_event

from fanout import settings
from fanout.internals import without_settings

# Parameters of one task run larger than this are refused before anything is submitted:
# they go through shared storage and the worker's memory once per run, and a fan-out item
# that big belongs in storage, passed by reference.
MAX_PARAMETER_BYTES = settings.max_parameter_bytes()


def scheduled_events() -> bool:
    """Whether to emit Prefect's `prefect.task-run.Scheduled` event for each run created
    (`FANOUT_SCHEDULED_EVENTS`, default 1, as `.delay()` does). The create itself records
    the Scheduled state; the event only feeds the event log and automations. With 0 the
    server does about 5 ms less work per run (15-20% more unchunked runs per second when
    its triggers service is off too; see the README, Benchmark)."""
    return os.environ.get("FANOUT_SCHEDULED_EVENTS", "1") != "0"


class PayloadTooLarge(ValueError):
    """The parameters of a call are over MAX_PARAMETER_BYTES; nothing was submitted."""


def check_payloads(task: Task[..., Any], calls: Sequence[dict[str, Any]], limit: int | None = None) -> None:
    """Refuse the whole batch, naming the call, if any call's parameters are too large."""
    limit = MAX_PARAMETER_BYTES if limit is None else limit
    for i, parameters in enumerate(calls):
        size = len(cloudpickle.dumps(parameters))
        if size > limit:
            raise PayloadTooLarge(
                f"parameters of {task.name} call #{i} are {size:,} bytes, over the {limit:,}-byte limit "
                "(FANOUT_MAX_PARAMETER_BYTES); nothing was submitted. Pass large data by reference "
                "(a path or key in shared storage)."
            )


# `prefect.tasks` looks `serialize_context` up as a module global on every create_run;
# this lock keeps two concurrent batches in one process from swapping each other's.
_PATCH_LOCK = threading.Lock()


class PicklesOnce(dict[str, Any]):
    """A dict that is pickled once, up front: each run's stored parameters embed these
    bytes instead of pickling the dict again. A run context is worth it: it holds the
    parent flow, pickled by value when the flow runs as `__main__`, and pickling the
    parameters with it was 7% of the submitter's py-spy samples. It unpickles as a plain
    dict."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.blob = cloudpickle.dumps(dict(data))

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return cloudpickle.loads, (self.blob,)


@contextlib.contextmanager
def _context_serialized_once() -> Iterator[None]:
    """Serialise the caller's run context once and hand that copy to every create_run.

    Without the submitter's settings: our worker drops them anyway and runs with its own
    (see `fanout_demo.tasks.without_settings`), so they would be pickled and stored for nothing.
    """
    frozen = PicklesOnce(without_settings(serialize_context()))
    with _PATCH_LOCK:
        original = prefect.tasks.serialize_context
        prefect.tasks.serialize_context = lambda *a, **k: frozen if not (a or k) else original(*a, **k)
        try:
            yield
        finally:
            prefect.tasks.serialize_context = original


async def _submit_all(
    task: Task[..., Any], calls: Sequence[dict[str, Any]], concurrency: int
) -> list[TaskRun | Exception]:
    gate = asyncio.Semaphore(concurrency)
    emit = scheduled_events()
    async with AsyncClientContext() as ctx:
        client = ctx.client
        if task.result_storage is not None:
            # A shallow copy: the caller's task keeps its configuration (with_options
            # would refuse an unsaved block such as a LocalFileSystem for a Path).
            task = copy.copy(task)
            task.result_storage = await aresolve_result_storage(task.result_storage)

        async def one(parameters: dict[str, Any]) -> TaskRun | Exception:
            async with gate:
                try:
                    run = await task.create_run(client=client, parameters=parameters, deferred=True)
                except Exception as exc:  # noqa: BLE001 - reported per call, never lost
                    return exc
                if emit:
                    emit_task_run_state_change_event(task_run=run, initial_state=None, validated_state=run.state)
                return run

        return list(await asyncio.gather(*(one(p) for p in calls)))


def submit_many(task: Task[..., Any], calls: Sequence[dict[str, Any]], concurrency: int = 32) -> list[UUID | Exception]:
    """Create one deferred run of `task` per parameter dict (the task's parameter names
    as keys, as `delay(**kwargs)` would bind them); returns, in order, each run's id or
    the exception that prevented its creation, so the caller can account for every item.
    Raises PayloadTooLarge, before creating any run, if one call's parameters are too big.
    """
    return [r if isinstance(r, Exception) else r.id for r in create_runs(task, calls, concurrency)]


def create_runs(
    task: Task[..., Any], calls: Sequence[dict[str, Any]], concurrency: int = 32
) -> list[TaskRun | Exception]:
    """`submit_many`, returning the created runs (their Scheduled state names where the
    parameters were stored: `state.state_details.task_parameters_id`)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not calls:
        return []
    check_payloads(task, calls)
    with _context_serialized_once():
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: called from a sync flow
            return asyncio.run(_submit_all(task, calls, concurrency))
        # Called from async code: run on a private loop in a thread, with the caller's
        # context (flow run, settings) so the runs are linked to the parent flow run.
        ctx = contextvars.copy_context()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(ctx.run, asyncio.run, _submit_all(task, calls, concurrency)).result()
