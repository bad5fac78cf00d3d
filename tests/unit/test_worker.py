"""The task worker's seams into Prefect: what they change, and the internals they need."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import prefect.task_worker
import pytest
from prefect.context import serialize_context
from prefect.settings import PREFECT_API_URL, temporary_settings

from fanout.worker import FanoutWorker, RunThreads, load_tasks, warm_pool_size
from fanout_demo.tasks import heavy_batch


def test_runs_use_the_workers_settings_not_the_submitters() -> None:
    seen: list[dict[str, Any]] = []
    context = {**serialize_context(), "tags_context": {"current_tags": ["t"]}}
    assert context["settings_context"]  # what a submitter sends along
    with RunThreads(max_workers=2) as threads:
        threads.submit(lambda **kw: seen.append(kw["context"]), task=None, context=context).result()
        threads.submit(lambda **kw: seen.append(kw), task=None).result()  # no context: untouched
    assert "settings_context" not in seen[0]
    assert seen[0]["tags_context"] == {"current_tags": ["t"]}  # the rest of the context stays
    assert seen[1] == {"task": None}
    assert context["settings_context"]  # the caller's dict is not modified


def test_the_worker_runs_tasks_on_its_run_threads() -> None:
    async def make() -> FanoutWorker:  # a TaskWorker is made in a running loop
        return FanoutWorker(heavy_batch, limit=3, pool="light")

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never contacted
        worker = asyncio.run(make())
    assert isinstance(worker._executor, RunThreads)
    assert worker._executor._max_workers == 3


def test_prefect_internals_the_worker_relies_on() -> None:
    # TaskWorker hands each run to `self._executor.submit(..., context=...)` and rebuilds
    # settings from `settings_context`; a Prefect upgrade that changes either must fail here.
    source = inspect.getsource(prefect.task_worker.TaskWorker._submit_scheduled_task_run)
    assert "self._executor.submit(" in source and "context=run_context" in source
    assert "settings_context" in inspect.getsource(prefect.context.hydrated_context)


def test_tasks_to_serve_include_chunk_tasks() -> None:
    keys = [t.task_key for t in load_tasks("fanout_demo.tasks:heavy_batch, fanout_demo.tasks:process_item")]
    assert keys[0] == heavy_batch.task_key  # a task: itself, for plain .delay()
    assert [k.split("-")[0] for k in keys[1:]] == ["heavy_batch.chunks", "process_item.chunks"]  # and chunks


@pytest.mark.parametrize(
    ("refs", "named"),
    [
        ("", "name at least one task"),
        ("fanout_demo.tasks", "is not of the form module:attribute"),
        ("fanout_demo.tasks:nope", "cannot load 'fanout_demo.tasks:nope'"),
        ("nomodule_xyz:f", "cannot load 'nomodule_xyz:f'"),
        ("fanout_demo.tasks:POOL_TASKS", "neither a Prefect task nor a function"),
    ],
)
def test_bad_task_references_are_named(refs: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        load_tasks(refs)


def test_warm_process_pool_sizes() -> None:
    assert warm_pool_size("") == 0 and warm_pool_size("0") == 0 and warm_pool_size("3") == 3
    assert warm_pool_size("auto") >= 1
    with pytest.raises(ValueError, match="--warm-process-pool must be auto, 0 or a number"):
        warm_pool_size("many")
