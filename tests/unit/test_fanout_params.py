"""Parameter checks and the report of the demo's parent flow."""

from __future__ import annotations

import pytest

from fanout.chunks import chunk_key
from fanout_demo import tasks
from fanout_demo.flow import FanoutSummary, format_summary, validate

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
        ({"items": 10**6, "chunk_size": 1}, "1,000,000 task runs, more than 20,000: use chunk_size >= 50"),
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


def test_demo_pools_serve_disjoint_tasks() -> None:
    assert tasks.POOL_TASKS == {"light": "fanout_demo.tasks:process_item", "heavy": "fanout_demo.tasks:heavy_batch"}
    assert chunk_key(tasks.process_item) != tasks.heavy_batch.task_key


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
