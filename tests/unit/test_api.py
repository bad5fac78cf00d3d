"""The public fan-out API without a server: chunk sizing, validation, chunk tasks and
the accounting of every item of a finished chunk."""

from __future__ import annotations

import asyncio
import pickle
import uuid
from typing import Any

import pytest
from prefect.client.schemas.objects import TaskRun
from prefect.states import Completed, Crashed, Failed

import fanout.api
from fanout import settings
from fanout.api import FanOutFailed, FanOutResult, ItemOutcome, _outcomes, _read_result, auto_chunk_size, validate
from fanout.chunks import ChunkFailed, chunk_key, chunk_task
from fanout_demo.tasks import heavy_batch, process_item


def double(x: int) -> int:
    return 2 * x


def picky(x: int) -> int:
    if x == 3:
        raise ValueError("three is right out")
    return x


async def adouble(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


def test_a_small_fan_out_uses_every_live_slot() -> None:
    assert auto_chunk_size(10, slots=16) == 1  # 10 runs of 1: every item on its own slot
    assert auto_chunk_size(16, slots=16) == 1
    assert auto_chunk_size(17, slots=16) == 2  # one run per slot: Prefect's per-run cost paid 16 times


def test_a_large_fan_out_amortises_the_per_run_cost() -> None:
    runs = -(-10_000 // auto_chunk_size(10_000, slots=16))
    assert runs <= 16 * settings.RUNS_PER_SLOT  # about RUNS_PER_SLOT runs per slot
    assert runs >= 16  # and never fewer runs than slots
    assert -(-(10**6) // auto_chunk_size(10**6, slots=1000)) <= settings.MAX_AUTO_TASK_RUNS


def test_without_live_workers_or_a_count_the_sizes_are_bounded() -> None:
    assert -(-1000 // auto_chunk_size(1000, slots=0)) <= settings.MAX_AUTO_TASK_RUNS  # pool at zero
    assert auto_chunk_size(None, slots=8) == settings.STREAM_CHUNK_SIZE  # an iterator of unknown length


@pytest.mark.parametrize(
    ("fn", "items", "chunk_size", "timeout", "named"),
    [
        (42, [1], None, 10, "fn must be a Prefect task or a function, got int"),
        (lambda x: x, [1], None, 10, "must be defined at module level"),
        (double, "abc", None, 10, "items must be an iterable of items, got str"),
        (double, 5, None, 10, "items must be an iterable of items, got int"),
        (double, [1], 0, 10, "chunk_size must be an integer >= 1"),
        (double, [1], 2.5, 10, "chunk_size must be an integer >= 1"),
        (double, [1], None, 0, "timeout must be > 0 seconds"),
        (double, range(10**6), 1, 10, "would create 1,000,000 task runs, more than 20,000"),
    ],
)
def test_bad_arguments_are_named_before_anything_is_submitted(fn, items, chunk_size, timeout, named) -> None:
    with pytest.raises(ValueError, match="invalid fan-out") as err:
        validate(fn, items, chunk_size, timeout)
    assert named in str(err.value)


def test_a_local_function_is_refused() -> None:
    def inner(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="must be defined at module level"):
        validate(inner, [1], None, 10)


def test_chunk_tasks_are_keyed_by_the_functions_code() -> None:
    assert chunk_task(double).task_key == chunk_key(double)
    assert chunk_key(double).startswith("double.chunks-")
    assert chunk_key(double) != chunk_key(picky)
    assert chunk_key(heavy_batch).startswith("heavy_batch.chunks-")  # a Prefect task's function
    assert chunk_key(heavy_batch).split("-")[-1] == heavy_batch.task_key.split("-")[-1]
    assert chunk_task(double) is chunk_task(double)  # one per process and function


def test_a_chunk_keeps_the_good_items_when_one_raises() -> None:
    run_chunk = chunk_task(picky).fn
    assert run_chunk(0, 3, [0, 1, 2]) == {0: 0, 1: 1, 2: 2}
    with pytest.raises(ChunkFailed) as err:
        run_chunk(2, 5, [2, 3, 4])
    assert err.value.results == {2: 2, 4: 4}
    assert err.value.errors == {3: "ValueError: three is right out"}


def test_an_async_function_runs_its_chunk_concurrently() -> None:
    assert asyncio.run(chunk_task(adouble).fn(5, 7, [5, 6])) == {5: 10, 6: 12}


def test_chunk_failure_survives_pickling_with_partial_results() -> None:
    exc = ChunkFailed({1: {"item": 1}}, {2: "ValueError: bad"})
    back = pickle.loads(pickle.dumps(exc))
    assert back.results == {1: {"item": 1}} and back.errors == {2: "ValueError: bad"}
    assert str(back) == "1 of 2 items failed: item 2: ValueError: bad"
    assert "item': 1" not in repr(back)  # results stay out of log lines


def run_in(state, name: str = "double[0:3]") -> TaskRun:
    return TaskRun(id=uuid.uuid4(), name=name, task_key="k", dynamic_key="d", state=state)


def outcomes(run: TaskRun, start: int, stop: int) -> list[ItemOutcome]:
    return _outcomes(run, start, stop, _read_result(run))


def test_every_item_of_a_finished_chunk_gets_one_outcome() -> None:
    done = outcomes(run_in(Completed(data={0: "a", 1: "b", 2: "c"})), 0, 3)
    assert done == [ItemOutcome(0, True, "a"), ItemOutcome(1, True, "b"), ItemOutcome(2, True, "c")]

    partial = outcomes(run_in(Failed(data=ChunkFailed({10: "x"}, {11: "ValueError: no"}))), 10, 12)
    assert partial == [ItemOutcome(10, True, "x"), ItemOutcome(11, False, error="ValueError: no")]

    crashed = outcomes(run_in(Crashed(data=RuntimeError("worker died"))), 0, 2)
    assert [o.ok for o in crashed] == [False, False]
    assert crashed[0].error == "task run double[0:3] Crashed: RuntimeError: worker died"


def test_the_result_orders_items_and_names_failures() -> None:
    result = FanOutResult("double", [ItemOutcome(0, True, 0), ItemOutcome(1, False, error="ValueError: x")])
    assert result.completed == 1 and result.failed == {1: "ValueError: x"}
    with pytest.raises(FanOutFailed, match="1 items failed: item 1: ValueError: x"):
        _ = result.values
    assert FanOutResult("double", [ItemOutcome(0, True, 5)]).values == [5]


def test_the_demo_is_a_plain_function_of_the_core() -> None:
    assert chunk_key(process_item).startswith("process_item.chunks-")


def test_a_fan_out_never_makes_more_runs_than_the_server_queues_per_task():
    """Past its queue size the server makes each new run wait holding a database
    connection (README, Server): a fan-out must stay within it."""
    from fanout.api import MAX_TASK_RUNS
    from fanout.settings import SERVER_SETTINGS

    queue = int(SERVER_SETTINGS["PREFECT_SERVER_TASKS_SCHEDULING_MAX_SCHEDULED_QUEUE_SIZE"])
    assert queue >= MAX_TASK_RUNS


def test_a_fan_out_that_cannot_watch_events_reads_every_state_from_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_websocket(ids: list[Any]) -> dict[Any, Any]:
        raise OSError("no events websocket")

    monkeypatch.setattr(fanout.api, "final_states_seen", no_websocket)
    watch = fanout.api._events_watched()
    assert watch is fanout.api._no_events and watch([uuid.uuid4()]) == {}
