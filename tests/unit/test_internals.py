"""Guard tests for `fanout.internals`: the private Prefect internals our fixes rely on.

When a Prefect upgrade renames or reshapes one of them, these fail first, naming it,
instead of a fix silently no longer applying (and futures hanging again).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid

import prefect._internal.compatibility.async_dispatch
import prefect.flow_engine
import pytest
from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient
from prefect.states import Completed
from prefect.task_runners import ProcessPoolTaskRunner
from prefect.task_runs import TaskRunWaiter

from fanout import internals
from fanout.liveness import task_name, unserved_reason
from fanout.storage import prefect_storage_env


def test_task_run_waiter_has_what_the_poll_uses() -> None:
    waiter = TaskRunWaiter()
    for attr in (
        "_completion_events",
        "_completion_events_lock",
        "_completion_callbacks",
        "_observed_completed_task_runs",
        "_observed_completed_task_runs_lock",
        "_loop",
        "_started",
    ):
        assert hasattr(waiter, attr), f"TaskRunWaiter.{attr} is gone: fanout.internals needs updating"
    assert {"start", "stop", "wait_for_task_run", "instance"} <= set(dir(TaskRunWaiter))


def test_an_observed_final_state_wakes_its_waiter_and_callback() -> None:
    waiter = TaskRunWaiter()
    run_id, other = uuid.uuid4(), uuid.uuid4()
    called: list[uuid.UUID] = []

    async def scenario() -> None:
        event = asyncio.Event()
        waiter._completion_events[run_id] = event
        waiter._completion_callbacks[other] = lambda: called.append(other)
        assert set(internals._waited_ids(waiter)) == {run_id, other}
        internals._observe(waiter, run_id, Completed())
        internals._observe(waiter, other, Completed())
        assert event.is_set()

    asyncio.run(scenario())
    assert called == [other]
    assert waiter._observed_completed_task_runs[run_id].is_completed()
    assert internals._waited_ids(waiter) == [run_id]  # the callback is gone once called


def test_prefect_clients_still_gate_connect_retries_on_has_connected() -> None:
    for cls in (PrefectHttpxAsyncClient, PrefectHttpxSyncClient):
        assert "self._has_connected" in inspect.getsource(cls), f"{cls.__name__} no longer uses _has_connected"


def test_has_connected_becomes_a_fact_of_the_process() -> None:
    internals.install()
    a = PrefectHttpxSyncClient(base_url="http://127.0.0.1:9")
    assert a._has_connected is internals._CONNECTED.is_set()
    a._has_connected = True  # what Prefect does after a first successful request
    b = PrefectHttpxSyncClient(base_url="http://127.0.0.1:9")
    assert b._has_connected, "a fresh client retries a refused connection once the process has connected"


def test_flow_engines_still_send_heartbeats_through_the_function_we_replace() -> None:
    internals.install()
    assert prefect.flow_engine._send_heartbeats is internals.prompt_heartbeats
    src = inspect.getsource(prefect.flow_engine)
    assert src.count("with _send_heartbeats(self") >= 2, "the flow engines no longer call _send_heartbeats"
    for name in ("heartbeat_seconds", "_build_heartbeat_event_template", "_emit_flow_run_heartbeat", "flow_run"):
        assert hasattr(prefect.flow_engine.FlowRunEngine, name), f"FlowRunEngine.{name} is gone"


class _Engine:
    """The part of a flow-run engine a heartbeat thread reads."""

    heartbeat_seconds = 30
    flow_run = None

    def __init__(self) -> None:
        self.beats = 0

    def _build_heartbeat_event_template(self) -> tuple[dict, list]:
        return {"prefect.resource.id": "prefect.flow-run.x"}, []

    def _emit_flow_run_heartbeat(self, resource: dict, related: list) -> None:
        self.beats += 1


def test_a_flow_run_ends_as_soon_as_its_body_is_done() -> None:
    engine = _Engine()
    with internals.prompt_heartbeats(engine):
        deadline = time.monotonic() + 10
        while engine.beats == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.beats == 1, "one heartbeat as the run starts, as Prefect sends"
        t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 0.5, "the heartbeat thread held the run's end (Prefect's waits up to 1 s)"


def test_process_pool_runner_internals_the_warm_pool_uses() -> None:
    # fanout.internals.ContextSubmitter is ProcessPoolTaskRunner.submit (3.9.1) with the run
    # context given instead of serialised per submit: what it calls must still exist.
    from prefect._internal.uuid7 import uuid7
    from prefect.task_runners import _ChainedFuture, _UnpicklingFuture

    assert callable(uuid7) and _ChainedFuture and _UnpicklingFuture
    runner = ProcessPoolTaskRunner(max_workers=2)
    for attr in ("_executor", "_resolver_executor", "_started", "_max_workers", "_initializer", "_initargs"):
        assert hasattr(runner, attr), f"ProcessPoolTaskRunner.{attr} is gone: update fanout.internals"
    params = inspect.signature(ProcessPoolTaskRunner._resolve_futures_and_submit).parameters
    assert list(params) == [
        "self",
        "task",
        "task_run_id",
        "parameters",
        "wait_for",
        "dependencies",
        "context",
        "env",
    ], "ProcessPoolTaskRunner._resolve_futures_and_submit changed: fanout.processpool needs updating"
    source = inspect.getsource(ProcessPoolTaskRunner.submit)
    assert "self._resolver_executor.submit(" in source and "_UnpicklingFuture(chained_future)" in source


def test_without_settings_drops_only_the_senders_settings() -> None:
    ctx = {"settings_context": {"x": 1}, "flow_run_context": {"y": 2}}
    assert internals.without_settings(ctx) == {"flow_run_context": {"y": 2}}


@pytest.mark.parametrize(
    ("value", "env"),
    [
        ("", {}),
        ("/srv/shared", {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/srv/shared"}),
        (
            "s3-bucket/fanout",
            {
                "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "s3-bucket/fanout",
                "PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK": "s3-bucket/fanout",
                "AWS_RETRY_MODE": "standard",
                "AWS_MAX_ATTEMPTS": "10",
            },
        ),
    ],
)
def test_prefect_default_storage_follows_fanout_storage(
    monkeypatch: pytest.MonkeyPatch, value: str, env: dict[str, str]
) -> None:
    monkeypatch.setenv("FANOUT_STORAGE", value)
    assert prefect_storage_env() == env


def test_an_unserved_task_key_is_explained() -> None:
    assert task_name("square-0a1b2c") == "square"
    assert unserved_reason("square-aaa", {"square-aaa", "cube-bbb"}) is None
    other_code = unserved_reason("square-aaa", {"square-bbb", "cube-ccc"})
    assert other_code is not None
    assert "code differs between the submitter and the workers" in other_code and "square-bbb" in other_code
    assert "cube-ccc" not in other_code
    nobody = unserved_reason("square-aaa", {"cube-ccc"})
    assert nobody is not None and "live workers serve: cube-ccc" in nobody and "--tasks module:square" in nobody
    assert "no live worker" in (unserved_reason("square-aaa", set()) or "")


def test_future_result_reads_retry_through_the_constants_we_raise() -> None:
    import prefect.states

    code = prefect.states._get_state_result_data_with_retries.__code__
    assert {"RESULT_READ_MAXIMUM_ATTEMPTS", "RESULT_READ_RETRY_DELAY"} <= set(code.co_names)
    internals.install()
    assert prefect.states.RESULT_READ_MAXIMUM_ATTEMPTS * prefect.states.RESULT_READ_RETRY_DELAY >= 180


def test_a_result_written_late_is_still_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Completed state whose result cannot be read for its first 30 attempts (Prefect
    alone gives up after 10): the read returns it."""
    import prefect.states

    internals.install()
    monkeypatch.setattr(prefect.states, "RESULT_READ_RETRY_DELAY", 0)
    reads = []

    class LateData:
        async def get(self) -> int:
            reads.append(1)
            if len(reads) <= 30:
                raise FileNotFoundError("not written yet")
            return 7

    state = Completed(data=LateData())
    assert asyncio.run(prefect.states._get_state_result_data_with_retries(state)) == 7
    assert len(reads) == 31


