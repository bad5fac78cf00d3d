"""The task worker's seams into Prefect: what they change, and the internals they need."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import prefect.task_worker
from prefect.context import serialize_context
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.tasks import process_chunk
from flows.worker import FanoutWorker, RunThreads


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
        return FanoutWorker(process_chunk, limit=3, pool="light")

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
