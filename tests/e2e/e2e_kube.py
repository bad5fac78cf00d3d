"""Helpers for end-to-end tests against our kind cluster: kubectl/kind via subprocess,
an `eventually` poller with timeouts scaled by $E2E_TIMEOUT_SCALE, and a tiny image builder.

A module with a unique name (not conftest) so tests can import it next to other test tiers.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("BIN_DIR", REPO / ".bin"))
KUBECTL = os.environ.get("KUBECTL", str(BIN_DIR / "kubectl"))
KIND = os.environ.get("KIND", str(BIN_DIR / "kind"))
CLUSTER_NAME = os.environ.get("CLUSTER_NAME", "fanout")
TIMEOUT_SCALE = float(os.environ.get("E2E_TIMEOUT_SCALE", "1"))

T = TypeVar("T")


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def eventually(fn: Callable[[], T], timeout: float = 60, interval: float = 1, message: str = "") -> T:
    """Call fn until it returns a truthy value without raising AssertionError; return that value.

    timeout is scaled by $E2E_TIMEOUT_SCALE. On timeout the last AssertionError (or a new one
    naming the last falsy result) is raised, so the failure says what was still wrong.
    """
    deadline = time.monotonic() + scaled(timeout)
    last: Any = None
    while True:
        try:
            result = fn()
            if result:
                return result
            last = AssertionError(f"{message or 'condition'} still false (last result: {result!r})")
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {scaled(timeout):.0f}s: {message}\n{last}") from last
        time.sleep(interval)


class Cluster:
    """A thin wrapper over kubectl (via subprocess) bound to one kubeconfig."""

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = [KUBECTL, "--kubeconfig", self.kubeconfig, *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=scaled(timeout))
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, manifest: str, namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl(*ns, "apply", "-f", "-", input=manifest)

    def nodes(self) -> list[dict[str, Any]]:
        return self.json("get", "nodes")["items"]

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        sel = ["-l", selector] if selector else []
        return self.json("-n", namespace, "get", "pods", *sel)["items"]

    def kind(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([KIND, *args], capture_output=True, text=True, timeout=scaled(timeout))
        if result.returncode != 0:
            raise AssertionError(f"kind {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
        return result

    def dump(self, namespace: str | None = None) -> str:
        """Everything a human wants to see when a test failed, as one string."""
        parts = []
        commands = [("get", "all", "-A", "-o", "wide"), ("get", "nodes", "-o", "wide")]
        if namespace:
            commands += [
                ("-n", namespace, "get", "events", "--sort-by=.lastTimestamp"),
                ("-n", namespace, "describe", "pods"),
                ("-n", namespace, "get", "pvc,pv", "-o", "wide"),
            ]
        for args in commands:
            r = self.kubectl(*args, check=False, timeout=60)
            parts.append(f"$ kubectl {' '.join(args)}\n{r.stdout}{r.stderr}")
        if namespace:
            for pod in self.pods(namespace):
                name = pod["metadata"]["name"]
                r = self.kubectl(
                    "-n", namespace, "logs", name, "--all-containers", "--tail=100", check=False, timeout=60
                )
                parts.append(f"$ kubectl -n {namespace} logs {name}\n{r.stdout}{r.stderr}")
        return "\n".join(parts)


def build_image(tag: str, dockerfile: str, files: dict[str, str] | None = None) -> str:
    """docker build a small image from an inline Dockerfile (plus files) and return its tag."""
    with tempfile.TemporaryDirectory() as ctx:
        Path(ctx, "Dockerfile").write_text(dockerfile)
        for name, content in (files or {}).items():
            Path(ctx, name).write_text(content)
        result = subprocess.run(
            ["docker", "build", "-q", "-t", tag, ctx], capture_output=True, text=True, timeout=scaled(600)
        )
        if result.returncode != 0:
            raise AssertionError(f"docker build {tag} failed:\n{result.stderr}{result.stdout}")
    return tag
