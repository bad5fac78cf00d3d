"""The fan-out API: your function over your items, on the task workers, every item accounted for.

    import fanout

    result = fanout.fan_out(resize, paths)            # a Prefect @task or a plain function
    result.values                                     # results in item order (raises if any failed)
    result.failed                                     # {index: reason}
    for outcome in fanout.fan_out_iter(resize, huge):  # as they complete, bounded memory
        ...

The function must be importable by the workers (defined at module level) and served by
them: `python -m fanout.worker --tasks mymodule:resize` (or a chart pool's `tasks:`).
Items are any picklable values. What it does for you:

- **Chunking.** Items travel many per task run (a chunk task, see `fanout.chunks`),
  sized from the live worker slots that serve the function and the number of items: a
  small fan-out uses every slot, a large one amortises Prefect's per-run cost. Pass
  `chunk_size=1` for one task run per item, or any size you like.
- **Accounting.** Every item ends with exactly one outcome: its result, or the reason it
  failed (it raised, its task run failed or crashed, its submission failed, no worker
  serves its code, or the timeout passed). One item that raises never sinks its chunk.
- **Never waits forever.** A timeout bounds the whole fan-out; a server restart while
  submitting or waiting is ridden out; a function whose code differs between you and the
  workers is named after a minute instead of waited on.
- **Fast submission**: runs are created many at a time over one client (`fanout.submit`).
- **Prompt outcomes**: in a fan-out of at most `settings.EVENTS_MAX_RUNS` task runs, a
  run's outcome is taken from its terminal event as it happens (the server writes states
  to its database in batches, up to a second later); the API is read too, every 0.2-1 s,
  for the events this process missed (and alone, for larger fan-outs).
- **Progress**: a log line every few seconds, and a bar when stderr is a terminal.

Works inside a flow (sync, or `afan_out` from an async one) and outside any flow.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import Task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.client.schemas.objects import TaskRun
from prefect.states import Failed
from prefect.variables import Variable

from fanout import settings
from fanout.chunks import ChunkFailed, chunk_task, describe, function_of
from fanout.internals import final_states_seen, sync_result
from fanout.liveness import ledger_name, read_heartbeats, unserved_reason
from fanout.retention import Remover, parameters_key, result_key
from fanout.submit import create_runs

POLL_PAGE = 200  # the API's default page size
MAX_ITEMS = 10_000_000  # more in one fan-out is a mistake (or needs fan_out_iter in parts)
MAX_TASK_RUNS = 20_000  # the server queues at most this many waiting runs per task (settings.SERVER_SETTINGS)


@dataclass(frozen=True)
class ItemOutcome:
    """What became of one item: `value` when `ok`, else `error` (the reason)."""

    index: int
    ok: bool
    value: Any = None
    error: str | None = None


class FanOutFailed(Exception):
    """Some items of a fan-out failed; `failed` maps item index -> reason."""

    def __init__(self, failed: dict[int, str]) -> None:
        self.failed = failed
        shown = "; ".join(f"item {i}: {why}" for i, why in sorted(failed.items())[:5])
        more = f" (+{len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} items failed: {shown}{more}")


@dataclass
class FanOutResult:
    """Every item's outcome in item order, plus what it took."""

    function: str
    outcomes: list[ItemOutcome]
    chunk_size: int = 0
    task_runs: int = 0
    seconds: float = 0.0
    submit_seconds: float = 0.0  # creating every task run
    redelivered: int = 0  # task runs delivered again after a worker died or the server restarted

    @property
    def values(self) -> list[Any]:
        """Every item's result, in item order; raises FanOutFailed if any item failed."""
        if self.failed:
            raise FanOutFailed(self.failed)
        return [o.value for o in self.outcomes]

    @property
    def failed(self) -> dict[int, str]:
        return {o.index: o.error or "failed" for o in self.outcomes if not o.ok}

    @property
    def completed(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def items_per_second(self) -> float:
        return len(self.outcomes) / self.seconds if self.seconds else 0.0


@dataclass
class _Stats:
    chunk_size: int = 0
    task_runs: int = 0
    submit_seconds: float = 0.0
    redelivered: int = 0


def auto_chunk_size(items: int | None, slots: int) -> int:
    """Items per task run: about RUNS_PER_SLOT task runs per live worker slot serving the
    function (at least one run per slot while items last), and at most
    MAX_AUTO_TASK_RUNS runs in all; STREAM_CHUNK_SIZE when the count is unknown.

    One run per slot: each task run costs ~50 ms of submitter and server time on our
    2-core machines, so fewer runs finish sooner (1,000 trivial items on 16 slots: 2.6 s
    in 16 runs against 4.5 s in 63 with four per slot). The price is balance: a slot
    that gets slow items is not helped by the others; pass `chunk_size` to choose."""
    if items is None:
        return settings.STREAM_CHUNK_SIZE
    runs = settings.MAX_AUTO_TASK_RUNS
    if slots > 0:
        runs = min(runs, slots * settings.RUNS_PER_SLOT)
    return max(1, math.ceil(items / max(1, runs)))


def validate(fn: Any, items: Any, chunk_size: int | None, timeout: float) -> None:
    """Reject bad arguments, naming them, before anything is submitted."""
    problems = []
    call = function_of(fn) if isinstance(fn, Task) or callable(fn) else None
    if call is None:
        problems.append(f"fn must be a Prefect task or a function, got {type(fn).__name__}")
    elif "<locals>" in getattr(call, "__qualname__", "") or getattr(call, "__name__", "") == "<lambda>":
        problems.append(
            f"fn {getattr(call, '__qualname__', call)!r} must be defined at module level, "
            "so that workers can import and serve it"
        )
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        problems.append(f"items must be an iterable of items, got {type(items).__name__}")
    elif hasattr(items, "__len__") and len(items) > MAX_ITEMS:
        problems.append(f"items must be at most {MAX_ITEMS:,} per fan-out, got {len(items):,}; use fan_out_iter")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        problems.append(f"chunk_size must be an integer >= 1 (or None for automatic), got {chunk_size!r}")
    elif chunk_size and hasattr(items, "__len__") and math.ceil(len(items) / chunk_size) > MAX_TASK_RUNS:
        problems.append(
            f"chunk_size {chunk_size} would create {math.ceil(len(items) / chunk_size):,} task runs, more than "
            f"{MAX_TASK_RUNS:,}: use chunk_size >= {math.ceil(len(items) / MAX_TASK_RUNS)} (or omit it)"
        )
    if not timeout or timeout <= 0:
        problems.append(f"timeout must be > 0 seconds, got {timeout!r}")
    if problems:
        raise ValueError("invalid fan-out: " + "; ".join(problems))


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run
        return logging.getLogger("fanout")


def live_slots(client: Any, task_key: str) -> int:
    """Task runs at once that live workers serving `task_key` take, from their heartbeats."""
    now = time.time()
    beats = read_heartbeats(client).values()
    return sum(hb.limit for hb in beats if hb.alive(now, settings.STALE_AFTER) and task_key in hb.task_keys)


def served_keys(client: Any) -> set[str]:
    """Task keys that workers with a heartbeat (live, or late but not expired) serve."""
    return {k for hb in read_heartbeats(client).values() for k in hb.task_keys}


class _Progress:
    """A log line every few seconds; a bar on stderr when it is a terminal."""

    def __init__(self, label: str, total: int | None, show: bool | None) -> None:
        self.label, self.total, self.done, self.failed = label, total, 0, 0
        self.bar = sys.stderr.isatty() if show is None else show
        self.log = _logger()
        self.last = 0.0

    def update(self, done: int, failed: int, states: Counter[str], force: bool = False) -> None:
        self.done, self.failed = done, failed
        now = time.monotonic()
        if self.bar:
            total = self.total or max(done, 1)
            width = 30
            filled = int(width * min(done, total) / total)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total or '?'}")
            sys.stderr.flush()
        if force or now - self.last > 2:
            busy = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none left"
            of = f"/{self.total}" if self.total is not None else ""
            self.log.info("%s: %d%s done (%d failed); task runs waiting: %s", self.label, done, of, failed, busy)
            self.last = now

    def close(self) -> None:
        if self.bar:
            sys.stderr.write("\n")
            sys.stderr.flush()


