"""`make run`: the whole stack on this machine, one demo fan-out, then everything stopped.

Starts a database (PostgreSQL when installed, else SQLite), a Prefect server, two light
task workers, one heavy task worker and the reaper, runs the parent flow as its own process, and
prints how many items each worker process handled and the heavy subflow's speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fanout_demo.local import DemoStack


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fanout_demo.demo", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--light-workers", type=int, default=2)
    p.add_argument("--heavy-batches", type=int, default=1)
    p.add_argument("--database", choices=["auto", "postgres", "sqlite"], default="auto")
    p.add_argument("--dir", type=Path, default=None, help="keep state and logs here (default: a temp dir)")
    args = p.parse_args(argv)

    root = args.dir or Path(tempfile.mkdtemp(prefix="fanout-demo-"))
    t0 = time.monotonic()
    with DemoStack(root, database=args.database) as stack:
        print(
            f"server: {stack.api_url} (UI at {stack.api_url.removesuffix('/api')}), database: "
            f"{stack.db_url.split(':')[0]} ({time.monotonic() - t0:.1f}s)",
            flush=True,
        )
        for _ in range(args.light_workers):
            stack.start_worker("light", limit=8, wait=False)
        stack.start_worker("heavy", limit=1, wait=False)
        stack.start_reaper(interval=5, stale_after=30)
        for w in stack.workers():
            stack.wait_healthy(w)
        print(f"workers: {', '.join(f'{w.name} ({w.client_id})' for w in stack.workers())}", flush=True)
        names = {w.client_id: w.name for w in stack.workers()}
        # Two runs: the light fan-out, then the heavy batches on their own, so the heavy
        # subflow's pool-vs-serial comparison is not skewed by light work sharing the CPUs.
        out = root / "summary.json"
        t1 = time.monotonic()
        proc = stack.run_flow(["--items", str(args.items), "--heavy-batches", "0", "--json", str(out)], capture=False)
        wall = time.monotonic() - t1
        codes = [proc.returncode]
        if out.exists():
            s = json.loads(out.read_text())
            print("\nitems per worker process:")
            for cid, n in sorted(s["per_worker"].items()):
                print(f"  {names.get(cid, cid):<16} {cid:<24} {n:>7}")
        print(f"demo flow: {args.items} items in {wall:.1f}s wall ({args.items / wall:.1f} items/s end to end)\n")
        if args.heavy_batches:
            heavy_out = root / "heavy.json"
            args_heavy = ["--items", "1", "--heavy-batches", str(args.heavy_batches), "--compare-serial"]
            proc = stack.run_flow([*args_heavy, "--json", str(heavy_out)], capture=False)
            codes.append(proc.returncode)
            if heavy_out.exists():
                for h in json.loads(heavy_out.read_text())["heavy"]:
                    print(
                        f"heavy subflow: {h['processes']} processes, pool {h['seconds']:.2f}s vs serial "
                        f"{h['serial_seconds']:.2f}s: speed-up {h['serial_seconds'] / h['seconds']:.2f}x"
                    )
        print(f"\ntask runs per pool (the dashboard's metrics):\n{stack.pool_report()}")
        print(f"logs: {root / 'logs'}")
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
