"""Fixes to Prefect's client side, installed in every process of the stack.

This module reaches into Prefect's private internals, on purpose and only here (its
guard tests are `tests/unit/test_internals.py`): a Prefect upgrade that changes them
fails those tests instead of silently bringing a hang back. `install()` is idempotent;
it runs from our Prefect plugin (`fanout.plugin`, at `import prefect` when
`PREFECT_PLUGINS_ENABLED=true`, as in our image, chart and local stack) and when our
worker starts. What it fixes, each measured on prefect 3.8.8 and checked again on 3.9.1:

1. **Futures that wait forever.** `PrefectDistributedFuture.result()`/`result_async()`
   read the run's state and, if it is not final, wait for a terminal-state *event* on a
   websocket the `TaskRunWaiter` opens without waiting for it to be connected. An
   event published before that subscription exists, and not yet written to the events
   table its backfill reads, is never seen: the future waits forever although the API
   shows the run Completed (11 of 18 small fan-outs with the batched task-run recorder;
   also after a server restart, whose in-memory event stream is gone). We keep the
   events and add a poll: every `FANOUT_WAIT_POLL_SECONDS` (default 2) one API read of
   the states of every run this process waits on; a final state found there wakes the
   waiter exactly as its event would have.
2. **A `.delay()` during a server restart fails at once.** Prefect's HTTP client
   retries a refused connection only once *that client object* has connected before
   (so that a wrong URL fails fast), and `.delay()` builds a fresh client for every
   call. We make "has connected" a fact of the process: once any client of this
   process reached the API, a refused connection is retried with Prefect's usual
   backoff (5 retries: 2+4+8+16+32 s), so a `.delay()` made while the server restarts
   succeeds once it is back.
3. **Every flow run ends up to 1 s late.** A flow run's heartbeat thread sleeps in
   whole seconds and is joined when the run ends, so every flow run, a process-pool
   subflow in a task worker included, returned on average ~0.5 s (at most 1 s) after
   its work was done: ~10% of a batch of 40 items of 200 ms on 2 CPUs. Our heartbeat
   thread emits the same heartbeats, at the same interval, and stops at once.
4. **A process pool's task runs each carry the sender's settings.** Since 3.9,
   `ProcessPoolTaskRunner.submit` serialises the run context, settings included, on every
   submit, and each pool process rebuilds a Settings object from them per task run.
   `ContextSubmitter` submits with a context serialised once per flow run, without
   settings (`without_settings`), and this process's environment (see
   `fanout.processpool`).
5. **A Completed run's result read too early.** Prefect sets a task run Completed before
   it writes the result (the write commits the run's transaction), and a future reads the
   result as soon as it sees the state, retrying for 2.5 s (10 x 0.25 s). A result whose
   write waits out an object store that restarts (boto3's retries, `fanout.storage`) takes
   longer: `.result()` raised a storage error for a run that completed. The retries cover
   `settings.RESULT_PATIENCE` (what `fanout.fan_out` waits too), every 0.5 s; a result that
   really is missing raises after that time instead of at once.

Also here, so that no other module touches a private name: `subscribe` and
`unsubscribe`, the worker's own use of Prefect's `Subscription` (connect, and close
without an ack, which makes the server re-queue the run it offered), `final_states_seen`, the
terminal states this process's `TaskRunWaiter` has received on the events websocket (the
fan-out API takes its runs' outcomes from there as soon as they happen, instead of
waiting for the server's batched task-run recorder to write them, up to a second later),
and `sync_result` and
`load_block`, which call Prefect's dual sync/async methods with its private `_sync`
switch (from a plain thread under an async flow, where the dispatch would otherwise
hand back a coroutine).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio

log = logging.getLogger("fanout.internals")

_INSTALLED = threading.Event()
_CONNECTED = threading.Event()  # some client of this process has reached the API
POLL_PAGE = 200


def install() -> None:
    """Install the fixes into this process's Prefect (once)."""
    if _INSTALLED.is_set():
        return
    _install_waiter_poll()
    _install_connect_retry()
    _install_prompt_heartbeats()
    _install_result_patience()
    _INSTALLED.set()


RESULT_READ_EVERY = 0.5  # seconds between reads of a Completed run's result not there yet


def _install_result_patience() -> None:
    import prefect.states

    from fanout.settings import RESULT_PATIENCE

    prefect.states.RESULT_READ_RETRY_DELAY = RESULT_READ_EVERY
    prefect.states.RESULT_READ_MAXIMUM_ATTEMPTS = max(
        prefect.states.RESULT_READ_MAXIMUM_ATTEMPTS, int(RESULT_PATIENCE / RESULT_READ_EVERY)
    )