def fan_out_iter(
    fn: Callable[..., Any] | Task[..., Any],
    items: Iterable[Any],
    *,
    chunk_size: int | None = None,
    timeout: float = 3600.0,
    max_in_flight: int | None = None,
    progress: bool | None = None,
    _stats: _Stats | None = None,
) -> Iterator[ItemOutcome]:
    """Fan `fn` out over `items`; yield each item's outcome as its chunk finishes.

    Items are read lazily and at most `max_in_flight` task runs (default
    ITER_MAX_IN_FLIGHT, 1,000) are submitted and not yet finished at once, so a fan-out
    of millions keeps bounded memory here (the items of those runs, at most). Every item
    is yielded exactly once; after `timeout` seconds the ones left are yielded as failed
    ("timed out; ...").
    """
    validate(fn, items, chunk_size, timeout)
    stats = _stats or _Stats()
    deadline = time.monotonic() + timeout
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    base = chunk_task(fn)
    name = getattr(function_of(fn), "__name__", "items")
    tag = f"fanout-{uuid.uuid4().hex[:12]}"
    task = copy.copy(base)
    task.tags = {*base.tags, tag}
    bar = _Progress(name, total, progress)
    log = bar.log

    with get_client(sync_client=True) as client:
        try:
            slots = live_slots(client, task.task_key)
        except Exception:  # noqa: BLE001 - no heartbeats yet (server starting); size as if unknown
            slots = 0
        size = chunk_size or auto_chunk_size(total, slots)
        window = max_in_flight or max(settings.ITER_MAX_IN_FLIGHT, 4 * slots)
        stats.chunk_size = size
        source = iter(items)
        next_index = 0
        pending: list[tuple[int, list[Any]]] = []  # chunks to (re)submit
        in_flight: dict[UUID, tuple[int, int]] = {}  # run -> (start, stop)
        missing: dict[UUID, bool] = {}  # runs a read did not return
        stored: dict[UUID, str] = {}  # run -> its parameters' key, deleted once its result is read
        unreadable: dict[UUID, float] = {}  # Completed run -> when its result first could not be read
        remover = Remover()
        states: Counter[str] = Counter()
        done = failed = 0
        started = time.monotonic()
        unserved_checked = False
        exhausted = False
        submit_error = ""
        interval = 0.2
        runs_in_flight: dict[UUID, TaskRun] = {}  # as created, for the runs whose final state an event gave
        unsettled: set[UUID] = set()  # runs finished by an event that the API has not shown final yet
        timed_out = False
        runs_expected = math.ceil(total / size) if total else None
        events = _events_watched() if runs_expected and runs_expected <= settings.EVENTS_MAX_RUNS else _no_events

        def finish(run: TaskRun) -> list[ItemOutcome] | None:
            """The outcomes of a run in flight whose state is final (the run is then
            done with), or None while it is not, or its result is not readable yet."""
            nonlocal interval
            if run.state is None or run.id not in in_flight:
                return None
            if not run.state.is_final():
                states[run.state.name] += 1
                return None
            value = _read_result(run)
            if isinstance(value, _Unreadable) and run.state.is_completed() and run.state.name != "RolledBack":
                # Prefect sets Completed before it writes the result (the write
                # commits the run's transaction; prefect.task_engine): a reader can
                # come too early, and longer so while the storage rides out an
                # outage. Read it again. (RolledBack: the write failed for good.)
                first = unreadable.setdefault(run.id, time.monotonic())
                if time.monotonic() - first < settings.RESULT_PATIENCE:
                    states["Completed, result not stored yet"] += 1
                    return None
            unreadable.pop(run.id, None)
            start, stop = in_flight.pop(run.id)
            runs_in_flight.pop(run.id, None)
            # Read: its parameters and result are of no more use to anyone.
            remover.add([stored.pop(run.id, None), result_key(run.state)])
            interval = 0.2
            return _outcomes(run, start, stop, value)

        try:
            while True:
                # 1. fill the window: read more items, create their task runs
                while not exhausted and len(pending) + len(in_flight) < window:
                    batch = list(itertools.islice(source, size))
                    if not batch:
                        exhausted = True
                        break
                    pending.append((next_index, batch))
                    next_index += len(batch)
                if pending and len(in_flight) < window:
                    take, pending = pending[: window - len(in_flight)], pending[window - len(in_flight) :]
                    calls = [{"start": s, "stop": s + len(b), "items": b} for s, b in take]
                    t0 = time.monotonic()
                    created = create_runs(task, calls)  # refuses the window whole if a chunk is too big
                    stats.submit_seconds += time.monotonic() - t0
                    for (start, batch), run in zip(take, created, strict=True):
                        if isinstance(run, Exception):  # server away: submit again, until the deadline
                            pending.append((start, batch))
                            submit_error = describe(run)
                        else:
                            in_flight[run.id] = (start, start + len(batch))
                            runs_in_flight[run.id] = run
                            if run.state and run.state.state_details.task_parameters_id:
                                stored[run.id] = parameters_key(run.state.state_details.task_parameters_id)
                            stats.task_runs += 1
                    if pending and time.monotonic() - bar.last > 2:
                        log.warning("%s: %d chunks not submitted yet (%s); retrying", name, len(pending), submit_error)
                if exhausted and not pending and not in_flight:
                    break
                # 2. read the states of the runs in flight; yield the items of finished ones
                states = Counter()
                try:
                    runs = _read_runs(client, [*in_flight, *unsettled])
                except Exception as exc:  # noqa: BLE001 - server restarting: keep waiting, the deadline bounds it
                    runs = []
                    states["unreachable"] = len(in_flight)
                    if time.monotonic() - bar.last > 2:
                        log.warning("%s: cannot read task-run states (%s); still waiting", name, exc)
                else:
                    # A run that no longer exists (deleted: a worker that could not load
                    # its task deletes it) is failed, not waited on.
                    found = {r.id for r in runs}
                    for run_id in [r for r in in_flight if r not in found]:
                        if missing.get(run_id):
                            start, stop = in_flight.pop(run_id)
                            runs_in_flight.pop(run_id, None)
                            for i in range(start, stop):
                                done, failed = done + 1, failed + 1
                                yield ItemOutcome(i, False, error=f"task run {run_id} was deleted before it finished")
                        missing[run_id] = True
                for run in runs:
                    if run.state is not None and run.state.is_final():
                        unsettled.discard(run.id)
                    for outcome in finish(run) or ():
                        done += 1
                        failed += not outcome.ok
                        yield outcome
                remover.flush()
                # 3. a function no live worker serves with this code is named, not waited on
                if not unserved_checked and in_flight and time.monotonic() - started > settings.UNSERVED_PATIENCE:
                    unserved_checked = True
                    for run_id, reason in _unserved(client, task.task_key, runs, log, name).items():
                        start, stop = in_flight.pop(run_id)
                        runs_in_flight.pop(run_id, None)
                        for i in range(start, stop):
                            done, failed = done + 1, failed + 1
                            yield ItemOutcome(i, False, error=reason)
                bar.update(done, failed, states)
                if time.monotonic() > deadline:
                    for start, stop in in_flight.values():
                        for i in range(start, stop):
                            yield ItemOutcome(i, False, error="timed out; its task run had not finished")
                    for start, batch in pending:
                        for i in range(start, start + len(batch)):
                            yield ItemOutcome(i, False, error=f"timed out; not submitted: {submit_error}")
                    for i, _ in enumerate(source, next_index):
                        yield ItemOutcome(i, False, error="timed out before it was submitted")
                    timed_out = True
                    break
                if not (in_flight or pending):
                    continue
                # 4. until the next read: the runs whose final state arrived as an event are
                # done at once (the server records states in batches, up to a second later)
                wake = time.monotonic() + interval
                interval = min(1.0, interval * 1.5)
                step = EVENT_CHECK_SECONDS if events is not _no_events else 1.0
                while True:
                    finished = False
                    for run_id, state in events(list(in_flight)).items() if in_flight else ():
                        unsettled.add(run_id)
                        for outcome in finish(runs_in_flight[run_id].model_copy(update={"state": state})) or ():
                            done, failed, finished = done + 1, failed + (not outcome.ok), True
                            yield outcome
                    if finished:
                        remover.flush()
                        bar.update(done, failed, states)
                    left = wake - time.monotonic()
                    if left <= 0 or not (in_flight or pending):
                        break
                    time.sleep(min(step, left))
            if unsettled and not timed_out:
                _settle(client, unsettled, log, name)
        finally:
            remover.flush()
            bar.update(done, failed, states, force=True)
            bar.close()
            stats.redelivered = _redelivered(tag)


