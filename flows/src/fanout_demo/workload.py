"""The example workload: plain Python, no Prefect, so it can be tested and timed alone.

Items are identified by an integer id. Each item's data is generated deterministically
from its id (no downloads), so any process on any pod produces the same bytes and a
result can be checked anywhere.

- light, per item: a checksum and byte statistics of a generated record (milliseconds);
- heavy, per batch: counting primes in a range of integers (CPU-bound, about a second
  per segment), split into segments that a process pool runs in parallel.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

RECORD_BYTES = 4096


class InjectedFailure(ValueError):
    """Raised for items the caller asked to fail, to exercise error reporting end to end."""


def make_record(item: int, size: int = RECORD_BYTES) -> bytes:
    """The item's data: `size` pseudo-random bytes seeded by the item id."""
    return random.Random(item).randbytes(size)


def checksum_item(item: int) -> dict[str, object]:
    """The light per-item function: sha256 and mean/stdev of the record's bytes."""
    data = make_record(item)
    n = len(data)
    mean = sum(data) / n
    var = sum((b - mean) ** 2 for b in data) / n
    return {
        "item": item,
        "sha256": hashlib.sha256(data).hexdigest(),
        "mean": round(mean, 6),
        "stdev": round(math.sqrt(var), 6),
    }


def is_prime(n: int) -> bool:
    """Trial division by 2, 3 and 6k +/- 1 up to sqrt(n)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    if n % 3 == 0:
        return n == 3
    f, root = 5, math.isqrt(n)
    while f <= root:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def count_primes(lo: int, hi: int) -> int:
    """Number of primes p with lo <= p < hi.

    Deliberately plain-Python trial division: it stands for real CPU-bound Python code
    that holds the GIL, which threads cannot speed up and processes can.
    """
    return sum(1 for n in range(lo, hi) if is_prime(n))


@dataclass(frozen=True)
class Segment:
    """One unit of heavy work: count primes in [lo, hi)."""

    lo: int
    hi: int


# Heavy segments start here so that every segment costs about the same (trial division
# of 10-digit numbers): about 25 us per integer on one of our cores.
HEAVY_BASE = 10**9


def batch_segments(batch: int, segments: int, span: int) -> list[Segment]:
    """The segments of heavy batch `batch`: `segments` consecutive ranges of `span` integers."""
    if batch < 0 or segments < 1 or span < 1:
        raise ValueError("batch must be >= 0, segments and span >= 1")
    first = HEAVY_BASE + batch * segments * span
    return [Segment(first + i * span, first + (i + 1) * span) for i in range(segments)]


def noop_item(item: int) -> dict[str, object]:
    """A trivial item: what per-item overhead is measured with."""
    return {"item": item, "double": 2 * item}


CPU_ITEM_SPAN = 2000  # about 50 ms of trial division on one of our cores


def cpu_item(item: int) -> dict[str, object]:
    """A CPU-bound item of about 50 ms: primes in its own small range."""
    lo = HEAVY_BASE + item * CPU_ITEM_SPAN
    return {"item": item, "primes": count_primes(lo, lo + CPU_ITEM_SPAN)}


# Per-item functions a fan-out can run, by name (`--work`).
WORK = {"checksum": checksum_item, "noop": noop_item, "cpu": cpu_item}
