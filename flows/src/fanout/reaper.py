"""The reaper: no background task run is left behind by a dead worker or a restarted server.

Stock Prefect delivers a background task run at most once: a worker that dies (OOM,
eviction, `kubectl delete pod --force`, node loss) leaves its runs Pending/Running for
good, and a server restart forgets every run still in its in-memory queue. The reaper
sweeps every few seconds and fixes both, using the workers' heartbeats (fanout.liveness):

- orphaned: a run of our task keys is Pending/Running, no live worker lists it, and its
  state is older than `stale_after`  ->  scheduled again (state "Redelivered"), so a live
  worker runs it.
- lost: a run is Scheduled for longer than `stale_after`, no live worker lists it, and a
  live worker serving its task key has had a free slot for longer than that, which
  cannot happen while the run is in the server's queue  ->  enqueued again (state
  "Requeued"). This covers a restarted server's forgotten queue, and a worker killed
  before its run's Running state reached the server.

After `max_deliveries` deliveries a run is failed as poison instead: an item that kills
every worker it lands on must not take the whole pool down.

The runs watched are those of every task key a worker has declared in its heartbeat
(the demo's, a user's `--tasks`, a chart pool's `tasks:`), not a list compiled in here.

- unserved: a `.delay()` run Scheduled longer than `stale_after` whose task key no live
  worker serves (no worker for that task, or the submitter's code differs from the
  workers': the key embeds a hash of the code) is logged, naming the keys the workers
  do serve; after `fail_unserved_after` seconds it is failed with that reason, so that a
  caller's `.result()` raises instead of waiting forever.

Both transitions keep the run's parameters (`task_parameters_id`) so the new worker
reads the same inputs. Prefect's own rule against PENDING -> PENDING makes a second
delivery of a run already picked up abort instead of running twice.

It also deletes stored task parameters and results older than `--storage-ttl` (six
hours by default; see fanout.retention): what no parent collected.

Run it as `python -m fanout.reaper` (one replica is enough; two are harmless).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.states import Failed, Scheduled
from prefect.variables import Variable
from prometheus_client import start_http_server

from fanout import retention, settings
from fanout.liveness import Heartbeat, fanout_tags, ledger_name, read_heartbeats, task_name, unserved_reason
from fanout.metrics import Load, PoolMetrics, pool_registry

log = logging.getLogger("fanout.reaper")
PAGE = 200


@dataclass
class Sweep:
    """What one sweep did, for logs and tests."""

    live_workers: int = 0
    redelivered: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    poisoned: list[str] = field(default_factory=list)
    unserved: list[str] = field(default_factory=list)  # waiting for a worker that serves their key
    failed_unserved: list[str] = field(default_factory=list)
    expired_heartbeats: int = 0


class Reaper:
    def __init__(
        self,
        client: SyncPrefectClient,
        task_keys: Iterable[str] = (),
        stale_after: float = settings.STALE_AFTER,
        max_deliveries: int = settings.MAX_DELIVERIES,
        fail_unserved_after: float = settings.FAIL_UNSERVED_AFTER,
        pools: dict[str, set[str]] | None = None,
        scan: int = settings.BACKLOG_SCAN,
    ) -> None:
        if stale_after <= 0 or max_deliveries < 1 or fail_unserved_after < 0 or scan < 1:
            raise ValueError("stale_after must be > 0, max_deliveries >= 1, fail_unserved_after >= 0 and scan >= 1")
        self.scan = scan  # runs read per state per sweep, oldest first
        self.client = client
        self.pools = pools or {}  # pool -> task keys, as configured (known with no worker up)
        self.extra_keys = set(task_keys).union(*self.pools.values())  # watched before any worker declares them
        self.task_keys = set(self.extra_keys)
        self.stale_after = stale_after
        self.max_deliveries = max_deliveries
        self.fail_unserved_after = fail_unserved_after  # 0: never fail, only report
        self._reported: set[str] = set()  # task keys already logged as unserved
        self.metrics = PoolMetrics()  # what each sweep saw, for /metrics

    # -- reading ---------------------------------------------------------------------
    def heartbeats(self) -> dict[str, Heartbeat]:
        """Every worker heartbeat: variable name -> heartbeat."""
        return read_heartbeats(self.client)

    def count(self, *types: StateType) -> int:
        """Task runs of every key in these state types, counted by the server (one query)."""
        body = {"task_runs": {"state": {"type": {"any_": [t.value for t in types]}}}}
        return int(self.client.request("POST", "/task_runs/count", json=body).json())

    def oldest(self, *types: StateType) -> list[TaskRun]:
        """Up to `scan` task runs of any key in these state types, oldest first (by expected
        start: a run keeps it when it is delivered again). Pages follow each other by that
        time, not by offset, so the server never counts its way past the rows already read
        and a run that leaves the state between two pages shifts no other run out of sight.
        Those oldest runs are the only ones old enough to recover, so reading no further
        keeps a sweep's cost flat however long the backlog grows."""
        found: dict[str, TaskRun] = {}
        state = {"type": {"any_": [t.value for t in types]}}
        after: str | None = None
        while len(found) < self.scan:
            flt: dict[str, Any] = {"state": state}
            if after:
                flt["expected_start_time"] = {"after_": after}  # inclusive: ties are read again
            body = {"task_runs": flt, "sort": "EXPECTED_START_TIME_ASC", "limit": PAGE}
            page = self.client.request("POST", "/task_runs/filter", json=body).json()
            fresh = [r for r in page if r["id"] not in found]
            for raw in fresh[: self.scan - len(found)]:
                found[raw["id"]] = TaskRun.model_validate(raw)
            if len(page) < PAGE or not fresh or not page[-1].get("expected_start_time"):
                break
            after = page[-1]["expected_start_time"]
        return list(found.values())

    # -- acting ----------------------------------------------------------------------
    def _parameters_id(self, states: list[Any]) -> Any:
        for st in states:
            if st.state_details.task_parameters_id:
                return st.state_details.task_parameters_id
        return None

    def _recover(self, run: TaskRun, name: str, why: str, out: Sweep) -> None:
        """Schedule `run` again, or fail it as poison once it has had max_deliveries."""
        states = self.client.read_task_run_states(run.id)
        deliveries = 1 + sum(st.name in ("Redelivered", "Requeued") for st in states)
        if deliveries >= self.max_deliveries:
            reason = (
                f"poison: delivered {deliveries} times and never finished ({why}); "
                f"limit {self.max_deliveries}, not retried again"
            )
            self.client.set_task_run_state(run.id, Failed(message=reason), force=True)
            out.poisoned.append(str(run.id))
            self.metrics.recovered(run.task_key, "poisoned")
            log.warning("%s %s: %s", run.name, run.id, reason)
            return
        state = Scheduled(
            name=name,
            message=f"{why} (delivery {deliveries + 1})",
            state_details={"deferred": True, "task_parameters_id": self._parameters_id(states)},
        )
        if self.client.set_task_run_state(run.id, state, force=True).status.value == "ACCEPT":
            (out.redelivered if name == "Redelivered" else out.requeued).append(str(run.id))
            self.metrics.recovered(run.task_key, name.lower())
            for tag in fanout_tags(run.tags):  # counted for the fan-out that waits on it
                ledger = ledger_name(tag)
                Variable.set(ledger, int(Variable.get(ledger, default=0)) + 1, overwrite=True)
            log.info("%s %s: %s; %s (delivery %d)", run.name, run.id, why, name.lower(), deliveries + 1)

    def sweep(self, now: float | None = None) -> Sweep:
        now = time.time() if now is None else now
        out = Sweep()
        beats = self.heartbeats()
        live = [hb for hb in beats.values() if hb.alive(now, self.stale_after)]
        out.live_workers = len(live)
        held = {run for hb in live for run in hb.runs}
        # Keys of every worker with a heartbeat, dead ones too (until their heartbeat
        # expires): their runs are the ones to redeliver. A key counts as served as long
        # as some heartbeat declares it: a busy worker whose heartbeat is late, or a pool
        # restarting its pods, still serves it.
        served = {key for hb in beats.values() for key in hb.task_keys}
        self.task_keys = self.extra_keys | served

        def age(run: TaskRun) -> float:
            return now - run.state.timestamp.timestamp() if run.state else 0.0

        load = Load(at=now)
        load.add_workers(live, configured=self.pools)
        active = self.oldest(StateType.PENDING, StateType.RUNNING)
        for run in active:
            if run.task_key not in self.task_keys:
                continue
            (load.running if run.state_type == StateType.RUNNING else load.pending)[run.task_key] += 1
            if str(run.id) not in held and age(run) > self.stale_after:
                self._recover(run, "Redelivered", "its worker stopped heartbeating", out)

        # A run whose worker died before its Running state reached the server still
        # looks Scheduled; so does a run a restarted server forgot. Either way it is not
        # in the queue if a worker for its key has been free all along.
        idle_keys = {key for hb in live for key in hb.task_keys if hb.idle_for(now) > self.stale_after}
        read = self.oldest(StateType.SCHEDULED)
        waiting = [r for r in read if r.state and r.state.state_details.deferred]
        for run in waiting:
            load.scheduled[run.task_key] += 1
            load.oldest[run.task_key] = max(load.oldest.get(run.task_key, 0.0), age(run))
        # The totals, counted by the server, are exact; past `scan` runs the split of the
        # unread ones between tasks is taken to be that of the oldest ones.
        for kind in (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING):
            load.counted[kind.value.lower()] = self.count(kind)
        load.extrapolate(len(read), len(active), self.scan)
        self.metrics.update(load)
        scheduled = [r for r in waiting if age(r) > self.stale_after]
        for run in scheduled:
            if run.task_key in idle_keys and str(run.id) not in held:
                self._recover(run, "Requeued", "not delivered while a worker was free", out)
        self._unserved([r for r in scheduled if r.task_key not in served], served, age, out)

        for name, hb in beats.items():
            if now - hb.ts > 10 * self.stale_after:
                self.client.request("DELETE", f"/variables/name/{name}")
                out.expired_heartbeats += 1
        return out

    def _unserved(self, runs: list[TaskRun], served: set[str], age: Any, out: Sweep) -> None:
        """Report runs no live worker will ever receive; fail them after fail_unserved_after."""
        waiting: dict[str, list[TaskRun]] = {}
        for run in runs:
            waiting.setdefault(run.task_key, []).append(run)
        self._reported &= set(waiting)  # a key served again is reported afresh next time
        for key, key_runs in waiting.items():
            reason = unserved_reason(key, served) or ""
            out.unserved += [str(r.id) for r in key_runs]
            if key not in self._reported:
                self._reported.add(key)
                log.warning("%d run(s) of task %r waiting: %s", len(key_runs), task_name(key), reason)
            if not self.fail_unserved_after:
                continue
            for run in key_runs:
                if age(run) > self.fail_unserved_after:
                    message = f"not run: {reason} (waited {age(run):.0f}s)"
                    self.client.set_task_run_state(run.id, Failed(message=message), force=True)
                    out.failed_unserved.append(str(run.id))
                    self.metrics.recovered(run.task_key, "failed_unserved")
                    log.warning("%s %s failed: %s", run.name, run.id, message)


