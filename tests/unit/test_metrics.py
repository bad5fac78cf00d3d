"""The metrics' text: what Prometheus (and an autoscaler) reads per pool and per worker."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fanout.liveness import Heartbeat
from fanout.metrics import Load, PoolMetrics, WorkerMetrics, pool_registry, pool_report


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }


def beat(pool: str, keys: set[str], limit: int, runs: int) -> Heartbeat:
    return Heartbeat(
        client_id=f"{pool}-{limit}-{runs}",
        pool=pool,
        task_keys=frozenset(keys),
        runs=frozenset(f"run-{i}" for i in range(runs)),
        limit=limit,
        free_since=None,
        ts=0.0,
    )


def test_pool_backlog_counts_the_runs_of_every_task_the_pool_serves():
    load = Load(at=100.0)
    load.add_workers(
        [beat("light", {"resize-aaa", "shared-ccc"}, 4, 3), beat("light", {"resize-aaa"}, 4, 0)],
        configured={"heavy": {"render-bbb", "shared-ccc"}},  # no live worker: known from the chart
    )
    load.scheduled.update({"resize-aaa": 7, "render-bbb": 2, "shared-ccc": 1, "orphan-ddd": 5})
    load.oldest.update({"resize-aaa": 12.5, "orphan-ddd": 40.0})
    load.running.update({"resize-aaa": 3})
    metrics = PoolMetrics()
    metrics.update(load)
    metrics.recovered("resize-aaa", "redelivered")
    metrics.recovered("resize-aaa", "redelivered")
    metrics.recovered("orphan-ddd", "failed_unserved")
    got = samples(generate_latest(pool_registry(metrics)))

    assert got[("fanout_pool_backlog", (("pool", "light"),))] == 8  # resize 7 + shared 1
    assert got[("fanout_pool_backlog", (("pool", "heavy"),))] == 3  # render 2 + shared 1, at zero workers
    assert got[("fanout_pool_demand", (("pool", "light"),))] == 11  # + 3 running
    assert got[("fanout_pool_demand", (("pool", "heavy"),))] == 3
    assert got[("fanout_pool_workers", (("pool", "light"),))] == 2
    assert got[("fanout_pool_workers", (("pool", "heavy"),))] == 0
    assert got[("fanout_pool_slots", (("pool", "light"),))] == 8
    assert got[("fanout_pool_free_slots", (("pool", "light"),))] == 5
    run = "fanout_task_runs"
    assert got[(run, (("pool", "light"), ("state", "scheduled"), ("task", "resize")))] == 7
    assert got[(run, (("pool", "light"), ("state", "running"), ("task", "resize")))] == 3
    # a task no pool serves still shows, under pool "", so that it is noticed
    assert got[(run, (("pool", ""), ("state", "scheduled"), ("task", "orphan")))] == 5
    assert got[("fanout_oldest_scheduled_seconds", (("pool", ""), ("task", "orphan")))] == 40.0
    rec = "fanout_recovered_runs_total"
    assert got[(rec, (("action", "redelivered"), ("pool", "light"), ("task", "resize")))] == 2
    assert got[(rec, (("action", "failed_unserved"), ("pool", ""), ("task", "orphan")))] == 1
    assert got[("fanout_last_sweep_timestamp_seconds", ())] == 100.0


def test_a_worker_counts_its_runs_by_final_state_and_times_them():
    held = [1, 2]
    metrics = WorkerMetrics("light", 4, lambda: len(held))
    metrics.finished("resize-aaa", "completed", 0.2)
    metrics.finished("resize-aaa", "failed", 3.0)
    metrics.finished("resize-aaa", "completed", 0.3)
    got = samples(metrics.render())
    assert got[("fanout_worker_runs_in_flight", (("pool", "light"),))] == 2
    assert got[("fanout_worker_slots", (("pool", "light"),))] == 4
    done = "fanout_worker_runs_finished_total"
    assert got[(done, (("pool", "light"), ("state", "completed"), ("task", "resize")))] == 2
    assert got[(done, (("pool", "light"), ("state", "failed"), ("task", "resize")))] == 1
    hist = "fanout_worker_run_duration_seconds"
    assert got[(hist + "_count", (("pool", "light"), ("task", "resize")))] == 3
    assert got[(hist + "_bucket", (("le", "0.25"), ("pool", "light"), ("task", "resize")))] == 1
    held.clear()  # read at scrape time
    assert samples(metrics.render())[("fanout_worker_runs_in_flight", (("pool", "light"),))] == 0


def test_the_reapers_pools_are_the_task_keys_the_workers_subscribe_to(caplog):
    from fanout.chunks import chunk_key
    from fanout.reaper import configured_pools
    from fanout_demo.tasks import process_item

    pools = configured_pools('{"light": ["fanout_demo.tasks:process_item"], "typo": ["fanout_demo.tasks:nope"]}')
    assert pools == {"light": {chunk_key(process_item)}}  # a plain function: its chunk task
    assert "pool 'typo'" in caplog.text and "nope" in caplog.text  # skipped, said, not fatal
    assert configured_pools("") == {}


def test_the_pool_report_puts_the_reaper_and_the_workers_figures_side_by_side():
    load = Load(at=1.0)
    load.add_workers([beat("light", {"resize-aaa"}, 4, 1), beat("light", {"resize-aaa"}, 4, 0)])
    load.scheduled.update({"resize-aaa": 7})
    pools = PoolMetrics()
    pools.update(load)
    pools.recovered("resize-aaa", "redelivered")
    pools.recovered("resize-aaa", "requeued")
    worker = WorkerMetrics("light", 4, in_flight=lambda: 1)
    for state in ("completed", "completed", "failed", "crashed"):
        worker.finished("resize-aaa", state, 0.5)
    other = WorkerMetrics("light", 4, in_flight=lambda: 0)
    other.finished("resize-aaa", "completed", 0.5)

    report = pool_report(
        generate_latest(pool_registry(pools)).decode(), [worker.render().decode(), other.render().decode()]
    )
    header, row = report.splitlines()
    assert header.split() == ["pool", "workers", "slots", "backlog", "completed", "failed", "recovered"]
    assert row.split() == ["light", "2", "8", "7", "3", "2", "2"]  # crashed counts as failed


def test_past_the_scan_limit_the_counts_are_the_servers_totals_split_as_the_oldest_runs():
    load = Load(at=1.0)
    load.add_workers([], configured={"light": {"resize-aaa"}, "heavy": {"render-bbb"}})
    # a sweep read the oldest 10 waiting runs (8 resize, 2 render) and 4 running; the server counted more
    load.scheduled.update({"resize-aaa": 8, "render-bbb": 2})
    load.running.update({"resize-aaa": 4})
    load.counted.update({"scheduled": 1000, "pending": 0, "running": 4})
    load.extrapolate(read_waiting=10, read_active=4, scan=10)
    assert load.estimated
    assert (load.scheduled["resize-aaa"], load.scheduled["render-bbb"]) == (800, 200)
    assert load.running["resize-aaa"] == 4  # every active run was read: exact, untouched
    metrics = PoolMetrics()
    metrics.update(load)
    got = samples(generate_latest(pool_registry(metrics)))
    assert got[("fanout_pool_backlog", (("pool", "light"),))] == 800
    assert got[("fanout_all_task_runs", (("state", "scheduled"),))] == 1000
    assert got[("fanout_backlog_estimated", ())] == 1

    exact = Load(at=1.0)
    exact.scheduled.update({"resize-aaa": 9})
    exact.counted.update({"scheduled": 12})  # three more arrived after the read: no extrapolation below the limit
    exact.extrapolate(read_waiting=9, read_active=0, scan=10)
    assert not exact.estimated and exact.scheduled["resize-aaa"] == 9
