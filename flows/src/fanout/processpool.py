"""Warm process pools: a process-pool subflow that does not start its pool every run.

Prefect's `ProcessPoolTaskRunner` starts a new pool for every flow run that uses it:
spawning each process and importing Prefect in it takes seconds on a small machine
(~2.5 s per subflow run on ours), more than a typical batch saves. A task worker that
runs such a subflow for every batch it receives paid that every time: a user's batch
of 40 items of ~32 ms took 10-11 s against 1.27 s serially.

`WarmProcessPoolTaskRunner` is the same runner with one difference: the pool is kept
for the life of the process that started it (a task worker), keyed by its size and
initializer, and every later flow run using a runner of that size reuses it. Mark a
subflow with it instead of `ProcessPoolTaskRunner`:

    from fanout.processpool import WarmProcessPoolTaskRunner

    @flow(task_runner=WarmProcessPoolTaskRunner())      # one process per CPU of the pod
    def crunch_batch(items): ...

Its size defaults to the CPUs this process may use (the pod's CPU limit, `fanout.cpu`),
not the node's CPU count as Prefect's does. A pool one of whose processes died (OOM
killer, `kill`) is replaced before the next batch.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from prefect.context import SyncClientContext, serialize_context
from prefect.task_runners import ProcessPoolTaskRunner

from fanout.cpu import available_cpus
from fanout.internals import ContextSubmitter, pool_executor, without_settings

log = logging.getLogger("fanout.worker")


def warm_engine() -> None:
    """Load now what this process's first task or flow run would load: ~2-3 s of CPU on
    our machines, most of it Prefect collections (prefect-kubernetes and its
    dependencies), imported the first time a storage block is validated. Every worker
    does this at start, so its first run, and a new pod's first runs, are not slow."""
    import prefect.flow_engine
    import prefect.task_engine  # noqa: F401
    from prefect.plugins import load_prefect_collections

    load_prefect_collections()


_CHILD_CLIENT: list[SyncClientContext] = []


def _init_child(user_init: Callable[..., object] | None = None, user_args: tuple[Any, ...] = ()) -> None:
    """Each pool process, once, as it starts: the user's initializer if any, then load
    what its first task run would (without this that run took ~2.3 s, later ones
    ~0.2 s), and hold one API client for every task run it will run (Prefect otherwise
    builds one or two per run, each loading the CA bundle into a new SSL context)."""
    if user_init is not None:
        user_init(*user_args)
    warm_engine()
    _CHILD_CLIENT.append(SyncClientContext().__enter__())  # for the life of the process


def _warm_child(seconds: float) -> int:
    """A plain call (no Prefect task run, nothing in the UI) that idles a moment, so that
    the executor starts all its processes now rather than at the first batch."""
    time.sleep(seconds)
    return os.getpid()


# One started process pool per size, kept for the life of this process. Spawning a process
# and importing Prefect in it takes seconds on a small machine, more than a typical batch
# saves; a heavy worker pays it once (and ahead of time, see warm_process_pool), not per batch.
_POOLS_LOCK = threading.Lock()
PoolKey = tuple[int, Callable[..., object] | None, tuple[Any, ...]]
_WARM_POOLS: dict[PoolKey, tuple[ProcessPoolTaskRunner, threading.Lock]] = {}


def _is_broken(runner: ProcessPoolTaskRunner) -> bool:
    """True once one of the pool's processes has died (killed, out of memory): Python's
    ProcessPoolExecutor then refuses all further work, for the life of the pool."""
    executor = pool_executor(runner)
    return executor is None or bool(getattr(executor, "_broken", False))


def discard_pool(n: int, initializer: Callable[..., object] | None = None, initargs: tuple[Any, ...] = ()) -> None:
    """Forget the pool of `n` processes (stopping what is left of it): the next batch
    starts a new one instead of failing on a broken pool."""
    with _POOLS_LOCK:
        entry = _WARM_POOLS.pop((n, initializer, initargs), None)
    if entry is not None:
        runner, _ = entry
        try:
            runner.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - a broken pool may not shut down cleanly
            log.warning("stopping a broken process pool: %s", exc)


