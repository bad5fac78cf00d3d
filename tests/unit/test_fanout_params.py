"""Parameter checks, chunking and per-item failure reporting of the parent flow."""

from __future__ import annotations

import pickle

import pytest

from flows.fanout import FanoutSummary, _chunks, auto_chunk_size, format_summary, validate
from flows.tasks import POOLS, ChunkFailed, pool_tasks

GOOD = dict(items=10, chunk_size=None, fail_items=[], heavy_batches=0, heavy_segments=8, heavy_span=10, timeout=60)


def test_good_parameters_pass() -> None:
    validate(**GOOD)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"items": 0}, "items must be >= 1, got 0"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"chunk_size": -3}, "chunk_size must be >= 1"),
        ({"heavy_batches": -1}, "heavy_batches must be >= 0"),
        ({"heavy_segments": 0}, "heavy_segments must be >= 1"),
        ({"heavy_span": 0}, "heavy_span must be >= 1"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"heavy_cpus": 0}, "heavy_cpus must be >= 1"),
        ({"work": "gpu"}, "work must be one of checksum, cpu, noop, got 'gpu'"),
        ({"item_sleep": -1}, "item_sleep must be >= 0"),
        ({"crash_items": [-1]}, "crash_items must be item ids in [0, 10)"),
        ({"fail_items": [10]}, "fail_items must be item ids in [0, 10)"),
        ({"items": 10**9}, "items must be <= 10,000,000 per fan-out, got 1,000,000,000"),
        ({"items": 10**6, "chunk_size": 1}, "1,000,000 task runs, more than 100,000: use chunk_size >= 10"),
        ({"heavy_batches": 10**6}, "heavy_batches must be <= 10,000"),
    ],
)
def test_bad_parameters_are_named(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match="invalid fanout parameters") as err:
        validate(**{**GOOD, **change})
    assert message in str(err.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ValueError) as err:
        validate(**{**GOOD, "items": 0, "chunk_size": 0})
    assert "items must" in str(err.value) and "chunk_size must" in str(err.value)


def test_chunks_cover_every_item_once() -> None:
    for items, size in [(1, 1), (10, 3), (200, 2), (1000, auto_chunk_size(1000)), (7, 100)]:
        chunks = _chunks(items, size)
        flat = [i for c in chunks for i in c]
        assert flat == list(range(items))
        assert max(len(c) for c in chunks) <= size


def test_auto_chunk_size_bounds_task_runs() -> None:
    assert auto_chunk_size(1) == 1
    assert auto_chunk_size(100) == 1
    assert auto_chunk_size(101) == 2
    assert len(_chunks(10_000, auto_chunk_size(10_000))) <= 100


def test_chunk_failure_survives_pickling_with_partial_results() -> None:
    exc = ChunkFailed([{"item": 1}], {2: "ValueError: bad"})
    back = pickle.loads(pickle.dumps(exc))
    assert back.results == [{"item": 1}] and back.errors == {2: "ValueError: bad"}
    assert str(back) == "1 of 2 items failed: item 2: ValueError: bad"
    assert "item': 1" not in repr(back)  # results stay out of log lines


def test_unknown_pool_lists_known_ones() -> None:
    assert pool_tasks("light") == POOLS["light"]
    with pytest.raises(ValueError, match="unknown pool 'gpu'; known pools: heavy, light"):
        pool_tasks("gpu")


def test_pools_serve_disjoint_tasks() -> None:
    keys = {pool: {t.task_key for t in tasks} for pool, tasks in POOLS.items()}
    assert not keys["light"] & keys["heavy"]


def test_summary_report_shows_workers_failures_and_speedup() -> None:
    s = FanoutSummary(
        items=3,
        chunk_size=1,
        task_runs=4,
        seconds=2.0,
        results=[{"item": 0, "worker": "a"}, {"item": 1, "worker": "b"}],
        failed={2: "InjectedFailure: x"},
        per_worker={"a": 1, "b": 1},
        heavy=[
            {
                "batch": 0,
                "worker": "h",
                "primes": 5,
                "processes": 2,
                "pids": [1, 2],
                "seconds": 1.0,
                "serial_seconds": 1.9,
            }
        ],
    )
    text = format_summary(s)
    assert "2/3 completed, 1 failed" in text
    assert "FAILED item 2: InjectedFailure: x" in text
    assert "speed-up 1.90x" in text
    assert "1.5 items/s" in text