def without_settings(context: dict[str, Any]) -> dict[str, Any]:
    """A serialised run context minus the sender's Prefect settings.

    Prefect rebuilds a whole Settings object from them for every task run that receives
    them: every nested settings model looks for .env and profile files again, over half
    of a task run's CPU (measured with py-spy). The receiving process's own environment
    is the one that applies (a worker's pod, a pool process started by this one).
    """
    return {k: v for k, v in context.items() if k != "settings_context"}


def task_key_of(fn: Any) -> str:
    """Prefect's task key of a task or plain function: `<name>-<hash of its code>`."""
    from prefect import Task
    from prefect.tasks import _generate_task_key

    return fn.task_key if isinstance(fn, Task) else _generate_task_key(fn)


def set_task_key(task: Any, key: str) -> None:
    """Give a task the key workers subscribe to (Prefect derives it from the function,
    which for our generated chunk tasks is the same code for every user function)."""
    task.task_key = key


# -- 1. futures that wait forever -----------------------------------------------------


def _waited_ids(waiter: Any) -> list[uuid.UUID]:
    """Task runs someone in this process waits on (futures, done callbacks)."""
    with waiter._completion_events_lock:
        return list({*waiter._completion_events, *waiter._completion_callbacks})


def _observe(waiter: Any, task_run_id: uuid.UUID, state: Any) -> None:
    """What TaskRunWaiter's event consumer does for a terminal event (on its loop)."""
    with waiter._observed_completed_task_runs_lock:
        waiter._observed_completed_task_runs[task_run_id] = state
    with waiter._completion_events_lock:
        if task_run_id in waiter._completion_events:
            waiter._completion_events[task_run_id].set()
        callback = waiter._completion_callbacks.pop(task_run_id, None)
    if callback is not None:
        callback()


async def _poll_states(waiter: Any) -> None:
    """Forever: read the states of the runs waited on; wake the waiters of final ones."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    from fanout.settings import wait_poll_seconds

    interval = wait_poll_seconds()
    async with get_client() as client:
        while True:
            await asyncio.sleep(interval)
            ids = _waited_ids(waiter)
            try:
                for i in range(0, len(ids), POLL_PAGE):
                    page = ids[i : i + POLL_PAGE]
                    flt = TaskRunFilter(id=TaskRunFilterId(any_=page))
                    for run in await client.read_task_runs(task_run_filter=flt, limit=len(page)):
                        if run.state is not None and run.state.is_final():
                            _observe(waiter, run.id, run.state)
            except Exception as exc:  # noqa: BLE001 - the server may be restarting; poll again
                log.debug("task-run state poll failed: %s", exc)


def _install_waiter_poll() -> None:
    from prefect.task_runs import TaskRunWaiter

    original_start = TaskRunWaiter.start
    original_stop = TaskRunWaiter.stop

    def start(self: Any) -> None:
        started = self._started
        original_start(self)
        if not started and self._started and self._loop is not None:
            self._fanout_poller = self._loop.create_task(_poll_states(self))

    def stop(self: Any) -> None:
        poller = getattr(self, "_fanout_poller", None)
        if poller is not None:
            poller.cancel()
            self._fanout_poller = None
        original_stop(self)

    TaskRunWaiter.start = start  # type: ignore[method-assign]
    TaskRunWaiter.stop = stop  # type: ignore[method-assign]


# -- 2. a .delay() during a server restart ---------------------------------------------


def _has_connected_get(self: Any) -> bool:
    return bool(self.__dict__.get("_fanout_has_connected")) or _CONNECTED.is_set()


def _has_connected_set(self: Any, value: bool) -> None:
    self.__dict__["_fanout_has_connected"] = value
    if value:
        _CONNECTED.set()


def _install_connect_retry() -> None:
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

    for cls in (PrefectHttpxAsyncClient, PrefectHttpxSyncClient):
        cls._has_connected = property(_has_connected_get, _has_connected_set)  # type: ignore[attr-defined]


# -- 3. flow runs that end late ---------------------------------------------------------


@contextmanager
def prompt_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Prefect's flow-run heartbeats (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, default 180 s)
    from a thread that stops as soon as the run's body is done, instead of within 1 s."""
    seconds = engine.heartbeat_seconds
    if seconds is None:
        yield
        return
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run is not None and run.state is not None and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # noqa: BLE001 - a missed heartbeat must not fail the run
                log.debug("flow run heartbeat not sent", exc_info=True)
            stop.wait(seconds)

    # The thread sees this thread's settings (its API URL), as Prefect's does.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def _install_prompt_heartbeats() -> None:
    import prefect.flow_engine

    prefect.flow_engine._send_heartbeats = prompt_heartbeats  # type: ignore[assignment]