def fan_out(
    fn: Callable[..., Any] | Task[..., Any],
    items: Iterable[Any],
    *,
    chunk_size: int | None = None,
    timeout: float = 3600.0,
    progress: bool | None = None,
) -> FanOutResult:
    """Fan `fn` out over `items` on the task workers and wait; every item's outcome in
    item order (see the module docstring). Never raises for a failed item: read
    `result.failed`, or `result.values`, which raises FanOutFailed naming them."""
    validate(fn, items, chunk_size, timeout)  # before list(): a non-iterable is named, not a TypeError
    items = items if hasattr(items, "__len__") else list(items)
    t0 = time.monotonic()
    stats = _Stats()
    outcomes: list[ItemOutcome | None] = [None] * len(items)  # type: ignore[arg-type]
    # Every item is in memory already: submit every chunk at once (a window would only
    # hold submission back behind completions).
    every = MAX_TASK_RUNS
    for outcome in fan_out_iter(
        fn, items, chunk_size=chunk_size, timeout=timeout, max_in_flight=every, progress=progress, _stats=stats
    ):
        outcomes[outcome.index] = outcome
    missing = [i for i, o in enumerate(outcomes) if o is None]
    for i in missing:  # cannot happen; never report an item as nothing
        outcomes[i] = ItemOutcome(i, False, error="no outcome recorded")
    name = getattr(function_of(fn), "__name__", "items")
    return FanOutResult(
        function=name,
        outcomes=outcomes,  # type: ignore[arg-type]
        chunk_size=stats.chunk_size,
        task_runs=stats.task_runs,
        seconds=time.monotonic() - t0,
        submit_seconds=stats.submit_seconds,
        redelivered=stats.redelivered,
    )


