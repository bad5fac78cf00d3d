"""A user's bulk work through the public fan-out API: plain functions over their own data."""

from __future__ import annotations

import os
import resource
import socket
import time

from prefect import flow, task

import fanout


def shout(word: str) -> str:
    """A plain function over strings; one word is bad."""
    if word == "boom":
        raise ValueError("boom is not a word")
    return word.upper() + "!"


def slow_shout(word: str) -> dict:
    """Keeps a worker busy for a second; says who ran it."""
    time.sleep(1.0)
    return {"word": word.upper(), "worker": f"{socket.gethostname()}-{os.getpid()}"}


def pad(word: str) -> str:
    """A 10 KB result per item: holding 20,000 of them would take 200 MB."""
    return word.ljust(10_000, ".")


def summary(result: fanout.FanOutResult) -> dict:
    return {
        "values": [o.value for o in result.outcomes],
        "failed": {str(k): v for k, v in result.failed.items()},
        "task_runs": result.task_runs,
        "chunk_size": result.chunk_size,
        "redelivered": result.redelivered,
    }


@flow
def shout_all(words: list[str], chunk_size: int | None = None) -> dict:
    return summary(fanout.fan_out(shout, words, chunk_size=chunk_size, timeout=600))


@flow
async def ashout_all(words: list[str]) -> dict:
    return summary(await fanout.afan_out(shout, words, timeout=600))


@flow
def slow_shout_all(n: int, chunk_size: int = 2) -> dict:
    return summary(fanout.fan_out(slow_shout, [f"w{i}" for i in range(n)], chunk_size=chunk_size, timeout=600))


def stream_pad(n: int) -> dict:
    """Outside any flow: consume `n` padded results as they complete; peak memory."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen, ok, size = set(), 0, 0
    for outcome in fanout.fan_out_iter(pad, (f"w{i}" for i in range(n)), chunk_size=100, timeout=900):
        seen.add(outcome.index)
        ok += outcome.ok
        size += len(outcome.value or "")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"distinct": len(seen), "ok": ok, "bytes": size, "rss_growth_mb": (peak - before) / 1024}


@task
def shout_task(word: str) -> str:
    """The same work as a Prefect task, for plain `.delay()`."""
    return shout(word)


def nap(item: list) -> str:
    """Sleeps `item[1]` seconds (keeps an autoscaled pool busy); says which pod ran it."""
    name, seconds = item
    time.sleep(seconds)
    return f"{name}@{socket.gethostname()}"


@flow
def nap_all(n: int, seconds: float = 1.0, last: float = 0.0) -> dict:
    """`n` naps through the fan-out API with automatic chunking; the last one `last` s."""
    items = [[f"n{i}", seconds] for i in range(n)]
    if last:
        items[-1][1] = last
    started = time.time()
    out = summary(fanout.fan_out(nap, items, timeout=900))
    return {**out, "started": started, "ended": time.time()}
