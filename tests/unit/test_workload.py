"""The example workload is deterministic and correct on known values."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from fanout_demo import workload


def test_count_primes_known_values() -> None:
    assert workload.count_primes(0, 100) == 25
    assert workload.count_primes(0, 10_000) == 1229
    assert workload.count_primes(10, 20) == 4  # 11 13 17 19
    assert workload.count_primes(2, 3) == 1
    assert workload.count_primes(5, 5) == 0
    assert workload.count_primes(100, 10) == 0


def test_segments_cover_the_batch_without_gaps() -> None:
    segs = workload.batch_segments(2, 4, 100)
    assert [s.hi - s.lo for s in segs] == [100] * 4
    assert all(a.hi == b.lo for a, b in itertools.pairwise(segs))
    assert segs[0].lo == workload.HEAVY_BASE + 800
    # split counting equals one count over the whole range
    assert sum(workload.count_primes(s.lo, s.hi) for s in segs) == workload.count_primes(segs[0].lo, segs[-1].hi)


@pytest.mark.parametrize("args", [(-1, 4, 10), (0, 0, 10), (0, 4, 0)])
def test_bad_segments_are_rejected(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        workload.batch_segments(*args)


def test_records_are_deterministic_per_item() -> None:
    assert workload.make_record(3) == workload.make_record(3)
    assert workload.make_record(3) != workload.make_record(4)
    r = workload.checksum_item(3)
    assert r["item"] == 3
    assert r["sha256"] == hashlib.sha256(workload.make_record(3)).hexdigest()
    assert 100 < r["mean"] < 155  # uniform bytes average 127.5


def test_every_work_function_names_its_item() -> None:
    for name, fn in workload.WORK.items():
        assert fn(5)["item"] == 5, name
    assert workload.noop_item(4)["double"] == 8
    lo = workload.HEAVY_BASE + 3 * workload.CPU_ITEM_SPAN
    assert workload.cpu_item(3)["primes"] == workload.count_primes(lo, lo + workload.CPU_ITEM_SPAN)


def test_segments_are_dealt_into_balanced_groups_without_losing_any() -> None:
    from fanout_demo.tasks import GROUPS_PER_PROCESS, group_segments

    parts = workload.batch_segments(0, 203, 10)
    groups = group_segments(parts, 2)
    assert len(groups) == 2 * GROUPS_PER_PROCESS
    assert sorted(r for g in groups for r in g) == [(p.lo, p.hi) for p in parts]
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    # dealt round-robin: later segments cost more, so contiguous groups would not balance
    ranges = [(p.lo, p.hi) for p in parts]
    head, tail = set(ranges[: len(groups)]), set(ranges[-len(groups) :])
    assert all(head & set(g) and tail & set(g) for g in groups)
    assert len(group_segments(parts[:3], 2)) == 3  # never an empty group