async def afan_out(
    fn: Callable[..., Any] | Task[..., Any],
    items: Iterable[Any],
    *,
    chunk_size: int | None = None,
    timeout: float = 3600.0,
    progress: bool | None = None,
) -> FanOutResult:
    """`fan_out` for async code (an async flow): runs in a thread, with the caller's
    context, so the event loop keeps running."""
    return await asyncio.to_thread(fan_out, fn, items, chunk_size=chunk_size, timeout=timeout, progress=progress)


# -- helpers ----------------------------------------------------------------------------


EVENT_CHECK_SECONDS = 0.05  # how often a waiting fan-out looks at the final states events brought
SETTLE_CHECK_SECONDS = 0.1  # how often it reads the API for runs an event finished (see _settle)


def _no_events(ids: list[UUID]) -> dict[UUID, Any]:
    return {}


def _events_watched() -> Callable[[list[UUID]], dict[UUID, Any]]:
    """`final_states_seen`, once this process listens to task-run events; if it cannot
    (no events websocket), nothing: the fan-out then learns every state from the API."""
    try:
        final_states_seen([])
    except Exception as exc:  # noqa: BLE001 - the API reads alone still account for every run
        _logger().debug("not watching task-run events: %s", exc)
        return _no_events
    return final_states_seen


def _settle(
    client: Any, ids: set[UUID], log: logging.Logger | logging.LoggerAdapter[logging.Logger], name: str
) -> None:
    """Wait, at most settings.SETTLE_SECONDS, until the API shows the runs `ids` final
    (their outcomes came from events; the server's recorder writes states in batches),
    so that the Prefect UI shows what the fan-out returned. A run the API no longer
    has (deleted) is settled too."""
    left = set(ids)
    until = time.monotonic() + settings.SETTLE_SECONDS
    while left and time.monotonic() < until:
        time.sleep(SETTLE_CHECK_SECONDS)
        try:
            runs = _read_runs(client, list(left))
        except Exception:  # noqa: BLE001 - server restarting: bounded by `until`
            continue
        seen = {r.id for r in runs}
        left -= {r.id for r in runs if r.state is not None and r.state.is_final()} | (left - seen)
    if left:
        log.info("%s: %d task runs not shown final by the API after %.0f s; returning", name, len(left),
                 settings.SETTLE_SECONDS)  # fmt: skip


