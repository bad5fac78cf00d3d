"""Process-pool sizing from cgroup files laid out as the kernel presents them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fanout.cpu import available_cpus, cgroup_cpu_limit


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    write(tmp_path, "cpu.max", "150000 100000")
    assert cgroup_cpu_limit(tmp_path) == 1.5


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    write(tmp_path, "cpu.max", "max 100000")
    assert cgroup_cpu_limit(tmp_path) is None


@pytest.mark.parametrize("subdir", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota(tmp_path: Path, subdir: str) -> None:
    write(tmp_path, f"{subdir}/cpu.cfs_quota_us", "200000")
    write(tmp_path, f"{subdir}/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(tmp_path) == 2.0


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    write(tmp_path, "cpu/cpu.cfs_quota_us", "-1")
    write(tmp_path, "cpu/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None


def test_quota_rounds_up_and_never_exceeds_affinity(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    write(tmp_path, "cpu.max", "50000 100000")  # half a CPU still gets one process
    assert available_cpus(tmp_path) == 1
    write(tmp_path, "cpu.max", f"{(affinity + 7) * 100000} 100000")  # quota above the CPUs we may run on
    assert available_cpus(tmp_path) == affinity
    if affinity >= 2:
        write(tmp_path, "cpu.max", "120000 100000")
        assert available_cpus(tmp_path) == 2


def test_without_quota_affinity_decides(tmp_path: Path) -> None:
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))
