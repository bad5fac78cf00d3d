"""The chart's `deployments` entries as `fanout.deployments` reads them (registering them
against a real server is in tests/integration/test_user_patterns.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fanout.deployments import DeploymentError, DeploymentSpec, load_specs


def test_a_module_entrypoint_is_stored_as_a_module_path_without_pull_steps() -> None:
    (spec,) = load_specs([{"name": "crunch", "entrypoint": "fanout_demo.tasks:crunch", "jobVariables": {}}])
    assert spec.stored_entrypoint == "fanout_demo.tasks.crunch"
    assert spec.pull_steps is None
    assert spec.job_variables == {} and spec.image is None and spec.flow_name is None


def test_a_script_entrypoint_starts_its_runs_in_the_scripts_directory() -> None:
    spec = DeploymentSpec.from_values({"name": "r", "entrypoint": "/opt/flows/report.py:nightly", "image": "x:1"})
    assert spec.stored_entrypoint == "/opt/flows/report.py:nightly"
    assert spec.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/flows"}}]
    assert spec.image == "x:1"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "u"}], "deployments[0]: entrypoint is required"),
        ([{"entrypoint": "a.b:c"}], "deployments[0]: name is required"),
        ([{"name": "u", "entrypoint": "a.b.c"}], "deployments[0] (u): entrypoint 'a.b.c' must be"),
        ([{"name": "u", "entrypoint": "rel/x.py:f"}], "entrypoint 'rel/x.py:f' must be"),
        ([{"name": "a/b", "entrypoint": "a.b:c"}], "deployments[0]: name 'a/b' must be"),
        ([{"name": "u", "entrypoint": "a.b:c", "cpus": 2}], "deployments[0]: unknown key(s) cpus"),
        (["crunch"], "deployments[0]: expected a mapping"),
        ([{"name": "u", "entrypoint": "a:b"}, {"name": "u", "entrypoint": "c:d"}], "name 'u' is used more than once"),
    ],
)
def test_bad_entries_are_named(entries: list, message: str) -> None:
    with pytest.raises(DeploymentError) as info:
        load_specs(entries)
    assert message in str(info.value)


def test_every_bad_entry_is_named_at_once() -> None:
    with pytest.raises(DeploymentError) as info:
        load_specs([{"name": "u"}, {"name": "ok", "entrypoint": "a:b"}, {"entrypoint": "a:b"}])
    assert "deployments[0]" in str(info.value) and "deployments[2]" in str(info.value)


def test_the_core_does_not_need_the_demo() -> None:
    code = "import sys, fanout.deployments; print('fanout_demo' in ' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
