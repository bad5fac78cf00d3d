"""Prometheus metrics (text format, `prometheus-client`), from two places:

- each task worker, on `/metrics` beside `/healthz`: the runs it holds, its slots, the
  runs it finished by final state and their durations (`WorkerMetrics`);
- the reaper, on its own port: every pool's backlog and load (`PoolMetrics`). Prefect has
  no backlog metric for background tasks, and its API cannot count runs per task key.
  Each sweep the reaper has the server count the runs per state (exact, one query each)
  and reads the oldest runs (at most `--backlog-scan` per state, the ones it may have to
  recover); it splits the counts by task from the runs it read, extrapolated past that
  limit (`fanout_backlog_estimated`). A sweep's cost stays flat however long the backlog
  grows, and a scrape costs the Prefect server nothing.

`fanout_pool_demand{pool}` is what an autoscaler follows: runs of the pool's tasks waiting
for a worker or held by one (`fanout_pool_backlog`: only the waiting ones). Sizing on the
waiting runs alone would remove pods while they still run work.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from fanout.liveness import Heartbeat, task_name

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RECOVERIES = ("redelivered", "requeued", "poisoned", "failed_unserved")


class WorkerMetrics:
    """One worker's metrics, in a registry of its own (no process-wide defaults)."""

    def __init__(self, pool: str, limit: int, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.pool = pool
        Gauge(
            "fanout_worker_runs_in_flight", "Task runs this worker holds now", ["pool"], registry=self.registry
        ).labels(pool).set_function(lambda: float(in_flight()))
        Gauge("fanout_worker_slots", "Task runs this worker takes at once", ["pool"], registry=self.registry).labels(
            pool
        ).set(limit)
        self._finished = PromCounter(
            "fanout_worker_runs_finished",
            "Task runs this worker finished, by task and final state",
            ["pool", "task", "state"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "fanout_worker_run_duration_seconds",
            "Seconds from taking a task run to its final state",
            ["pool", "task"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.handed_back = PromCounter(
            "fanout_worker_offers_handed_back",
            "Runs offered while every slot was busy, handed back to the server for another worker",
            ["pool"],
            registry=self.registry,
        ).labels(pool)

    def finished(self, task_key: str, state: str, seconds: float) -> None:
        """Count one finished run (`state`: completed, failed, crashed, ...)."""
        task = task_name(task_key)
        self._finished.labels(self.pool, task, state).inc()
        self._duration.labels(self.pool, task).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Load:
    """One sweep's picture of the background task runs and the workers."""

    at: float = 0.0
    scheduled: Counter[str] = field(default_factory=Counter)  # task key -> runs waiting for a worker
    oldest: dict[str, float] = field(default_factory=dict)  # task key -> seconds the oldest has waited
    pending: Counter[str] = field(default_factory=Counter)
    running: Counter[str] = field(default_factory=Counter)
    pools: dict[str, set[str]] = field(default_factory=dict)  # pool -> task keys it serves
    workers: Counter[str] = field(default_factory=Counter)  # pool -> live workers
    slots: Counter[str] = field(default_factory=Counter)  # pool -> their slots
    free: Counter[str] = field(default_factory=Counter)  # pool -> slots not holding a run
    counted: dict[str, int] = field(default_factory=dict)  # state -> runs of every task, counted by the server
    estimated: bool = False  # more runs than were read: the per-task counts are extrapolated

    def add_workers(self, live: Iterable[Heartbeat], configured: Mapping[str, Iterable[str]] = ()) -> None:
        """The pools: those the chart configured (known even at zero replicas) and those
        the live workers declare."""
        for pool, keys in dict(configured).items():
            self.pools.setdefault(pool, set()).update(keys)
        for hb in live:
            self.pools.setdefault(hb.pool, set()).update(hb.task_keys)
            self.workers[hb.pool] += 1
            self.slots[hb.pool] += hb.limit
            self.free[hb.pool] += max(0, hb.limit - len(hb.runs))

    def extrapolate(self, read_waiting: int, read_active: int, scan: int) -> None:
        """When a sweep read only the oldest `scan` runs of a state, scale the per-task
        counts of what it read up to the server's exact totals (`counted`)."""
        waiting = self.counted.get("scheduled", 0)
        active = self.counted.get("pending", 0) + self.counted.get("running", 0)
        for read, total, counters in (
            (read_waiting, waiting, (self.scheduled,)),
            (read_active, active, (self.pending, self.running)),
        ):
            if read >= scan and total > read:
                self.estimated = True
                for counter in counters:
                    for key in counter:
                        counter[key] = round(counter[key] * total / read)

    def pools_of(self, key: str) -> list[str]:
        return sorted(p for p, keys in self.pools.items() if key in keys) or [""]


class PoolMetrics(Collector):
    """The reaper's metrics: the last sweep's `Load` and the recoveries since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._load = Load()
        self._recovered: Counter[tuple[str, str]] = Counter()  # (task key, action) -> runs

    def update(self, load: Load) -> None:
        with self._lock:
            self._load = load

    def recovered(self, task_key: str, action: str) -> None:
        """Count one run redelivered, requeued, poisoned or failed as unserved."""
        assert action in RECOVERIES, action
        with self._lock:
            self._recovered[(task_key, action)] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            load, recovered = self._load, Counter(self._recovered)
        runs = GaugeMetricFamily(
            "fanout_task_runs", "Background task runs by pool, task and state", labels=["pool", "task", "state"]
        )
        oldest = GaugeMetricFamily(
            "fanout_oldest_scheduled_seconds",
            "Seconds the oldest run still waiting for a worker has waited",
            labels=["pool", "task"],
        )
        keys = set(load.scheduled) | set(load.pending) | set(load.running)
        keys |= {k for ks in load.pools.values() for k in ks}
        by_series: dict[tuple[str, str], list[float]] = {}
        for key in keys:
            for pool in load.pools_of(key):
                s = by_series.setdefault((pool, task_name(key)), [0.0, 0.0, 0.0, 0.0])
                s[0] += load.scheduled[key]
                s[1] += load.pending[key]
                s[2] += load.running[key]
                s[3] = max(s[3], load.oldest.get(key, 0.0))
        for (pool, task), (scheduled, pending, running, age) in sorted(by_series.items()):
            runs.add_metric([pool, task, "scheduled"], scheduled)
            runs.add_metric([pool, task, "pending"], pending)
            runs.add_metric([pool, task, "running"], running)
            oldest.add_metric([pool, task], age)
        yield runs
        yield oldest

        pools = sorted(load.pools)
        families = {
            "backlog": ("fanout_pool_backlog", "Runs of the pool's tasks scheduled and not yet taken by a worker"),
            "demand": (
                "fanout_pool_demand",
                "Runs of the pool's tasks waiting or held by a worker (what autoscaling follows)",
            ),
            "workers": ("fanout_pool_workers", "Live workers of the pool (heartbeat younger than stale-after)"),
            "slots": ("fanout_pool_slots", "Task runs the pool's live workers take at once"),
            "free": ("fanout_pool_free_slots", "Slots of the pool's live workers not holding a run"),
        }
        for what, (name, doc) in families.items():
            family = GaugeMetricFamily(name, doc, labels=["pool"])
            for pool in pools:
                if what == "backlog":
                    value = sum(load.scheduled[k] for k in load.pools[pool])
                elif what == "demand":
                    value = sum(load.scheduled[k] + load.pending[k] + load.running[k] for k in load.pools[pool])
                else:
                    value = getattr(load, what)[pool]
                family.add_metric([pool], float(value))
            yield family

        rec = CounterMetricFamily(
            "fanout_recovered_runs",
            "Runs the reaper redelivered, requeued, failed as poison or failed as unserved, since it started",
            labels=["pool", "task", "action"],
        )
        for (key, action), n in sorted(recovered.items()):
            for pool in load.pools_of(key):
                rec.add_metric([pool, task_name(key), action], float(n))
        yield rec
        counted = GaugeMetricFamily(
            "fanout_all_task_runs", "Task runs of every task by state, counted by the Prefect server", labels=["state"]
        )
        for state, n in sorted(load.counted.items()):
            counted.add_metric([state], float(n))
        yield counted
        estimated = GaugeMetricFamily(
            "fanout_backlog_estimated",
            "1 when more runs wait than a sweep reads (the reaper's --backlog-scan): the per-task and "
            "per-pool counts are then extrapolated from the oldest runs to the exact totals",
        )
        estimated.add_metric([], float(load.estimated))
        yield estimated
        sweep = GaugeMetricFamily("fanout_last_sweep_timestamp_seconds", "When the reaper last finished a sweep")
        sweep.add_metric([], load.at)
        yield sweep


def pool_registry(metrics: PoolMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry


# A worker's final states as the report's columns (others, e.g. cancelled, are not shown).
FINISHED_COLUMN = {"completed": "completed", "failed": "failed", "crashed": "failed"}


def pool_report(reaper: str, workers: Iterable[str]) -> str:
    """The dashboard's figures as a table, for a terminal: per pool, its live workers and
    slots, the runs waiting, the runs its workers finished (completed, failed) and the
    runs the reaper recovered. `reaper` and `workers` are their /metrics texts."""
    rows: dict[str, Counter[str]] = {}

    def add(text: str, wanted: Mapping[str, str]) -> None:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                column = wanted.get(s.name)
                if column == "finished":
                    column = FINISHED_COLUMN.get(s.labels.get("state", ""))
                if column and "pool" in s.labels:
                    rows.setdefault(s.labels["pool"], Counter())[column] += s.value

    add(reaper, {"fanout_pool_workers": "workers", "fanout_pool_slots": "slots",
                 "fanout_pool_backlog": "backlog", "fanout_recovered_runs_total": "recovered"})  # fmt: skip
    for text in workers:
        add(text, {"fanout_worker_runs_finished_total": "finished"})
    columns = ("workers", "slots", "backlog", "completed", "failed", "recovered")
    lines = [f"{'pool':<12}" + "".join(f"{c:>11}" for c in columns)]
    for pool, row in sorted(rows.items()):
        lines.append(f"{pool or '(none)':<12}" + "".join(f"{int(row[c]):>11}" for c in columns))
    return "\n".join(lines)