def _read_runs(client: Any, ids: list[UUID]) -> list[TaskRun]:
    runs: list[TaskRun] = []
    for i in range(0, len(ids), POLL_PAGE):
        page = ids[i : i + POLL_PAGE]
        runs += client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=page)), limit=len(page))
    return runs


@dataclass
class _Unreadable:
    """Why a finished run's result could not be read."""

    error: Exception


def _read_result(run: TaskRun) -> Any:
    """A finished run's result (a failed run's exception), or _Unreadable."""
    assert run.state is not None
    try:
        # Synchronously: this runs in a plain thread even under an async flow (afan_out).
        return sync_result(run.state)
    except Exception as exc:  # noqa: BLE001 - an unreadable result fails its items, in the end
        return _Unreadable(exc)


def _outcomes(run: TaskRun, start: int, stop: int, value: Any) -> list[ItemOutcome]:
    """Each item of a finished chunk run: its result, or why it has none (`value`: what
    _read_result gave)."""
    assert run.state is not None
    if isinstance(value, _Unreadable):
        value = value.error
    if isinstance(value, ChunkFailed):
        return [
            ItemOutcome(i, True, value=value.results[i])
            if i in value.results
            else ItemOutcome(i, False, error=value.errors.get(i, "no result"))
            for i in range(start, stop)
        ]
    if isinstance(value, BaseException):
        why = f"task run {run.name} {run.state.name}: {describe(value)}"
        return [ItemOutcome(i, False, error=why) for i in range(start, stop)]
    if not isinstance(value, dict):
        why = f"task run {run.name} {run.state.name} without a chunk result ({type(value).__name__})"
        return [ItemOutcome(i, False, error=why) for i in range(start, stop)]
    return [
        ItemOutcome(i, True, value=value[i]) if i in value else ItemOutcome(i, False, error="missing from its chunk")
        for i in range(start, stop)
    ]


