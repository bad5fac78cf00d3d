"""Task-worker entry point: `python -m fanout.worker --tasks mymodule:resize,...`.

Serves exactly the tasks named (`module:attribute`: a Prefect task, which it serves for
plain `.delay()` and for `fanout.fan_out`, or a plain function, for `fanout.fan_out`)
with a concurrency limit, and answers Kubernetes probes at a configurable address:
`/readyz` (subscribed and not draining: give me runs; `/healthz` is the same), `/livez`
(its event loop still turns: a worker that only lost the server for a while is not
restarted for it) and `/status` (JSON). `--pool` only names the pool
in logs and heartbeats.

It differs from Prefect's stock `TaskWorker` in one deliberate way: it takes a slot
*before* it reads the next run from the server, and acks only then. Prefect's worker
acks every run on arrival and queues it locally; if the process dies those runs are
lost. Here a run the worker cannot start yet stays un-acked on the server side, which
re-queues it if the connection drops.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import anyio.abc
import httpx
import orjson
import websockets.exceptions
from prefect import Task
from prefect.blocks.core import Block
from prefect.client.schemas.objects import TaskRun
from prefect.client.subscriptions import Subscription
from prefect.context import AsyncClientContext, SyncClientContext
from prefect.results import aresolve_result_storage
from prefect.settings import (
    PREFECT_TASKS_SCHEDULING_DELETE_FAILED_SUBMISSIONS,
    get_current_settings,
    temporary_settings,
)
from prefect.states import Failed
from prefect.task_worker import TaskWorker
from prefect.variables import Variable

from fanout import internals, settings
from fanout.chunks import chunk_task
from fanout.cpu import available_cpus
from fanout.internals import set_task_key, without_settings
from fanout.liveness import Heartbeat, variable_name
from fanout.metrics import CONTENT_TYPE, WorkerMetrics
from fanout.processpool import close_process_pools, warm_engine, warm_process_pool
from fanout.replicas import replica_spec, replica_urls
from fanout.storage import storage_setting

log = logging.getLogger("fanout.worker")


class RunThreads(ThreadPoolExecutor):
    """The threads a worker runs its task runs in; each run uses this worker's own
    Prefect settings (its pod's API URL, storage), not the copy the submitter sent along
    in the run's context (see `fanout_demo.tasks.without_settings`)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        context = kwargs.get("context")
        if isinstance(context, dict):
            kwargs["context"] = without_settings(context)
        return super().submit(fn, *args, **kwargs)


class FanoutWorker(TaskWorker):
    """A TaskWorker that acks a run only when it has a free slot to start it, and that
    drains on SIGTERM/SIGINT: it stops taking runs, leaves the one it was offered but
    had not acked to the server (which re-queues it when the socket closes), finishes
    the runs in flight, and exits 0."""

    def __init__(self, *tasks: Any, limit: int, pool: str) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        super().__init__(*tasks, limit=limit)
        # TaskWorker keeps `with_options` copies of the tasks, which recompute their task
        # keys from the function: our chunk tasks (fanout.chunks) carry their own key, so
        # give each copy back the key of the task it was made from.
        for copy_, task in zip(self.tasks, tasks, strict=True):
            set_task_key(copy_, task.task_key)
        self._executor = RunThreads(max_workers=limit)
        self.pool = pool
        self.connections: dict[Any, bool] = {}  # subscription -> connected, one per API replica
        self.received: Counter[str] = Counter()  # runs taken, per API replica URL
        self._slot_lock = anyio.Lock()  # see _next_run
        self.loop_tick = time.monotonic()  # last turn of the event loop (/livez)
        self._intake: anyio.CancelScope | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free_since: float | None = None
        self.handed_back = 0  # offers handed back while every slot was busy (see _next_run)
        self._taken: dict[str, tuple[str, float]] = {}  # run id -> (run name, monotonic start)
        self.metrics = WorkerMetrics(pool, limit, lambda: len(self.in_flight()))

    def handle_sigterm(self, signum: int, frame: object) -> None:  # overrides Prefect's exit-at-once
        if self.stopping:
            return
        self.stopping = True
        log.info("signal %d: draining (no new runs; finishing %d in flight)", signum, len(self.in_flight()))
        if self._loop is not None and self._intake is not None:
            self._loop.call_soon_threadsafe(self._intake.cancel)

    async def _subscribe_to_task_scheduling(self) -> None:  # overrides Prefect's loop
        base_url = get_current_settings().api.url
        if not base_url:
            raise ValueError("PREFECT_API_URL must point at a Prefect server")
        assert self._limiter is not None and self._runs_task_group is not None
        for t in self.tasks:
            # Resolve result storage once; Prefect would resolve (and build an API
            # client, loading the CA bundle) for every run otherwise.
            if t.result_storage is not None and not isinstance(t.result_storage, Block):
                t.result_storage = await aresolve_result_storage(t.result_storage)
        signal.signal(signal.SIGINT, self.handle_sigterm)
        self._loop = asyncio.get_running_loop()
        self._intake = anyio.CancelScope()
        log.info("worker %s serving pool %r (limit %d)", self.client_id, self.pool, self.limit)
        with self._intake:
            async with anyio.create_task_group() as intakes:
                await self._follow_replicas(base_url, intakes)
        # Every acked run holds a slot until it is finished. Wait for all of them here:
        # TaskWorker.__aexit__ shuts its thread pool down before it waits for its task
        # group, which would fail a run that was acked but not yet handed to a thread.
        while self._limiter.borrowed_tokens:
            await asyncio.sleep(0.1)

    async def _follow_replicas(self, base_url: str, intakes: anyio.abc.TaskGroup) -> None:
        """One intake per API replica (see fanout.replicas), started and stopped as the
        replicas come and go; looked up every settings.REPLICAS_REFRESH_SECONDS."""
        spec = replica_spec()
        scopes: dict[str, anyio.CancelScope] = {}
        while not self.stopping:
            try:
                urls = await asyncio.to_thread(replica_urls, spec, base_url)
            except OSError as exc:  # DNS away for a while: keep the replicas we know
                log.warning("API replicas not looked up (%s); keeping %d", exc, len(scopes))
                urls = list(scopes) or [base_url]
            for url in [u for u in scopes if u not in urls]:
                log.info("API replica %s gone: unsubscribing", url)
                scopes.pop(url).cancel()
            for url in [u for u in urls if u not in scopes]:
                if spec:
                    log.info("subscribing to API replica %s", url)
                scopes[url] = anyio.CancelScope()
                intakes.start_soon(self._intake_from, url, scopes[url])
            if not spec:
                await anyio.sleep_forever()  # one server: nothing to look up again
            await asyncio.sleep(settings.REPLICAS_REFRESH_SECONDS)

    async def _intake_from(self, url: str, scope: anyio.CancelScope) -> None:
        """Take runs from the API replica at `url` until drained or the replica is gone."""
        assert self._runs_task_group is not None
        sub: Subscription[TaskRun] = Subscription(
            model=TaskRun,
            path="/task_runs/subscriptions/scheduled",
            keys=self.task_keys,
            client_id=self.client_id,
            base_url=url,
        )
        try:
            with scope:
                while not self.stopping:
                    run = await self._next_run(sub)
                    if run is not None:
                        self.received[url] += 1
                        self._runs_task_group.start_soon(self._run_taken, run)
        finally:
            self.connections.pop(sub, None)
            with anyio.CancelScope(shield=True):
                await internals.unsubscribe(sub)

    @property
    def connected(self) -> bool:
        """Subscribed to at least one API replica (the readiness probe's condition)."""
        return any(self.connections.values())

    async def _next_run(self, sub: Subscription[TaskRun]) -> TaskRun | None:
        """The next run, acked, its slot taken; None if there was none to take.

        The server offers the next run as soon as the last one is acked, also to a worker
        whose slots are all busy. Such an offer waits here, un-acked, for a slot; if none
        frees within settings.HOLD_OFFER_SECONDS the worker hands it back by closing its
        subscription (the server re-queues an un-acked run first in line, where a worker
        with a free slot takes it at once) and subscribes again once a slot is free."""
        assert self._limiter is not None
        message = await self._offer(sub)
        slot = object()
        # One intake at a time takes a slot and hands it to its run (several intakes: one
        # per API replica): a second intake waiting on the limiter would be handed the
        # slot the first one releases for its run.
        with anyio.move_on_after(settings.HOLD_OFFER_SECONDS) as hold:
            await self._slot_lock.acquire()
            try:
                await self._limiter.acquire_on_behalf_of(slot)
            except BaseException:
                self._slot_lock.release()
                raise
        if hold.cancelled_caught:
            await internals.unsubscribe(sub)
            self.handed_back += 1
            self.metrics.handed_back.inc()
            log.debug("every slot busy for %.2f s: offer handed back", settings.HOLD_OFFER_SECONDS)
            # Subscribe again once a slot is free; polled, not awaited on the limiter,
            # where this intake would queue ahead of the one holding the slot lock.
            while self._limiter.available_tokens < 1:
                await asyncio.sleep(0.05)
            return None
        try:
            try:
                # Once acked the run is ours: never let a drain cancel between the ack
                # and handing the run to the task group.
                with anyio.CancelScope(shield=True):
                    await sub.websocket.send(orjson.dumps({"type": "ack"}).decode())
            except (OSError, websockets.exceptions.ConnectionClosed) as exc:
                # The server re-queues it (or offers it again if the ack did arrive: below).
                log.warning("lost the server before acking a run (%s); reconnecting", exc)
                self.connections[sub] = False
                internals.forget_connection(sub)
                return None
            finally:
                self._limiter.release_on_behalf_of(slot)
            run = TaskRun.model_validate_json(message)
            # Hand the slot just freed to the run (no other intake waits for one now).
            try:
                self._limiter.acquire_on_behalf_of_nowait(run.id)
            except RuntimeError:
                # This worker already holds that run: the server offered it again (it
                # re-queues a run whose ack it had not read when the socket dropped, or
                # the reaper requeued it). It is acked; run it once.
                log.warning("%s %s: offered again while running it here; skipped", run.name, run.id)
                return None
            return run
        finally:
            self._slot_lock.release()

    async def _offer(self, sub: Subscription[TaskRun]) -> str | bytes:
        """The next offer from the server, not acked yet; reconnects while the server is away."""
        while True:
            try:
                websocket = await internals.subscribe(sub)
                self.connections[sub] = True
                return await websocket.recv()
            except (OSError, websockets.exceptions.ConnectionClosed) as exc:
                if self.connections.get(sub):
                    log.warning("lost the server %s (%s); reconnecting", sub.subscription_url, exc)
                self.connections[sub] = False
                internals.forget_connection(sub)
                await asyncio.sleep(0.5)

    async def _run_taken(self, run: TaskRun) -> None:
        """Run an acked run, remembering it (for `/status`) while it runs."""
        start = time.monotonic()
        self._taken[str(run.id)] = (run.name, start)
        offered = run.state
        try:
            await self._safe_submit_scheduled_task_run(run)
            if offered is not None and run.state is offered:
                try:
                    await self._not_started(run, offered)
                except Exception as exc:  # noqa: BLE001 - the server away: the reaper takes the run
                    log.warning("%s %s: not started, and its state not read: %s", run.name, run.id, exc)
        finally:
            self._taken.pop(str(run.id), None)
            # The engine sets its final state on the run it was handed (the same object).
            final = run.state is not offered and run.state is not None and run.state.is_final()
            self.metrics.finished(run.task_key, run.state.type.value.lower() if final else "unfinished",
                                  time.monotonic() - start)  # fmt: skip

    async def _not_started(self, run: TaskRun, offered: Any) -> None:
        """Prefect did not start a run it was offered: its parameters could not be read
        (Prefect's worker would delete the run; ours runs with that switched off).

        A run that is final was offered again (the server re-queues a run whose ack it
        had not read; its parameters were deleted when it finished): skip it. Its final
        state may still be on its way to the database (states are recorded from events),
        and the storage may be coming back: look again after a pause, read the parameters
        once more, and only then fail the run with the reason, so that whoever waits on
        it hears why (not forced: a run that finished meanwhile stays as it is).
        """
        for look in range(2):
            current = await self._client.read_task_run(run.id)
            if current.state is not None and current.state.is_final():
                log.info("%s %s: offered again after it finished (%s); skipped", run.name, run.id, current.state.name)
                return
            if look == 0:
                await asyncio.sleep(settings.PARAMETERS_RETRY_AFTER)
        await self._safe_submit_scheduled_task_run(run)
        if run.state is not offered:
            return
        why = (
            f"the task worker could not read this run's parameters from {storage_setting()} "
            "(deleted, or the storage unreachable: see the worker's log)"
        )
        result = await self._client.set_task_run_state(run.id, Failed(message=why))
        log.error("%s %s: %s; marked Failed (%s)", run.name, run.id, why, result.status.value)

    def in_flight(self) -> set[str]:
        return {str(run) for runs in self.in_flight_task_runs.values() for run in runs}

    def runs(self) -> dict[str, dict[str, Any]]:
        """The runs this worker holds: id -> name and seconds since it took the run (what
        an operator asks of a pod before deleting it)."""
        now = time.monotonic()
        return {
            rid: {"name": name, "seconds": round(now - start, 1)} for rid, (name, start) in list(self._taken.items())
        }

    def heartbeat(self) -> Heartbeat:
        """What this worker holds right now, for the reaper (see fanout.liveness)."""
        now = time.time()
        if not self.stopping and len(self.in_flight()) < (self.limit or 0):
            self._free_since = self._free_since or now
        else:
            self._free_since = None
        return Heartbeat(
            client_id=self.client_id,
            pool=self.pool,
            task_keys=frozenset(self.task_keys),
            runs=frozenset(self.in_flight()),
            limit=self.limit or 0,
            free_since=self._free_since,
            ts=now,
        )

    async def tick_loop(self, interval: float = 1.0) -> None:
        """Mark that the event loop turns, for /livez, until cancelled."""
        while True:
            self.loop_tick = time.monotonic()
            await asyncio.sleep(interval)

    async def heartbeat_loop(self, interval: float) -> None:
        """Publish the heartbeat every `interval` seconds until cancelled."""
        name = variable_name(self.client_id)
        while True:
            try:
                await Variable.aset(name, self.heartbeat().to_value(), overwrite=True)
            except Exception as exc:  # noqa: BLE001 - the server may be restarting; try again
                log.warning("heartbeat not published: %s", exc)
            await asyncio.sleep(interval)

    async def clear_heartbeat(self, timeout: float = 5.0) -> None:
        """A worker that exits cleanly holds nothing: remove its heartbeat.

        Bounded: with the server away, Prefect's client retries a refused connection
        with backoff for about a minute, and a pod told to stop would wait that long.
        """
        try:
            await asyncio.wait_for(Variable.aunset(variable_name(self.client_id)), timeout)
        except Exception as exc:  # noqa: BLE001 - the reaper expires it anyway
            log.warning("heartbeat not removed: %s", str(exc) or type(exc).__name__)

    def status(self) -> dict[str, Any]:
        """What `/status` reports."""
        return {
            "client_id": self.client_id,
            "pool": self.pool,
            "connected": self.connected,
            "replicas": dict(self.received),
            "stopping": self.stopping,
            "limit": self.limit,
            "running": len(self.in_flight()),
            "runs": self.runs(),
            "finished": sum(self.finished_task_runs.values()),
            "handed_back": self.handed_back,
        }


def serve_health(worker: FanoutWorker, host: str, port: int) -> ThreadingHTTPServer:
    """Start the probe endpoint in a daemon thread; returns the server (port 0 = any)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = worker.status()
            ready = worker.started and worker.connected and not worker.stopping
            if self.path in ("/readyz", "/healthz"):
                code, body = (200 if ready else 503), {"ok": ready}
            elif self.path == "/livez":
                stalled = time.monotonic() - worker.loop_tick
                alive = stalled < settings.LOOP_STALL_SECONDS
                code, body = (200 if alive else 503), {"ok": alive, "loop_stalled_seconds": round(stalled, 1)}
            elif self.path == "/status":
                code, body = 200, status
            elif self.path == "/metrics":
                data = worker.metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            else:
                code, body = 404, {"error": "not found"}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # probes every few seconds: no log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m fanout.worker", description=__doc__.split("\n")[0])
    p.add_argument("--pool", default=env("FANOUT_POOL", "default"), help="the pool's name (logs, heartbeats)")
    p.add_argument(
        "--tasks",
        default=env("FANOUT_TASKS", ""),
        help="comma-separated module:attribute references to serve: Prefect tasks or plain functions",
    )
    p.add_argument("--limit", type=int, default=settings.worker_limit(), help="task runs at once")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=settings.heartbeat_seconds(),
        help="seconds between heartbeats (what the reaper sees)",
    )
    p.add_argument(
        "--warm-process-pool",
        default=env("FANOUT_WARM_PROCESS_POOL", ""),
        help="start a kept process pool at start (`auto`: one process per CPU of the pod, or a number), "
        "for subflows on WarmProcessPoolTaskRunner",
    )
    p.add_argument("--health-host", default=env("FANOUT_HEALTH_HOST", "127.0.0.1"), help="probe address")
    p.add_argument("--health-port", type=int, default=int(env("FANOUT_HEALTH_PORT", "8080")), help="probe port")
    return p


def configure_logging() -> None:
    """Our one line per task on stdout; Prefect's own per-run INFO chatter only at WARNING.

    Prefect configures its loggers at import; ours gets a handler of its own so it
    does not depend on how Prefect set up the root logger.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("fanout")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    for name in ("prefect.task_worker", "prefect.task_runs", "prefect.client.subscriptions"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_tasks(refs: str) -> list[Task[..., Any]]:
    """The Prefect tasks to serve for `module:attribute` references (same image
    everywhere): a task itself and its chunk task (`fanout.fan_out`); for a plain
    function, its chunk task only."""
    tasks: list[Task[..., Any]] = []
    names = [r.strip() for r in refs.split(",") if r.strip()]
    if not names:
        raise ValueError("--tasks: name at least one task to serve, e.g. --tasks mymodule:resize")
    for ref in names:
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ValueError(f"--tasks: {ref!r} is not of the form module:attribute")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--tasks: cannot load {ref!r}: {exc}") from None
        if isinstance(obj, Task):
            tasks.append(obj)
        elif not callable(obj):
            raise ValueError(f"--tasks: {ref!r} is neither a Prefect task nor a function")
        tasks.append(chunk_task(obj))
    return tasks


async def run(args: argparse.Namespace, tasks: list[Task[..., Any]]) -> None:
    worker = FanoutWorker(*tasks, limit=args.limit, pool=args.pool)
    health = serve_health(worker, args.health_host, args.health_port)
    log.info("health endpoint on http://%s:%d/healthz", *health.server_address[:2])
    signal.signal(signal.SIGTERM, worker.handle_sigterm)  # also while waiting for the server
    ticker = asyncio.create_task(worker.tick_loop())
    try:
        # A pod may start before the server does; entering the client contexts below
        # checks the server's version, so wait for it first.
        if not await wait_for_api(lambda: worker.stopping):
            return
        # One API client of each kind for the whole worker. Without these contexts
        # Prefect builds new clients for every task run, two or three of them, and each
        # loads the CA bundle into a fresh SSL context: ~70 ms of CPU apiece, most of the
        # worker's per-run cost (measured with cProfile). The sync client is shared by
        # the threads that run tasks, as Prefect's ThreadPoolTaskRunner shares a flow's.
        # A run whose parameters cannot be read is not deleted (Prefect's default) but
        # skipped when it is final, else failed with the reason (FanoutWorker._not_started).
        with temporary_settings({PREFECT_TASKS_SCHEDULING_DELETE_FAILED_SUBMISSIONS: False}), SyncClientContext():
            async with AsyncClientContext():
                beat = asyncio.create_task(worker.heartbeat_loop(args.heartbeat))
                try:
                    await worker.astart()  # returns once drained
                finally:
                    beat.cancel()
                    await worker.clear_heartbeat()
    finally:
        ticker.cancel()
        health.shutdown()
        log.info("worker %s stopped after %d task runs", worker.client_id, sum(worker.finished_task_runs.values()))


def warm_pool_size(value: str) -> int:
    """`--warm-process-pool`: "" or 0 for none, `auto` for the CPUs of this process, or N."""
    value = value.strip().lower()
    if value in ("", "0", "no", "false"):
        return 0
    if value == "auto":
        return available_cpus()
    if not value.isdigit():
        raise ValueError(f"--warm-process-pool must be auto, 0 or a number of processes, got {value!r}")
    return int(value)


async def wait_for_api(stopping: Callable[[], bool], interval: float = 1.0) -> bool:
    """Until the Prefect API answers its (unauthenticated) health check; False if the
    worker was told to stop first."""
    url = f"{(get_current_settings().api.url or '').rstrip('/')}/health"
    said = False
    async with httpx.AsyncClient(timeout=5) as http:
        while not stopping():
            try:
                if (await http.get(url)).status_code == 200:
                    return True
                reason = "not healthy yet"
            except httpx.HTTPError as exc:
                reason = str(exc) or type(exc).__name__
            if not said:
                log.warning("waiting for the Prefect API at %s (%s)", url, reason)
                said = True
            await asyncio.sleep(interval)
    return False


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tasks = load_tasks(args.tasks)
        pool_size = warm_pool_size(args.warm_process_pool)
    except ValueError as exc:
        parser.error(str(exc))
    if args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    configure_logging()
    internals.install()  # also without PREFECT_PLUGINS_ENABLED
    # Load what the first run would, in the background, so that a new pod's first runs
    # are as fast as its later ones (FANOUT_WARM_UP=0: skip); start the kept process
    # pool too if asked.
    warmup = functools.partial(warm_process_pool, pool_size) if pool_size else warm_engine
    if os.environ.get("FANOUT_WARM_UP", "1") != "0":
        threading.Thread(target=warmup, name="warmup", daemon=True).start()
    try:
        asyncio.run(run(args, tasks))
    finally:
        close_process_pools()


if __name__ == "__main__":
    main()
