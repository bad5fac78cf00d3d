"""kube-score on the rendered chart: every check it reports is fixed, or ignored here by
name with the reason. A new finding (a template change, a kube-score upgrade) fails the
test with kube-score's own explanation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import CHART, NAMESPACE, RELEASE, REPO

KUBE_SCORE = os.environ.get("KUBE_SCORE") or str(REPO / ".bin" / "kube-score")

# Checks we do not follow, each with why.
IGNORED = {
    "container-image-pull-policy": "images are tagged by a content hash, so IfNotPresent is exact; "
    "Always would also break images loaded into kind, which no registry serves",
    "pod-networkpolicy": "NetworkPolicy is opt-in (networkPolicy.enabled, PostgreSQL's ingress): "
    "enforcement depends on the network plugin, and the server must accept submitters, "
    "flow-run pods and your Jobs from anywhere in the namespace",
    "container-security-context-user-group-id": "only PostgreSQL is flagged: it runs as uid/gid 999, "
    "the postgres user of the official image that owns its data directory (non-root all the same)",
    "deployment-replicas": "the services Deployment and Redis are flagged: one of each on purpose "
    "(Prefect's background services are scheduled once, through Redis; Redis sits on a "
    "ReadWriteOnce volume); the API replicas are 2 by default",
    "deployment-strategy": "Redis is flagged: Recreate on purpose, one pod on its ReadWriteOnce volume",
    "deployment-has-host-podantiaffinity": "the API replicas spread over nodes with topologySpreadConstraints "
    "(server.topologySpreadConstraints, ScheduleAnyway), which kube-score does not read",
}
# kube-score's flag, not a check name: CPU limits only where they size the work.
FLAGS = [
    "--ignore-container-cpu-limit",  # the pools set one (the heavy pool sizes its process pool
    # from it); the server and PostgreSQL would only be throttled in their bursts by one
]
VALUE_SETS = {
    "defaults": [],
    "kind": ["--values", str(CHART / "ci" / "kind-values.yaml")],
}
# Further checks ignored for one value set only.
IGNORED_FOR = {
    "kind": {
        "container-resources": "our 2-CPU kind cluster: the heavy worker asks for no CPU, so that "
        "a 2-CPU subflow pod fits its 2-CPU large node",
    },
}


def _kube_score() -> str:
    if not (os.path.isfile(KUBE_SCORE) and os.access(KUBE_SCORE, os.X_OK)):
        pytest.fail(f"kube-score not found at {KUBE_SCORE}: run `make tools` or set KUBE_SCORE", pytrace=False)
    return KUBE_SCORE


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_kube_score_finds_nothing_we_have_not_answered(name: str, helm: str, tmp_path: Path) -> None:
    manifest = tmp_path / "chart.yaml"
    rendered = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *VALUE_SETS[name]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr
    manifest.write_text(rendered.stdout)
    ignored = {**IGNORED, **IGNORED_FOR.get(name, {})}
    ignores = [arg for check in ignored for arg in ("--ignore-test", check)]
    proc = subprocess.run(
        [_kube_score(), "score", str(manifest), "--output-format", "ci", *FLAGS, *ignores],
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[CRITICAL]", "[WARNING]"))]
    assert not findings, "kube-score findings (fix them, or ignore by name with a reason):\n" + "\n".join(findings)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_helm_template_and_lint_work_without_a_kube_version(helm: str) -> None:
    """GitOps tools render charts without `--kube-version` (helm then assumes v1.20)."""
    rendered = subprocess.run([helm, "template", RELEASE, str(CHART)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: Deployment" in rendered.stdout
    lint = subprocess.run([helm, "lint", str(CHART)], capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
