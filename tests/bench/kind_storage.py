"""The 10,000-item row on the kind cluster, per storage type, in one run.

    python tests/bench/kind_storage.py [--items 10000] [--runs 2] [--types hostPath,objectStore]

For each storage type: the chart installed into a namespace of its own (kind values, two
light pods, one on each worker node, no heavy pool), then `--runs` fan-outs of `--items`
trivial items (`--work noop`, automatic chunking) from the chart's demo Job; prints each
run's wall time and items/s, then uninstalls. Needs the cluster and the images of
`make e2e` (FANOUT_RUNTIME_IMAGE, the loaded runtime image). Not part of `make bench`:
it needs the cluster, and each install takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("BIN_DIR", REPO / ".bin"))
CHART = REPO / "charts" / "fanout"
KIND_VALUES = CHART / "ci" / "kind-values.yaml"
CONTEXT = f"kind-{os.environ.get('CLUSTER_NAME', 'fanout')}"
# Two light pods, one on each worker node, no heavy pool; objectStore unless --set.
PLACEMENT = ("-f", str(CHART / "ci" / "kind-objectstore-values.yaml"))


def run(*cmd: str, stdin: str | None = None, timeout: float = 900) -> str:
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{out.stderr}{out.stdout}")
    return out.stdout


def kubectl(ns: str, *args: str, **kw: object) -> str:
    return run(str(BIN / "kubectl"), "--context", CONTEXT, "-n", ns, *args, **kw)  # type: ignore[arg-type]


def helm(ns: str, *args: str) -> str:
    return run(str(BIN / "helm"), "--kube-context", CONTEXT, "-n", ns, *args, timeout=1000)


def fan_out(ns: str, values: list[str], items: int) -> dict:
    """One fan-out from the chart's demo Job; its FANOUT-SUMMARY."""
    rendered = helm(ns, "template", "fanout", str(CHART), *values, "--show-only", "templates/tests/demo.yaml")
    job = yaml.safe_load(rendered)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    job["metadata"] = {"name": name, "labels": job["metadata"].get("labels", {})}
    job["spec"]["template"]["spec"]["containers"][0]["command"] = [
        "python", "-m", "fanout_demo.flow", "--json", "-", "--timeout", "1500",
        "--items", str(items), "--work", "noop", "--heavy-batches", "0",
    ]  # fmt: skip
    kubectl(ns, "create", "-f", "-", stdin=json.dumps(job))
    kubectl(ns, "wait", "--for=condition=complete", f"job/{name}", "--timeout=1600s", timeout=1700)
    for line in kubectl(ns, "logs", f"job/{name}").splitlines():
        if line.startswith("FANOUT-SUMMARY "):
            return json.loads(line.removeprefix("FANOUT-SUMMARY "))
    raise SystemExit(f"job {name} printed no summary")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--types", default="hostPath,objectStore")
    args = p.parse_args()
    image = os.environ.get("FANOUT_RUNTIME_IMAGE", "")
    if ":" not in image:
        raise SystemExit("set FANOUT_RUNTIME_IMAGE to the runtime image loaded into kind (make e2e prints it)")
    repo, tag = image.rsplit(":", 1)
    rows = []
    for storage in args.types.split(","):
        ns = f"bench-{storage.lower()}-{uuid.uuid4().hex[:4]}"
        run(str(BIN / "kubectl"), "--context", CONTEXT, "create", "namespace", ns)
        values = ["-f", str(KIND_VALUES), *PLACEMENT, "--set", f"storage.type={storage}",
                  "--set", f"image.repository={repo}", "--set", f"image.tag={tag}"]  # fmt: skip
        try:
            started = time.monotonic()
            helm(ns, "install", "fanout", str(CHART), *values, "--wait", "--wait-for-jobs", "--timeout", "900s")
            print(f"{storage}: installed in {time.monotonic() - started:.0f}s", flush=True)
            for i in range(args.runs):
                s = fan_out(ns, values, args.items)
                assert not s["failed"] and len(s["results"]) == args.items, "every item once"
                rows.append((storage, i + 1, s["seconds"], s["items_per_second"], s["task_runs"]))
                print(f"{storage} run {i + 1}: {s['seconds']:.1f}s, {s['items_per_second']:.0f} items/s, "
                      f"{s['task_runs']} task runs", flush=True)  # fmt: skip
        finally:
            helm(ns, "uninstall", "fanout", "--wait", "--timeout", "300s")
            run(str(BIN / "kubectl"), "--context", CONTEXT, "delete", "namespace", ns, "--wait=false")
    print("\n| storage | run | seconds | items/s | task runs |\n|---|---|---|---|---|")
    for storage, i, seconds, ips, runs in rows:
        print(f"| {storage} | {i} | {seconds:.1f} | {ips:.0f} | {runs} |")


if __name__ == "__main__":
    sys.exit(main())
