"""A real local stack for the integration tier: PostgreSQL (when installed, else
SQLite), `prefect server start`, and task-worker processes on free loopback ports.

One stack per module keeps the tier to minutes; every test drives it through the
same commands a user runs (`python -m fanout.worker`, `python -m fanout_demo.flow`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fanout.local import LocalStack, Proc
from fanout_demo.local import DemoStack

DATABASE = os.environ.get("FANOUT_TEST_DATABASE", "auto")
# The user's own code (outside our package), on the PYTHONPATH of their processes.
USERCODE = Path(__file__).resolve().parents[1] / "usercode"


def assert_all_stopped(pids: list[int]) -> None:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert not alive, f"processes left behind: {alive}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Server + 3 light workers + 1 heavy worker pinned to 2 CPUs."""
    root: Path = tmp_path_factory.mktemp("stack")
    with DemoStack(root, database=DATABASE, ui=False) as st:
        for _ in range(3):
            st.start_worker("light", limit=4, wait=False)
        st.start_worker("heavy", limit=1, cpus=2, wait=False)
        for w in st.workers():  # started together, waited for together
            st.wait_healthy(w)
        pids = [p.popen.pid for p in st.procs]
        yield st
    assert_all_stopped(pids)


@contextlib.contextmanager
def stack_with_reaper(tmp_path_factory: pytest.TempPathFactory, name: str, **reaper: Any) -> Iterator[LocalStack]:
    """A module's own stack (no workers yet) with the reaper, on short timings."""
    with DemoStack(tmp_path_factory.mktemp(name), ui=False) as st:
        st.start_reaper(**{"interval": 1.0, **reaper})
        yield st


@pytest.fixture
def workers(stack: LocalStack) -> Iterator[list[Proc]]:
    """Workers a test starts; stopped after it."""
    started: list[Proc] = []
    yield started
    for w in started:
        w.stop()


def status(w: Proc) -> dict[str, Any]:
    """A worker's `/status` counters (running, finished, connected, ...)."""
    return httpx.get(f"http://127.0.0.1:{w.port}/status", timeout=5).json()


def finish(proc: subprocess.Popen[str], timeout: float) -> Any:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no result within {timeout:.0f}s:\n{proc.communicate()[0][-4000:]}") from None
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}:\n{out[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def submit(stack: LocalStack, module: str, call: str) -> subprocess.Popen[str]:
    """The user's flow `call` (e.g. `shout_all([...])`) from `module`, in a submitter
    process of its own that prints the result as JSON (read it with `finish`)."""
    code = f"import asyncio, json; from {module} import *; print('RESULT ' + json.dumps({call}))"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=stack.env("submitter", PYTHONPATH=str(USERCODE)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
