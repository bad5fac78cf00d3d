"""Chunk tasks: many items of a user's function in one Prefect task run.

A Prefect task run costs tens of milliseconds of server, worker and submitter CPU,
whatever its body does; an item of real work often costs less. A chunk task runs a
user's function over a slice of the items in one task run, so that cost is paid per
chunk, not per item, and every item still gets its own outcome:

- one item that raises never sinks its chunk: the others' results come back, and the
  task run is marked Failed (where users look: UI, API) with `ChunkFailed`, which
  carries both the results and each failed item's reason;
- the task run is named after the function and its item range (`resize[0:100]`).

Workers and submitters build the same chunk task from the same function
(`chunk_task(fn)`, cached), and its task key is derived from the function's own key,
so it embeds a hash of the function's code exactly as Prefect's keys do: a worker serves
the chunks of exactly the code it runs.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun

from fanout.internals import set_task_key, task_key_of

CHUNK_SUFFIX = ".chunks"
log = logging.getLogger("fanout.worker")


def log_finished(task: Task[..., Any], run: TaskRun, state: State) -> None:
    """One log line per finished task run (a chunk, or any task that uses it as a hook), on
    the worker that ran it: `resize[0:20] Completed in 0.08s`."""
    took = ""
    if run.start_time is not None:
        took = f" in {(state.timestamp - run.start_time).total_seconds():.2f}s"
    reason = f": {state.message}" if state.is_failed() and state.message else ""
    log.info("%s %s%s%s", run.name, state.name, took, reason)


class ChunkFailed(Exception):
    """Some items of a chunk raised; carries the results of the others.

    `results` maps item index -> result, `errors` item index -> reason. Raising (rather
    than returning the errors) marks the task run Failed where users look, while the
    parent still gets every good result of the chunk.
    """

    def __init__(self, results: dict[int, Any], errors: dict[int, str]) -> None:
        super().__init__(results, errors)
        self.results = results
        self.errors = errors

    def __repr__(self) -> str:  # Prefect logs repr(exc): keep the results out of it
        return f"ChunkFailed({str(self)!r})"

    def __str__(self) -> str:
        shown = "; ".join(f"item {i}: {e}" for i, e in list(self.errors.items())[:5])
        more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        return f"{len(self.errors)} of {len(self.errors) + len(self.results)} items failed: {shown}{more}"


def function_of(fn: Callable[..., Any] | Task[..., Any]) -> Callable[..., Any]:
    """The plain function behind a Prefect task (or the function itself)."""
    return fn.fn if isinstance(fn, Task) else fn


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@functools.cache
def _chunk_task_cached(fn: Callable[..., Any]) -> Task[..., Any]:
    call = function_of(fn)
    name = getattr(call, "__name__", "items")

    if inspect.iscoroutinefunction(call):

        async def run_chunk(start: int, stop: int, items: list[Any]) -> dict[int, Any]:
            outcomes = await asyncio.gather(*(call(item) for item in items), return_exceptions=True)
            return _settle(start, outcomes)

    else:

        def run_chunk(start: int, stop: int, items: list[Any]) -> dict[int, Any]:  # type: ignore[misc]
            outcomes: list[Any] = []
            for item in items:
                try:
                    outcomes.append(call(item))
                except Exception as exc:  # noqa: BLE001 - reported per item to the parent
                    outcomes.append(exc)
            return _settle(start, outcomes)

    task = Task(
        fn=run_chunk,
        name=f"{name}{CHUNK_SUFFIX}",
        task_run_name=name + "[{start}:{stop}]",
        persist_result=True,
        retries=0,
        on_completion=[log_finished],
        on_failure=[log_finished],
    )
    set_task_key(task, chunk_key(fn))
    return task


def _settle(start: int, outcomes: list[Any]) -> dict[int, Any]:
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    for i, value in enumerate(outcomes, start):
        if isinstance(value, BaseException):
            errors[i] = describe(value)
        else:
            results[i] = value
    if errors:
        raise ChunkFailed(results, errors)
    return results


def chunk_task(fn: Callable[..., Any] | Task[..., Any]) -> Task[..., Any]:
    """The Prefect task that runs `fn` over a chunk of items (one per process and fn)."""
    return _chunk_task_cached(fn)


def chunk_key(fn: Callable[..., Any] | Task[..., Any]) -> str:
    """`<name>.chunks-<hash of fn's code>`: what a worker serving fn's chunks subscribes to."""
    name, _, code_hash = task_key_of(fn).rpartition("-")
    return f"{name}{CHUNK_SUFFIX}-{code_hash}"
