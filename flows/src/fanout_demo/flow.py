"""The demo's parent flow, built on the public fan-out API: `python -m fanout_demo.flow`.

Light items go through `fanout.fan_out(process_item, ...)` (chunked, every item
accounted for); heavy batches through a plain `heavy_batch.delay()` to the heavy pool,
or as the `crunch` deployment in pods of N CPUs. It reports items per worker process
and, for heavy batches, the process pool's speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterId
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from fanout.api import MAX_ITEMS, MAX_TASK_RUNS, fan_out
from fanout_demo import workload
from fanout_demo.tasks import heavy_batch, process_item

CRUNCH_DEPLOYMENT = "crunch/crunch"  # registered by `python -m fanout_demo.deploy`
POLL_PAGE = 200  # the API's default page size
MAX_HEAVY_BATCHES = 10_000


def validate(
    items: int,
    chunk_size: int | None,
    fail_items: list[int],
    heavy_batches: int,
    heavy_segments: int,
    heavy_span: int,
    timeout: float,
    heavy_cpus: int | None = None,
    item_sleep: float = 0.0,
    crash_items: list[int] | None = None,
    work: str = "checksum",
) -> None:
    """Reject bad parameters, naming them, before anything is submitted."""
    problems = []
    if items < 1:
        problems.append(f"items must be >= 1, got {items}")
    if items > MAX_ITEMS:
        problems.append(f"items must be <= {MAX_ITEMS:,} per fan-out, got {items:,}")
    if chunk_size is not None and chunk_size < 1:
        problems.append(f"chunk_size must be >= 1 (or omitted for automatic), got {chunk_size}")
    elif chunk_size is not None and 0 < items <= MAX_ITEMS and math.ceil(items / chunk_size) > MAX_TASK_RUNS:
        problems.append(
            f"chunk_size {chunk_size} would create {math.ceil(items / chunk_size):,} task runs, more than "
            f"{MAX_TASK_RUNS:,}: use chunk_size >= {math.ceil(items / MAX_TASK_RUNS)} (or omit it)"
        )
    if heavy_batches < 0:
        problems.append(f"heavy_batches must be >= 0, got {heavy_batches}")
    if heavy_batches > MAX_HEAVY_BATCHES:
        problems.append(f"heavy_batches must be <= {MAX_HEAVY_BATCHES:,}, got {heavy_batches:,}")
    if heavy_segments < 1:
        problems.append(f"heavy_segments must be >= 1, got {heavy_segments}")
    if heavy_span < 1:
        problems.append(f"heavy_span must be >= 1, got {heavy_span}")
    if heavy_cpus is not None and heavy_cpus < 1:
        problems.append(f"heavy_cpus must be >= 1 (or omitted), got {heavy_cpus}")
    if timeout <= 0:
        problems.append(f"timeout must be > 0, got {timeout}")
    if work not in workload.WORK:
        problems.append(f"work must be one of {', '.join(sorted(workload.WORK))}, got {work!r}")
    if item_sleep < 0:
        problems.append(f"item_sleep must be >= 0, got {item_sleep}")
    for name, ids in (("fail_items", fail_items), ("crash_items", crash_items or [])):
        outside = [i for i in ids if not 0 <= i < items]
        if outside:
            problems.append(f"{name} must be item ids in [0, {items}), got {outside[:5]}")
    if problems:
        raise ValueError("invalid fanout parameters: " + "; ".join(problems))


@dataclass
class FanoutSummary:
    """What the parent flow returns: per-item outcome plus who did the work."""

    items: int
    chunk_size: int
    task_runs: int
    flow_run_id: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    per_worker: dict[str, int] = field(default_factory=dict)
    heavy: list[dict[str, Any]] = field(default_factory=list)
    heavy_failed: dict[int, str] = field(default_factory=dict)
    submit_seconds: float = 0.0  # creating every task run (the submitter's share of the cost)
    redelivered: int = 0  # task runs the reaper had to schedule again (a worker died, a server restarted)
    seconds: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.results)

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


def _poll(client: Any, ids: list[UUID], flow_runs: bool) -> list[TaskRun] | list[FlowRun]:
    runs: list[Any] = []
    for i in range(0, len(ids), POLL_PAGE):
        page = ids[i : i + POLL_PAGE]
        if flow_runs:
            runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page))
        else:
            runs += client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=page)), limit=len(page))
    return runs


@dataclass
class Waited:
    """Outcome of waiting for a set of runs."""

    values: dict[UUID, Any] = field(default_factory=dict)  # result, or the exception it failed with
    unfinished: dict[UUID, str] = field(default_factory=dict)  # why it has no value


def _value(state: Any) -> Any:
    try:
        return state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable result is a failure of that run
        return exc


def wait_for_runs(weights: dict[UUID, int], deadline: float, label: str, flow_runs: bool = False) -> Waited:
    """Wait until every task run (or flow run) in `weights` (run id -> items it
    carries) is final or the deadline passes; logs progress every few seconds.

    The server may be away for a while (restart, rollout): polling errors are logged
    and polling goes on until the deadline.
    """
    logger = get_run_logger()
    out = Waited()
    waiting = set(weights)
    total = sum(weights.values())
    last_log = 0.0
    interval = 0.2
    last: dict[UUID, str] = {}
    with get_client(sync_client=True) as client:
        while waiting:
            states: Counter[str] = Counter()
            try:
                runs = _poll(client, list(waiting), flow_runs)
            except Exception as exc:  # noqa: BLE001 - keep waiting; the deadline bounds it
                runs = []
                states["unreachable"] = len(waiting)
                if time.monotonic() - last_log > 2:
                    logger.warning("%s: cannot read run states (%s); still waiting", label, exc)
            for run in runs:
                if run.state is None:
                    continue
                last[run.id] = f"task run {run.name} still {run.state.name}"
                if run.state.is_final():
                    out.values[run.id] = _value(run.state)
                    waiting.discard(run.id)
                else:
                    states[run.state.name] += 1
            now = time.monotonic()
            if not waiting or now - last_log > 2:
                done = sum(weights[r] for r in out.values)
                busy = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none left"
                logger.info("%s: %d/%d done; runs waiting: %s", label, done, total, busy)
                last_log = now
            if waiting and now > deadline:
                out.unfinished.update({r: f"timed out; {last.get(r, 'run state unknown')}" for r in waiting})
                break
            time.sleep(interval)
            interval = min(1.0, interval * 1.5)
    return out


@flow(name="fanout")
def fanout(
    items: int = 1000,
    chunk_size: int | None = None,
    fail_items: list[int] | None = None,
    heavy_batches: int = 0,
    heavy_segments: int = 8,
    heavy_span: int = 40_000,
    compare_serial: bool = False,
    heavy_cpus: int | None = None,
    heavy_memory: str = "1Gi",
    item_sleep: float = 0.0,
    crash_items: list[int] | None = None,
    work: str = "checksum",
    timeout: float = 1800.0,
) -> FanoutSummary:
    """Fan `items` light items out to the light pool and `heavy_batches` heavy batches to
    the heavy pool, wait for all of them, and account for every item.

    With `heavy_cpus`, heavy batches instead run as the `crunch` deployment, each in its
    own flow-run pod with that many CPUs (and `heavy_memory`) requested and limited.
    """
    fail_items = list(fail_items or [])
    validate(
        items=items,
        chunk_size=chunk_size,
        fail_items=fail_items,
        heavy_batches=heavy_batches,
        heavy_segments=heavy_segments,
        heavy_span=heavy_span,
        timeout=timeout,
        heavy_cpus=heavy_cpus,
        item_sleep=item_sleep,
        crash_items=list(crash_items or []),
        work=work,
    )
    logger = get_run_logger()
    t0 = time.monotonic()
    summary = FanoutSummary(items=items, chunk_size=0, task_runs=0, flow_run_id=str(flow_run.id))
    fail = set(fail_items)
    crash = set(crash_items or ())

    heavy: dict[UUID, int] = {}
    heavy_unsubmitted: dict[int, str] = {}
    for b in range(heavy_batches):
        try:
            if heavy_cpus:
                run = run_deployment(
                    CRUNCH_DEPLOYMENT,
                    parameters={"batch": b, "segments": heavy_segments, "span": heavy_span},
                    job_variables={
                        "cpu_request": str(heavy_cpus),
                        "cpu_limit": str(heavy_cpus),
                        "memory_request": heavy_memory,
                        "memory_limit": heavy_memory,
                    },
                    timeout=0,
                )
                heavy[run.id] = b
            else:
                heavy[heavy_batch.delay(b, heavy_segments, heavy_span, compare_serial).task_run_id] = b
        except Exception as exc:  # noqa: BLE001 - reported, not lost
            heavy_unsubmitted[b] = f"submission failed: {exc}"

    specs = [
        {"item": i, "work": work, "sleep": item_sleep, "fail": i in fail, "crash": i in crash} for i in range(items)
    ]
    light = fan_out(process_item, specs, chunk_size=chunk_size, timeout=timeout, progress=False)
    summary.results = [o.value for o in light.outcomes if o.ok]
    summary.failed = light.failed
    summary.chunk_size = light.chunk_size
    summary.task_runs = light.task_runs + len(heavy)
    summary.submit_seconds = light.submit_seconds
    summary.redelivered = light.redelivered
    deadline = t0 + timeout

    if heavy:
        hwaited = wait_for_runs(dict.fromkeys(heavy, 1), deadline, "heavy batches", flow_runs=bool(heavy_cpus))
        for run_id, b in heavy.items():
            value = hwaited.values.get(run_id)
            if run_id in hwaited.unfinished or isinstance(value, BaseException):
                summary.heavy_failed[b] = hwaited.unfinished.get(run_id) or f"{type(value).__name__}: {value}"
            else:
                summary.heavy.append(value)
    summary.heavy_failed.update(heavy_unsubmitted)

    summary.results.sort(key=lambda r: r["item"])
    summary.per_worker = dict(Counter(r["worker"] for r in summary.results))
    summary.seconds = time.monotonic() - t0
    logger.info(
        "done: %d/%d items in %.1fs (%.1f items/s), %d failed",
        summary.completed,
        items,
        summary.seconds,
        summary.items_per_second,
        len(summary.failed),
    )
    return summary


def format_summary(s: FanoutSummary) -> str:
    """The human-readable report: totals, items per worker process, heavy speed-ups."""
    lines = [
        f"items: {s.completed}/{s.items} completed, {len(s.failed)} failed, "
        f"{s.task_runs} task runs (chunk size {s.chunk_size})",
        f"wall time: {s.seconds:.1f}s, {s.items_per_second:.1f} items/s, "
        f"{s.redelivered} task runs delivered again after a worker or server loss",
        "items per worker process:",
    ]
    lines += [f"  {w:<40} {n:>7}" for w, n in sorted(s.per_worker.items())]
    for item, reason in sorted(s.failed.items())[:20]:
        lines.append(f"  FAILED item {item}: {reason}")
    if len(s.failed) > 20:
        lines.append(f"  ... and {len(s.failed) - 20} more failed items")
    for h in sorted(s.heavy, key=lambda h: h["batch"]):
        line = (
            f"heavy batch {h['batch']} on {h['worker']}: {h['primes']} primes, "
            f"{h['processes']} processes ({len(h['pids'])} used), pool {h['seconds']:.2f}s"
        )
        if "serial_seconds" in h:
            line += f", serial {h['serial_seconds']:.2f}s, speed-up {h['serial_seconds'] / h['seconds']:.2f}x"
        lines.append(line)
    for b, reason in sorted(s.heavy_failed.items()):
        lines.append(f"  FAILED heavy batch {b}: {reason}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fanout_demo.flow", description="Run the fan-out flow and report.")
    p.add_argument("--items", type=int, default=1000, help="light items to fan out")
    p.add_argument("--chunk-size", type=int, default=None, help="items per task run (default: automatic)")
    p.add_argument("--fail-items", default="", help="comma-separated item ids that raise (error-path demo)")
    p.add_argument("--work", default="checksum", help=f"per-item function: {', '.join(sorted(workload.WORK))}")
    p.add_argument("--item-sleep", type=float, default=0.0, help="seconds of simulated I/O per item")
    p.add_argument("--crash-items", default="", help="comma-separated item ids that kill their worker (recovery demo)")
    p.add_argument("--heavy-batches", type=int, default=0, help="CPU-heavy batches for the heavy pool")
    p.add_argument("--heavy-segments", type=int, default=8, help="segments per heavy batch")
    p.add_argument("--heavy-span", type=int, default=40_000, help="integers per segment")
    p.add_argument("--compare-serial", action="store_true", help="also time each heavy batch serially")
    p.add_argument(
        "--heavy-cpus",
        type=int,
        default=None,
        help=f"run heavy batches as the {CRUNCH_DEPLOYMENT} deployment in pods of this many CPUs",
    )
    p.add_argument("--heavy-memory", default="1Gi", help="memory request/limit of those pods")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for all results")
    p.add_argument(
        "--json",
        metavar="FILE",
        help="write the full summary (with every result) as JSON; `-`: one stdout line, prefixed FANOUT-SUMMARY",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fail_items = [int(x) for x in args.fail_items.split(",") if x.strip()]
        crash_items = [int(x) for x in args.crash_items.split(",") if x.strip()]
    except ValueError:
        parser.error("--fail-items and --crash-items take comma-separated integers")
    params = dict(
        items=args.items,
        chunk_size=args.chunk_size,
        fail_items=fail_items,
        heavy_batches=args.heavy_batches,
        heavy_segments=args.heavy_segments,
        heavy_span=args.heavy_span,
        timeout=args.timeout,
        heavy_cpus=args.heavy_cpus,
        item_sleep=args.item_sleep,
        crash_items=crash_items,
        work=args.work,
    )
    try:
        validate(**params)
    except ValueError as exc:
        parser.error(str(exc))
    summary = fanout(**params, compare_serial=args.compare_serial, heavy_memory=args.heavy_memory)
    print(format_summary(summary), flush=True)
    if args.json:
        data = dataclasses.asdict(summary) | {
            "completed": summary.completed,
            "items_per_second": summary.items_per_second,
        }
        if args.json == "-":  # one line on stdout, e.g. for a pod's log
            print("FANOUT-SUMMARY " + json.dumps(data), flush=True)
        else:
            with open(args.json, "w") as f:
                json.dump(data, f)
    sys.exit(1 if summary.failed or summary.heavy_failed else 0)


if __name__ == "__main__":
    main()