def _unserved(client: Any, task_key: str, runs: list[TaskRun], log: Any, name: str) -> dict[UUID, str]:
    """Runs still Scheduled whose code no live worker runs (workers serve the same function
    with other code): failed with that reason. Absent workers only get a warning (a pool
    may be scaling up from zero; the reaper fails such runs after its own time)."""
    try:
        reason = unserved_reason(task_key, served_keys(client))
    except Exception as exc:  # noqa: BLE001 - keep waiting; the reaper reports it too
        log.warning("%s: cannot check which workers serve it: %s", name, exc)
        return {}
    scheduled = [r for r in runs if r.state is not None and r.state.is_scheduled()]
    if reason is None or not scheduled:
        return {}
    if "code differs" not in reason:
        log.warning("%s: %d task runs still wait: %s", name, len(scheduled), reason)
        return {}
    log.error("%s: %d task runs will never run: %s", name, len(scheduled), reason)
    out = {}
    for run in scheduled:
        try:
            client.set_task_run_state(run.id, Failed(message=f"not run: {reason}"), force=True)
        except Exception as exc:  # noqa: BLE001 - reported to the caller either way
            log.warning("could not mark %s failed: %s", run.id, exc)
        out[run.id] = f"not run: {reason}"
    return out


def _redelivered(tag: str) -> int:
    """How many of this fan-out's task runs the reaper scheduled again (its ledger)."""
    try:
        name = ledger_name(tag)
        count = int(Variable.get(name, default=0))
        if count:
            Variable.unset(name)
        return count
    except Exception:  # noqa: BLE001 - a statistic; never fail the fan-out for it
        return -1