def test_sync_result_is_synchronous_inside_a_running_event_loop() -> None:
    """`fanout.api` reads results from a plain thread under an async flow: Prefect's
    dispatch, which looks at the running loop, would hand back a coroutine there."""
    from prefect.states import Failed

    async def scenario() -> tuple[object, object]:
        # A running loop in this thread: the case the private `_sync` switch covers.
        return internals.sync_result(Completed(data=7)), internals.sync_result(Failed(message="bad"))

    value, failure = asyncio.run(scenario())
    assert value == 7
    assert not inspect.isawaitable(failure) and isinstance(failure, Exception)


def test_block_load_still_takes_the_sync_switch() -> None:
    from prefect.blocks.core import Block

    source = inspect.getsource(prefect._internal.compatibility.async_dispatch.async_dispatch)
    assert 'kwargs.pop("_sync"' in source, "async_dispatch no longer takes _sync: update fanout.internals.load_block"
    assert hasattr(Block.load, "aio"), "Block.load is no longer dual sync/async: fanout.internals.load_block"


def test_final_states_seen_are_the_waiters_observed_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fanout.api` takes a run's outcome from the state its terminal event brought: the
    one Prefect's waiter keeps for its futures (fix 1 puts polled states there too)."""
    waiter = TaskRunWaiter()
    monkeypatch.setattr(TaskRunWaiter, "instance", classmethod(lambda cls: waiter))
    seen, other, unseen = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    async def scenario() -> None:
        internals._observe(waiter, seen, Completed(data=1))
        internals._observe(waiter, other, Completed(data=2))

    asyncio.run(scenario())
    found = internals.final_states_seen([seen, unseen])
    assert set(found) == {seen}
    assert found[seen].is_completed()


def test_subscription_internals_the_worker_uses() -> None:
    """The worker connects Prefect's Subscription itself and closes it un-acked to hand an
    offer back (fanout.internals.subscribe/unsubscribe)."""
    from prefect.client.schemas.objects import TaskRun
    from prefect.client.subscriptions import Subscription

    assert inspect.iscoroutinefunction(Subscription._ensure_connected)
    sub = Subscription(
        model=TaskRun, path="/task_runs/subscriptions/scheduled", keys=["k"], base_url="http://127.0.0.1:9"
    )
    assert sub._websocket is None
    with pytest.raises(RuntimeError):
        _ = sub.websocket  # not connected
    with pytest.raises(OSError):  # what the worker rides out while the server is away
        asyncio.run(internals.subscribe(sub))
    assert internals.forget_connection(sub) is None
    asyncio.run(internals.unsubscribe(sub))  # nothing to close: a no-op


_REVISIONS = """
import asyncio, json
from fanout import internals
heads, known = internals.migration_revisions()
current = asyncio.run(internals.database_revision())
print(json.dumps([sorted(current), sorted(heads), sorted(known)]))
"""


def test_migration_and_database_revisions_read_prefects_migrations_and_an_empty_database(tmp_path) -> None:
    """The chart's API and services pods wait for the migrations Job through
    `migration_revisions` and `database_revision` (fanout.migrations): Prefect's alembic config, its per-dialect
    versions directory and the `alembic_version` table."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/empty.db"}
    out = subprocess.run(
        [sys.executable, "-c", _REVISIONS], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    current, heads, known = json.loads(out.strip().splitlines()[-1])
    assert current == [], "an empty database is at no revision"
    assert heads and set(heads) <= set(known) and len(known) > 50, (heads, len(known))
    waited = subprocess.run(
        [sys.executable, "-m", "fanout.migrations", "--timeout", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert waited.returncode == 1
    assert "not migrated within 1 s" in waited.stderr and heads[0] in waited.stderr, waited.stderr
