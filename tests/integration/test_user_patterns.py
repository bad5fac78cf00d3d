"""Prefect's recommended patterns, written by a user, on our stack: nothing hangs.

The user's code is `tests/usercode/userwork` (plain Prefect: no `result_storage=`, no
import of our package), on PYTHONPATH, served by `python -m fanout.worker --tasks ...`
under the chart's default server settings (the batched task-run recorder), with the
reaper running. Every flow runs in its own submitter process with a hard timeout: a
future that never returns fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import stack_with_reaper, status

from fanout.local import LocalStack, Proc, wait_until

USERCODE = Path(__file__).resolve().parents[1] / "usercode"
LIGHT_TASKS = "userwork.tasks:square,userwork.tasks:asquare,userwork.tasks:explode"
HEAVY_TASKS = "userwork.tasks:run_cpu_batch,userwork.heavy:run_warm_cpu_batch"
STALE_AFTER = 6.0
FAIL_UNSERVED_AFTER = 20.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with stack_with_reaper(
        tmp_path_factory, "patterns", stale_after=STALE_AFTER, fail_unserved_after=FAIL_UNSERVED_AFTER
    ) as st:
        yield st


def user_worker(stack: LocalStack, tasks: str = LIGHT_TASKS, limit: int = 4, **kw: Any) -> Proc:
    return stack.start_worker("user", limit=limit, tasks=tasks, env={"PYTHONPATH": str(USERCODE)}, **kw)


def run_user_flow(stack: LocalStack, call: str, timeout: float, usercode: Path = USERCODE, wait: bool = True) -> Any:
    """Run `call` (e.g. `sync_fanout(5)`) from the user's module in a submitter process;
    returns its JSON-printed result (or the Popen when not waiting)."""
    module = "userwork.heavy" if "warm" in call else "userwork.tasks"
    code = f"import asyncio, json; from {module} import *; print('RESULT ' + json.dumps({call}))"
    argv = [sys.executable, "-c", code]
    env = stack.env("submitter", PYTHONPATH=str(usercode))
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{call} hung: no result within {timeout:.0f}s\n{(exc.stdout or b'')[-3000:]!r}") from None
    return result_of(proc.returncode, proc.stdout + proc.stderr, call)


def result_of(rc: int, output: str, call: str) -> Any:
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    assert rc == 0 and lines, f"{call} failed (exit {rc}):\n{output[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def api(stack: LocalStack) -> httpx.Client:
    return httpx.Client(base_url=stack.api_url, timeout=30)


def assert_squares(got: list[dict[str, Any]], n: int) -> None:
    assert [r["item"] for r in got] == list(range(n))
    assert all(r["value"] == r["item"] ** 2 for r in got)


@pytest.mark.parametrize("pattern", ["async", "sync", "process-pool"])
def test_recommended_patterns_return_every_future(stack: LocalStack, workers: list[Proc], pattern: str) -> None:
    """Each pattern at 1, 5, 20 and 200 items: every future returns, every result correct."""
    if pattern == "process-pool":
        workers.append(user_worker(stack, HEAVY_TASKS, limit=1, cpus=2))
    else:
        workers += [user_worker(stack) for _ in range(2)]
    for n in (1, 5, 20, 200):
        if pattern == "async":
            assert_squares(run_user_flow(stack, f"asyncio.run(async_fanout({n}))", 180), n)
        elif pattern == "sync":
            assert_squares(run_user_flow(stack, f"sync_fanout({n})", 180), n)
        else:
            got = run_user_flow(stack, f"batch_fanout({n}, batch=50)", 300)
            assert got == [i * i for i in range(n)]


def test_futures_return_across_a_server_restart(stack: LocalStack, workers: list[Proc]) -> None:
    """The server restarts while the user's flow submits (`.delay()` during the outage)
    and waits (`.result()`): every future returns, every result correct."""
    workers += [user_worker(stack) for _ in range(2)]
    with api(stack) as c:

        def squares() -> int:
            return int(c.post("/task_runs/count", json={"task_runs": {"name": {"like_": "square"}}}).json())

        before = squares()  # earlier tests' runs too
        proc = run_user_flow(stack, "paced_fanout(40, gap=0.25, sleep=0.5)", 0, wait=False)
        wait_until(lambda: squares() > before + 8, 120, "this flow's first runs submitted")
    stack.restart_server()
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"a future never returned across the restart:\n{proc.communicate()[0][-4000:]}") from None
    assert_squares(result_of(proc.returncode, out, "paced_fanout"), 40)


def test_kill_9_of_a_busy_worker_serving_a_user_task(stack: LocalStack, workers: list[Proc]) -> None:
    workers += [user_worker(stack, limit=2) for _ in range(2)]
    proc = run_user_flow(stack, "asyncio.run(async_fanout(16, sleep=3.0))", 0, wait=False)
    victim = workers[0]
    # Killed once it has held a run for 2 s: its Pending/Running state has then reached the
    # database (the batched recorder flushes every second). Killed sooner, the run would
    # still look Scheduled there and be requeued rather than redelivered.
    wait_until(lambda: any(r["seconds"] >= 2.0 for r in status(victim)["runs"].values()), 120, "victim 2 s into a run")
    victim.signal(signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"a future never returned:\n{proc.communicate()[0][-4000:]}") from None
    got = result_of(proc.returncode, out, "async_fanout")
    assert_squares(got, 16)
    reaper = next(p for p in stack.procs if p.name == "reaper")
    assert "redelivered (delivery 2)" in reaper.output()  # the killed worker's runs went elsewhere


def test_a_raising_task_reaches_result_as_its_exception(stack: LocalStack, workers: list[Proc]) -> None:
    workers.append(user_worker(stack))
    t0 = time.monotonic()
    assert run_user_flow(stack, "explode_fanout()", 60) == "raised: cannot handle item 7"
    assert time.monotonic() - t0 < 30


def test_a_submitter_with_other_task_code_is_told(stack: LocalStack, workers: list[Proc], tmp_path: Path) -> None:
    """The submitter's `square` differs from the workers' by its docstring only: the reaper
    names the problem, then fails the runs, and the user's `.result()` raises with it."""
    workers.append(user_worker(stack))
    other = tmp_path / "usercode"
    shutil.copytree(USERCODE, other)
    src = other / "userwork" / "tasks.py"
    src.write_text(src.read_text().replace("Pattern 2's task: sync", "Pattern 2's task, edited"))
    code = (
        "from userwork.tasks import square\nfrom prefect import flow\n"
        "@flow\ndef one():\n    try:\n        return square.delay(3).result()\n"
        "    except Exception as exc:\n        return f'{type(exc).__name__}: {exc}'\n"
        "import json; print('RESULT ' + json.dumps(one()))"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=stack.env("submitter", PYTHONPATH=str(other)),
                          capture_output=True, text=True, timeout=FAIL_UNSERVED_AFTER + 90)  # fmt: skip
    took = time.monotonic() - t0
    said = result_of(proc.returncode, proc.stdout + proc.stderr, "one()")
    assert "no live task worker serves task 'square' with this code" in said, said
    assert "code differs between the submitter and the workers" in said, said
    assert took < FAIL_UNSERVED_AFTER + 60
    reaper = next(p for p in stack.procs if p.name == "reaper")
    assert "run(s) of task 'square' waiting: no live task worker serves" in reaper.output()