def process_pool(
    n: int, initializer: Callable[..., object] | None = None, initargs: tuple[Any, ...] = ()
) -> tuple[ProcessPoolTaskRunner, threading.Lock]:
    """The started pool of `n` processes (each running `initializer(*initargs)` first)
    of this process, and the lock to submit under; a new one if a process of the kept
    pool has died since the last batch."""
    key: PoolKey = (n, initializer, tuple(initargs))
    with _POOLS_LOCK:
        broken = key in _WARM_POOLS and _is_broken(_WARM_POOLS[key][0])
    if broken:
        log.warning("a process of the pool of %d died since the last batch; starting a new pool", n)
        discard_pool(*key)
    with _POOLS_LOCK:
        if key not in _WARM_POOLS:
            if not _WARM_POOLS:
                atexit.register(close_process_pools)
            init = functools.partial(_init_child, initializer, tuple(initargs))
            runner = ProcessPoolTaskRunner(max_workers=n, initializer=init).__enter__()
            _WARM_POOLS[key] = (runner, threading.Lock())
        return _WARM_POOLS[key]


@contextmanager
def submitting_to(
    kept: tuple[ProcessPoolTaskRunner, threading.Lock], context: dict[str, Any]
) -> Iterator[ContextSubmitter]:
    """Something to submit task runs of the run whose serialised `context` is given to
    the kept pool (one serialisation for all of them, without the sender's settings),
    under the pool's lock. The pool's processes were started from this one and use their
    own settings (inherited from this process): each task run gets this process's
    environment, not one rebuilt from its settings object."""
    runner, lock = kept
    with lock:
        yield ContextSubmitter(runner, context, dict(os.environ))


def close_process_pools() -> None:
    """Stop every kept pool and its processes (idempotent). A worker calls this once it
    has drained, so that its pod ends as soon as its last run is done."""
    with _POOLS_LOCK:
        pools = list(_WARM_POOLS.values())
        _WARM_POOLS.clear()
    for runner, lock in pools:
        with lock:
            runner.__exit__(None, None, None)


def warm_process_pool(n: int | None = None) -> float:
    """Start the pool's processes now (each imports Prefect); returns the seconds it took."""
    n = n or available_cpus()
    t0 = time.perf_counter()
    warm_engine()
    runner, _ = process_pool(n)
    executor = pool_executor(runner)
    assert executor is not None
    try:
        pids = {f.result() for f in [executor.submit(_warm_child, 1.0) for _ in range(n)]}
    except BrokenProcessPool:  # a process died while starting (killed); the first batch starts a new pool
        log.warning("process pool of %d broken while warming up; the first batch will start a new one", n)
        return time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    log.info("process pool of %d warm in %.1fs (%d processes started)", n, seconds, len(pids))
    return seconds


class WarmProcessPoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's `ProcessPoolTaskRunner`, with its pool kept and reused across flow runs
    in this process (see the module docstring). `max_workers` defaults to the CPUs this
    process may use."""

    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            max_workers=max_workers or available_cpus(), initializer=initializer, initargs=initargs, **kwargs
        )
        self._kept: tuple[ProcessPoolTaskRunner, threading.Lock] | None = None
        self._context: dict[str, Any] | None = None  # this flow run's, serialised once

    def __enter__(self) -> WarmProcessPoolTaskRunner:
        self._kept = process_pool(self._max_workers, self._initializer, self._initargs)
        self._context = None
        self._started = True
        return self

    def __exit__(self, *exc: Any) -> None:
        # The kept pool stays up for the next flow run; this run's futures are done.
        self._kept = None
        self._started = False

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        if self._kept is None:
            raise RuntimeError("Task runner is not started")
        if self._context is None:  # once per flow run, not per submitted task run
            self._context = without_settings(serialize_context())
        with submitting_to(self._kept, self._context) as runner:
            return runner.submit(task, parameters, wait_for, dependencies)
