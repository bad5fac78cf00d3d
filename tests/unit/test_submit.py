"""`submit_many` relies on two Prefect internals; a Prefect upgrade that moves them must
fail here, loudly, rather than silently fall back to slow or wrong submission."""

import inspect
import pickle

import cloudpickle
import prefect.tasks
import pytest
from prefect import Task

from fanout.chunks import chunk_task
from fanout.submit import PayloadTooLarge, PicklesOnce, _context_serialized_once, check_payloads, submit_many
from fanout_demo.tasks import process_item

CHUNKS = chunk_task(process_item)


def test_prefect_internals_submit_many_patches_still_exist() -> None:
    assert callable(prefect.tasks.serialize_context)
    params = inspect.signature(Task.create_run).parameters
    assert {"client", "parameters", "deferred"} <= params.keys()


def test_context_is_serialised_once_and_restored() -> None:
    original = prefect.tasks.serialize_context
    with _context_serialized_once():
        first = prefect.tasks.serialize_context()
        assert prefect.tasks.serialize_context() is first
    assert prefect.tasks.serialize_context is original


def test_the_stored_context_is_pickled_once_without_the_senders_settings() -> None:
    with _context_serialized_once():
        frozen = prefect.tasks.serialize_context()
    assert isinstance(frozen, PicklesOnce)
    assert "settings_context" not in frozen and "flow_run_context" in frozen
    # Stored parameters embed the bytes pickled up front; a worker gets a plain dict back.
    stored = cloudpickle.dumps({"parameters": {"start": 0}, "context": frozen})
    assert frozen.blob in stored
    back = pickle.loads(stored)["context"]
    assert type(back) is dict and back == dict(frozen)


def test_bad_concurrency_is_rejected_before_any_submission() -> None:
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        submit_many(CHUNKS, [{"start": 0, "stop": 1}], concurrency=0)


def test_nothing_to_submit_needs_no_server() -> None:
    assert submit_many(CHUNKS, []) == []


def test_an_oversized_call_refuses_the_whole_batch_naming_the_call() -> None:
    calls = [{"start": 0, "stop": 1}, {"start": 1, "stop": 2, "fail_items": list(range(50_000))}]
    with pytest.raises(PayloadTooLarge, match=r"call #1 are [\d,]+ bytes, over the 100,000-byte limit"):
        check_payloads(CHUNKS, calls, limit=100_000)
    check_payloads(CHUNKS, calls[:1], limit=100_000)  # small ones pass


def test_process_pool_runner_internals_the_warm_pool_relies_on() -> None:
    # fanout_demo.tasks keeps one started ProcessPoolTaskRunner per process and refreshes its
    # run context per batch (fanout.processpool.submitting_to); a Prefect upgrade that renames these must fail here.
    from prefect.task_runners import ProcessPoolTaskRunner

    runner = ProcessPoolTaskRunner(max_workers=1)
    assert hasattr(runner, "_resolver_executor") and hasattr(runner, "_resolve_futures_and_submit")
    assert hasattr(runner, "_executor")