# -- 4. process-pool submissions with a context serialised once ------------------------


def pool_executor(runner: Any) -> Any:
    """The `ProcessPoolExecutor` of a started `ProcessPoolTaskRunner` (None before start):
    the warm pool checks it for a dead process and warms its processes up."""
    return runner._executor


class ContextSubmitter:
    """Submits task runs to a started `ProcessPoolTaskRunner` with the serialised run
    `context` and `env` given, instead of serialising them again on every submit."""

    def __init__(self, runner: Any, context: dict[str, Any], env: dict[str, str]) -> None:
        self.runner, self.context, self.env = runner, context, env

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        """`ProcessPoolTaskRunner.submit` minus its per-submit `serialize_context()`."""
        from prefect._internal.uuid7 import uuid7
        from prefect.futures import PrefectConcurrentFuture
        from prefect.task_runners import _ChainedFuture, _UnpicklingFuture

        runner = self.runner
        if not runner._started or runner._executor is None or runner._resolver_executor is None:
            raise RuntimeError("Task runner is not started")
        task_run_id = uuid7()
        resolution = runner._resolver_executor.submit(
            runner._resolve_futures_and_submit,
            task=task,
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=wait_for,
            dependencies=dependencies,
            context=self.context,
            env=self.env,
        )
        return PrefectConcurrentFuture(
            task_run_id=task_run_id, wrapped_future=_UnpicklingFuture(_ChainedFuture(resolution))
        )


def sync_result(state: Any) -> Any:
    """`state.result(raise_on_failure=False)`, synchronously from any thread: a failed
    run's exception is returned, not raised."""
    return state.result(raise_on_failure=False, _sync=True)


def load_block(block_class: Any, name: str) -> Any:
    """`block_class.load(name)`, synchronously from any thread."""
    return block_class.load(name, _sync=True)


def final_states_seen(ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """The terminal states, among the task runs `ids`, that this process's TaskRunWaiter
    has received as events (it starts listening on the first call). Events can be missed
    (see fix 1): a caller must keep reading the API too."""
    from prefect.task_runs import TaskRunWaiter

    waiter = TaskRunWaiter.instance()
    with waiter._observed_completed_task_runs_lock:
        seen = waiter._observed_completed_task_runs
        return {i: seen[i] for i in ids if i in seen}


async def subscribe(sub: Any) -> Any:
    """`sub`'s websocket, connected (authenticated and subscribed) if it was not."""
    await sub._ensure_connected()
    return sub.websocket


async def unsubscribe(sub: Any) -> None:
    """Close `sub`'s websocket, if open; the next `subscribe` connects again. The server
    re-queues, first in line, a run it offered and whose ack it had not received."""
    websocket = forget_connection(sub)
    if websocket is not None:
        with anyio.move_on_after(2):  # a server that does not answer the close is gone anyway
            await websocket.close()


def forget_connection(sub: Any) -> Any:
    """Drop `sub`'s websocket without closing it (it failed), and return it; the next
    `subscribe` connects again."""
    websocket, sub._websocket = sub._websocket, None
    return websocket


def migration_revisions() -> tuple[set[str], set[str]]:
    """(the head revisions of this Prefect's migrations for the configured database's
    dialect, every revision it knows there), read from the migration files. Used with
    `database_revision` by the chart's API and services pods to wait for the migrations Job
    (`fanout.migrations`); Prefect's own check runs the migrations instead, which two API
    replicas must not do at once (Prefect takes no database lock around them)."""
    from alembic.script import ScriptDirectory
    from prefect.server.database import provide_database_interface
    from prefect.server.database.alembic_commands import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    versions = ScriptDirectory(script.dir, version_locations=[str(provide_database_interface().orm.versions_dir)])
    return set(versions.get_heads()), {r.revision for r in versions.walk_revisions()}


async def database_revision() -> set[str]:
    """The revisions the Prefect database is at; empty: not migrated yet."""
    from prefect.server.database import provide_database_interface
    from sqlalchemy import exc, text

    engine = await provide_database_interface().engine()
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT version_num FROM alembic_version"))
            return {r[0] for r in rows}
    except (exc.ProgrammingError, exc.OperationalError) as e:
        if "alembic_version" in str(e):  # no such table: an empty database
            return set()
        raise
