"""`make bench-kind`: the 10k-item row on kind, on the bundled object store against hostPath.

One run, two releases of the chart installed one after the other into namespaces of their
own, alike but for `storage.type`: kind's shared hostPath (what a ReadWriteMany volume
gives) and the bundled object store (versitygw on one ReadWriteOnce claim, reached over
S3). Both with the light pool of the object-store e2e test (two pods, one on each worker
node; the heavy pool off). Each release gets a warm-up fan-out, then `--repeats` fan-outs of
`--items` trivial items (the demo flow as a Job in the release, automatic chunking), timed
by the flow itself from the first submission to the last result. Writes JSON.

Needs the kind cluster and the images loaded (`make bench-kind` does both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))

from e2e_kube import CLUSTER_NAME, KIND, Cluster  # noqa: E402
from test_object_store import VALUES  # noqa: E402
from test_stack import installed  # noqa: E402

STORAGES = {
    "hostPath": (*VALUES, "--set", "storage.type=hostPath"),
    "objectStore": VALUES,
}


def say(msg: str) -> None:
    print(f"[bench-kind {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cluster(workdir: Path) -> Cluster:
    config = subprocess.run([KIND, "get", "kubeconfig", "--name", CLUSTER_NAME], capture_output=True, text=True)
    if config.returncode != 0:
        sys.exit(f"bench-kind: no kind cluster {CLUSTER_NAME!r} (make cluster): {config.stderr.strip()}")
    path = workdir / "kubeconfig"
    path.write_text(config.stdout)
    return Cluster(str(path))


def measure(cluster: Cluster, storage: str, items: int, repeats: int) -> list[dict[str, Any]]:
    # installed() prints the namespace's state if `testsfailed`: keep it quiet on success.
    request = types.SimpleNamespace(session=types.SimpleNamespace(testsfailed=0))
    runs = []
    with installed(cluster, request, f"bench-{storage.lower()}", STORAGES[storage]) as stack:  # type: ignore[arg-type]
        say(f"{storage}: installed in {stack.namespace}; warm-up")
        stack.wait_fanout(stack.start_fanout("--items", "200", "--work", "noop"))
        for i in range(repeats):
            summary = stack.wait_fanout(stack.start_fanout("--items", str(items), "--work", "noop"))
            done = len(summary["results"])
            if done != items or summary["failed"]:
                raise SystemExit(f"bench-kind: {storage} run {i}: {done}/{items} done, failed {summary['failed']}")
            runs.append({"storage": storage, "items": items, "items_per_second": summary["items_per_second"]})
            say(f"{storage} run {i + 1}/{repeats}: {summary['items_per_second']:.0f} items/s")
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE.parents[1] / ".bench")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cluster = _cluster(args.out)
    runs = [r for storage in STORAGES for r in measure(cluster, storage, args.items, args.repeats)]
    rates = {s: statistics.median(r["items_per_second"] for r in runs if r["storage"] == s) for s in STORAGES}
    print(f"\n{args.items} trivial items on kind, median of {args.repeats}:")
    print(f"{'storage':<12} {'items/s':>8}")
    for s, rate in rates.items():
        print(f"{s:<12} {rate:>8.0f}")
    print(f"objectStore / hostPath: {rates['objectStore'] / rates['hostPath']:.2f}x")
    (args.out / "kind-storage.json").write_text(json.dumps({"runs": runs, "median_items_per_second": rates}, indent=1))


if __name__ == "__main__":
    main()