def test_our_fanout_names_a_code_mismatch_within_a_minute(
    stack: LocalStack, workers: list[Proc], tmp_path: Path
) -> None:
    """Our own fan-out, submitted with code the light workers do not run: an error naming
    the task and the keys the workers serve, within about a minute, nothing left queued."""
    other = tmp_path / "src"
    shutil.copytree(Path(__import__("fanout_demo").__file__).parent, other / "fanout_demo")
    tasks_py = other / "fanout_demo" / "tasks.py"
    tasks_py.write_text(tasks_py.read_text().replace("Light work for one item", "Light work (edited) for one item"))
    workers.append(stack.start_worker("light", limit=2, env={"PYTHONPATH": str(other)}))
    out = tmp_path / "summary.json"
    t0 = time.monotonic()
    proc = stack.run_flow(["--items", "4", "--chunk-size", "2", "--timeout", "300", "--json", str(out)], timeout=200)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = json.loads(out.read_text())["failed"]
    assert sorted(failed) == ["0", "1", "2", "3"]
    assert all("code differs between the submitter and the workers" in why for why in failed.values()), failed
    assert "workers serve process_item.chunks-" in failed["0"]
    assert took < 120
    with api(stack) as c:
        left = c.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [json.loads(out.read_text())[
            "flow_run_id"]]}}}).json()  # fmt: skip
    assert {r["state"]["type"] for r in left} == {"FAILED"}


