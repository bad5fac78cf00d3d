"""How many CPUs this process may really use.

`os.cpu_count()` and `multiprocessing.cpu_count()` report the node's CPUs. In a pod
limited to 2 CPUs on a 64-core node a process pool of 64 would thrash, so the pool is
sized from the cgroup CPU quota first and the scheduler affinity second.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None when unlimited.

    Reads cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>") and falls back
    to cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1 = unlimited).
    """
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        quota_s = _read(v1 / "cpu.cfs_quota_us")
        period_s = _read(v1 / "cpu.cfs_period_us")
        if quota_s and period_s:
            quota, period = int(quota_s), int(period_s)
            if quota > 0 and period > 0:
                return quota / period
            return None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process can use: min(ceil(cgroup quota), CPU affinity), at least 1."""
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit(root)
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota)))