def configured_pools(spec: str) -> dict[str, set[str]]:
    """`--pools` as task keys per pool. The release's image holds the pools' code; a
    reference that does not load is logged and skipped (its pool's backlog then counts
    only once its workers declare their keys), never fatal: redelivery matters more."""
    from fanout.worker import load_tasks  # the workers' own loader: the same task keys

    pools: dict[str, set[str]] = {}
    for pool, refs in (json.loads(spec) if spec.strip() else {}).items():
        try:
            pools[pool] = {t.task_key for t in load_tasks(refs if isinstance(refs, str) else ",".join(refs))}
        except ValueError as exc:
            log.warning("pool %r: %s", pool, exc)
    return pools


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fanout.reaper", description=__doc__.split("\n")[0])
    p.add_argument("--interval", type=float, default=settings.REAPER_INTERVAL, help="seconds between sweeps")
    p.add_argument("--stale-after", type=float, default=settings.STALE_AFTER, help="heartbeat age that counts as dead")
    p.add_argument(
        "--max-deliveries",
        type=int,
        default=settings.MAX_DELIVERIES,
        help="deliveries before a run is failed as poison",
    )
    p.add_argument(
        "--fail-unserved-after",
        type=float,
        default=settings.FAIL_UNSERVED_AFTER,
        help="seconds after which a run no live worker serves is failed with the reason (0: only report)",
    )
    p.add_argument(
        "--backlog-scan",
        type=int,
        default=settings.BACKLOG_SCAN,
        help="runs read per state and sweep, oldest first (past it, per-pool counts are extrapolated)",
    )
    p.add_argument(
        "--metrics-host", default=os.environ.get("FANOUT_METRICS_HOST", "127.0.0.1"), help="/metrics address"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("FANOUT_METRICS_PORT", "8080")),
        help="/metrics port (-1: none)",
    )
    p.add_argument(
        "--pools",
        default=os.environ.get("FANOUT_POOLS", ""),
        help='the pools and the tasks they serve, as JSON: {"light": ["module:attribute", ...]}; their '
        "backlog is counted even while they have no worker",
    )
    p.add_argument(
        "--storage-ttl",
        type=float,
        default=settings.STORAGE_TTL,
        help="seconds after which stored task parameters and results are deleted (0: never); see fanout.retention",
    )
    p.add_argument(
        "--storage-sweep-every",
        type=float,
        default=settings.STORAGE_SWEEP_INTERVAL,
        help="seconds between those deletions",
    )
    args = p.parse_args(argv)
    if args.storage_ttl < 0 or args.storage_sweep_every <= 0:
        p.error("--storage-ttl must be >= 0 and --storage-sweep-every > 0")
    if args.interval <= 0 or args.stale_after <= 0 or args.max_deliveries < 1 or args.fail_unserved_after < 0:
        p.error("--interval and --stale-after must be > 0, --max-deliveries >= 1, --fail-unserved-after >= 0")
    if args.backlog_scan < 1:
        p.error(f"--backlog-scan must be >= 1, got {args.backlog_scan}")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "reaper: sweep every %.0fs, stale after %.0fs, max %d deliveries",
        args.interval,
        args.stale_after,
        args.max_deliveries,
    )
    with get_client(sync_client=True) as client:
        reaper = Reaper(
            client,
            stale_after=args.stale_after,
            max_deliveries=args.max_deliveries,
            fail_unserved_after=args.fail_unserved_after,
            pools=configured_pools(args.pools),
            scan=args.backlog_scan,
        )
        if args.metrics_port >= 0:
            server, _ = start_http_server(args.metrics_port, args.metrics_host, registry=pool_registry(reaper.metrics))
            log.info("metrics on http://%s:%d/metrics", *server.server_address[:2])
        next_storage_sweep = time.monotonic() + min(args.storage_sweep_every, 60.0)
        while not stop:
            if args.storage_ttl and time.monotonic() >= next_storage_sweep:
                next_storage_sweep = time.monotonic() + args.storage_sweep_every
                try:
                    files, size = retention.sweep(args.storage_ttl)
                    if files:
                        log.info(
                            "storage: deleted %d objects (%d bytes) older than %.0fs", files, size, args.storage_ttl
                        )
                except Exception as exc:  # noqa: BLE001 - storage away: the next sweep tries again
                    log.warning("storage sweep failed: %s", exc)
            try:
                s = reaper.sweep()
                if s.redelivered or s.requeued or s.poisoned or s.failed_unserved:
                    log.info(
                        "sweep: %d live workers, %d redelivered, %d requeued, %d poisoned, %d failed unserved",
                        s.live_workers,
                        len(s.redelivered),
                        len(s.requeued),
                        len(s.poisoned),
                        len(s.failed_unserved),
                    )
            except Exception as exc:  # noqa: BLE001 - the server may be restarting; sweep again
                log.warning("sweep failed: %s", exc)
            deadline = time.monotonic() + args.interval
            while not stop and time.monotonic() < deadline:
                time.sleep(0.2)


if __name__ == "__main__":
    main()