def test_a_run_offered_twice_runs_once_and_the_worker_keeps_serving(stack: LocalStack, workers: list[Proc]) -> None:
    """The server offers a run the worker is running again (as after a dropped ack):
    the worker skips the offer, finishes the run once, and serves the next runs."""
    w = user_worker(stack, limit=2)
    workers.append(w)
    proc = run_user_flow(stack, "sync_fanout(1, sleep=8)", 0, wait=False)
    wait_until(lambda: status(w)["running"] == 1, 120, "worker busy")
    with api(stack) as c:

        def running() -> list[dict[str, Any]]:  # states reach the database up to a second later
            found = c.post("/task_runs/filter", json={"task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}).json()
            return [r for r in found if r["name"].startswith("square")]

        wait_until(lambda: running(), 30, "the run's Running state recorded")
        (run,) = running()
        held = status(w)["runs"]  # what the pod says it holds: this run, by name, for seconds
        assert list(held) == [run["id"]] and held[run["id"]]["name"] == run["name"], held
        assert 0 < held[run["id"]]["seconds"] < 8, held
        states = c.get("/task_run_states/", params={"task_run_id": run["id"]}).json()
        params_id = next(s["state_details"]["task_parameters_id"] for s in states if s["state_details"].get(
            "task_parameters_id"))  # fmt: skip
        scheduled = {"type": "SCHEDULED", "name": "Scheduled",
                     "state_details": {"deferred": True, "task_parameters_id": params_id}}  # fmt: skip
        resp = c.post(f"/task_runs/{run['id']}/set_state", json={"state": scheduled, "force": True})
        assert resp.json()["status"] == "ACCEPT", resp.text
    wait_until(lambda: "offered again while running it here; skipped" in w.output(), 30, "the second offer")
    out, _ = proc.communicate(timeout=120)
    assert_squares(result_of(proc.returncode, out, "sync_fanout"), 1)
    assert w.alive() and status(w)["connected"], w.output()[-3000:]
    assert "CapacityLimiter" not in w.output()
    assert_squares(run_user_flow(stack, "sync_fanout(5)", 120), 5)  # still serving
    with api(stack) as c:
        assert c.get(f"/task_runs/{run['id']}").json()["run_count"] == 1  # ran once


def test_a_full_worker_hands_an_offer_back_to_a_worker_with_a_free_slot(stack: LocalStack, workers: list[Proc]) -> None:
    """The server offers the next run to a worker whose every slot is busy; the worker
    hands it back instead of holding it, so a worker that subscribes later runs it at
    once, while the first run still runs (Prefect's own worker would keep it queued)."""
    first = user_worker(stack, limit=1)
    workers.append(first)
    since = datetime.now(UTC).isoformat()
    proc = run_user_flow(stack, "sync_fanout(2, sleep=20)", 0, wait=False)
    wait_until(lambda: status(first)["running"] == 1, 120, "the first worker busy")
    wait_until(lambda: status(first)["handed_back"] >= 1, 30, "the second run handed back")
    second = user_worker(stack, limit=1)
    workers.append(second)
    wait_until(lambda: status(second)["running"] == 1, 30, "the second worker running the other run")
    assert status(first)["running"] == 1 and status(first)["finished"] == 0, status(first)
    out, _ = proc.communicate(timeout=120)
    assert_squares(result_of(proc.returncode, out, "sync_fanout"), 2)
    assert status(second)["finished"] == 1, status(second)
    assert status(first)["connected"], first.output()[-3000:]
    with api(stack) as c:  # each of the two runs ran once
        ran = c.post("/task_runs/filter", json={"task_runs": {"start_time": {"after_": since}}}).json()
    assert sorted((r["name"].split("-")[0], r["run_count"]) for r in ran) == [("square", 1)] * 2, ran


def test_the_users_flows_are_registered_as_deployments_the_way_the_chart_does(stack: LocalStack, tmp_path) -> None:
    """`python -m fanout.deployments` (what the chart's setup hook runs for `deployments`)
    against a real server: the user's flow imported for its name and parameter schema,
    job variables as given, a script entrypoint starting in its directory, a flow
    registered by name without its code, and a bad entry named (nothing of the demo's)."""
    client = api(stack)
    r = client.post("/work_pools/", json={"name": "user-pods", "type": "process"})
    assert r.status_code in (201, 409), r.text
    script = tmp_path / "flows" / "report.py"
    script.parent.mkdir()
    script.write_text(
        "from prefect import flow\n\n@flow(name='nightly-report')\ndef nightly(day: str) -> str:\n    return day\n"
    )
    entries = [
        {
            "name": "census",
            "entrypoint": "userwork.heavy:cpu_census",
            "image": "mywork:1",
            "jobVariables": {"cpu_request": "2", "cpu_limit": "2", "node_selector": {"fanout.io/pool": "large"}},
        },
        {"name": "report", "entrypoint": f"{script}:nightly"},
        {"name": "elsewhere", "entrypoint": "notinthisimage.flows:big", "flowName": "big-flow", "image": "other:2"},
    ]
    config = tmp_path / "deployments.json"
    config.write_text(json.dumps(entries))
    argv = [sys.executable, "-m", "fanout.deployments", "--work-pool", "user-pods", "--config", str(config)]
    env = stack.env("deploy", PYTHONPATH=str(USERCODE))
    proc = subprocess.run([*argv, "--image-pull-policy", "Never"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deployment cpu-census/census" in proc.stdout, proc.stdout

    census = client.get("/deployments/name/cpu-census/census").json()
    assert census["entrypoint"] == "userwork.heavy.cpu_census"  # a module path: imported from the image
    assert census["work_pool_name"] == "user-pods"
    assert census["job_variables"] == {
        "image_pull_policy": "Never",
        "image": "mywork:1",
        "cpu_request": "2",
        "cpu_limit": "2",
        "node_selector": {"fanout.io/pool": "large"},
    }
    assert set(census["parameter_openapi_schema"]["properties"]) == {"n", "milliseconds"}
    assert census["enforce_parameter_schema"] is True
    report = client.get("/deployments/name/nightly-report/report").json()
    assert report["entrypoint"] == f"{script}:nightly"
    assert report["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(script.parent)}}
    ]
    elsewhere = client.get("/deployments/name/big-flow/elsewhere").json()
    assert elsewhere["entrypoint"] == "notinthisimage.flows.big"
    assert elsewhere["job_variables"]["image"] == "other:2"

    # Registering again updates in place; an entry that cannot be loaded is named.
    config.write_text(json.dumps([entries[0], {"name": "broken", "entrypoint": "userwork.heavy:no_such_flow"}]))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "deployment broken: cannot load the flow 'userwork.heavy:no_such_flow'" in proc.stderr, proc.stderr
    assert client.get("/deployments/name/cpu-census/census").json()["id"] == census["id"]

    # --prune (the chart's hook): what the config no longer lists goes, if it was registered
    # here (tag fanout.io/managed); a deployment made otherwise on the same pool stays.
    other = client.post(
        "/deployments/",
        json={"name": "by-hand", "flow_id": census["flow_id"], "work_pool_name": "user-pods", "entrypoint": "x:y"},
    )
    assert other.status_code in (200, 201), other.text
    config.write_text(json.dumps([entries[0]]))
    proc = subprocess.run([*argv, "--prune"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deployment report deleted" in proc.stdout and "deployment elsewhere deleted" in proc.stdout, proc.stdout
    assert client.get("/deployments/name/nightly-report/report").status_code == 404
    assert client.get("/deployments/name/big-flow/elsewhere").status_code == 404
    assert client.get("/deployments/name/cpu-census/census").json()["id"] == census["id"]
    assert client.get("/deployments/name/cpu-census/by-hand").status_code == 200
