"""Fixtures for the chart tests: the pinned helm binary, rendering, and the Kubernetes
OpenAPI schema of the cluster version we target, all offline.

Missing tools fail the tests with a message saying how to get them; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_openapi import OpenAPI

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fanout"
RELEASE = "demo"
NAMESPACE = "fanout"


def _make_var(name: str, default: str) -> str:
    """A `NAME ?= value` from k8s/cluster.mk (the pinned versions), overridable by env."""
    if os.environ.get(name):
        return os.environ[name]
    mk = REPO / "k8s" / "cluster.mk"
    if mk.exists():
        m = re.search(rf"^{name}\s*\?=\s*(\S+)", mk.read_text(), re.M)
        if m:
            return m.group(1)
    return default


K8S_VERSION = _make_var("K8S_VERSION", "v1.33.13")
KEDA_VERSION = _make_var("KEDA_VERSION", "v2.21.0")
VERSITYGW_VERSION = _make_var("VERSITYGW_VERSION", "")


def _helm() -> str:
    helm = os.environ.get("HELM") or str(REPO / ".bin" / "helm")
    if not (os.path.isfile(helm) and os.access(helm, os.X_OK)):
        pytest.fail(
            f"helm not found at {helm}: run `make tools` (builds the pinned helm into .bin) or set HELM=/path/to/helm",
            pytrace=False,
        )
    return helm


def _module_file(module: str, version: str, rel: str, hint: str) -> Path:
    """`rel` inside Go module `module@version`: from the Go module cache ($FANOUT_CACHE/go/mod,
    then `go env GOMODCACHE`), else `go mod download`ed (the Go module proxy is reachable
    where container registries are not)."""
    want = Path(f"{module}@{version}") / rel
    caches = [Path(os.environ.get("FANOUT_CACHE", Path.home() / ".cache" / "fanout")) / "go" / "mod"]
    # The same Go the cluster scripts use: the machine's if new enough, else one fetched
    # from the Go module proxy into $FANOUT_CACHE.
    found = subprocess.run([str(REPO / "k8s" / "scripts" / "ensure-go.sh")], capture_output=True, text=True)
    go = found.stdout.strip() if found.returncode == 0 else shutil.which("go")
    if go:
        gomodcache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip()
        if gomodcache:
            caches.append(Path(gomodcache))
    for cache in caches:
        if (cache / want).exists():
            return cache / want
    if go:
        env = {**os.environ, "GOMODCACHE": str(caches[0]), "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
        proc = subprocess.run(
            [go, "mod", "download", "-json", f"{module}@{version}"],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
        )
        if proc.returncode == 0:
            path = Path(json.loads(proc.stdout)["Dir"]) / rel
            if path.exists():
                return path
    pytest.fail(
        f"no {want}: looked in {', '.join(map(str, caches))} and could not `go mod download` it; {hint}",
        pytrace=False,
    )


def _swagger_path() -> Path:
    """swagger.json of k8s.io/kubernetes@K8S_VERSION ($K8S_SWAGGER overrides)."""
    if os.environ.get("K8S_SWAGGER"):
        return Path(os.environ["K8S_SWAGGER"])
    return _module_file(
        "k8s.io/kubernetes", K8S_VERSION, "api/openapi-spec/swagger.json", "set K8S_SWAGGER=/path/to/swagger.json"
    )


@pytest.fixture(scope="session")
def helm() -> str:
    return _helm()


@pytest.fixture(scope="session")
def openapi() -> OpenAPI:
    """The cluster's API, and KEDA's ScaledObject from the CRD of the KEDA version `make
    e2e` installs (its Go module ships the CRDs)."""
    api = OpenAPI(_swagger_path())
    crd = _module_file(
        "github.com/kedacore/keda/v2", KEDA_VERSION, "config/crd/bases/keda.sh_scaledobjects.yaml", "check KEDA_VERSION"
    )
    api.add_crd(yaml.safe_load(crd.read_text()))
    return api


class Rendered(list):
    """The documents `helm template` printed, with lookups by kind and name."""

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self if d["kind"] == kind and d["metadata"]["name"] == name]
        assert found, f"no {kind}/{name}; rendered: {sorted((d['kind'], d['metadata']['name']) for d in self)}"
        assert len(found) == 1, f"{len(found)} objects {kind}/{name}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.all(kind)}


def _template_cmd(helm: str, values: dict[str, Any] | None, args: tuple[str, ...], tmp: Path) -> list[str]:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSION]
    if values is not None:
        f = tmp / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(f)]
    return cmd + list(args)


_RENDERED: dict[str, str] = {}  # one `helm template` per distinct input per session


@pytest.fixture
def render(helm: str, tmp_path: Path) -> Callable[..., Rendered]:
    """render(values_dict=None, *extra_helm_args) -> Rendered; fails the test on a helm error."""

    def _render(values: dict[str, Any] | None = None, *args: str) -> Rendered:
        key = json.dumps([values, args], sort_keys=True)
        if key not in _RENDERED:
            proc = subprocess.run(_template_cmd(helm, values, args, tmp_path), capture_output=True, text=True)
            assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
            _RENDERED[key] = proc.stdout
        return Rendered(d for d in yaml.safe_load_all(_RENDERED[key]) if d)

    return _render


@pytest.fixture
def render_error(helm: str, tmp_path: Path) -> Callable[..., str]:
    """render_error(values_dict=None, *extra_helm_args) -> helm's error output; fails the
    test if rendering succeeds."""

    def _render_error(values: dict[str, Any] | None = None, *args: str) -> str:
        proc = subprocess.run(_template_cmd(helm, values, args, tmp_path), capture_output=True, text=True)
        assert proc.returncode != 0, f"helm template accepted bad values {values} {args}"
        return proc.stderr

    return _render_error
