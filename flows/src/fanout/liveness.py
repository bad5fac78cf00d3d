"""Worker heartbeats: how the reaper knows which worker holds which task run.

Prefect does not record which task worker is running a background task run, and a
worker that dies leaves its runs Pending/Running forever. Each of our workers therefore
publishes a heartbeat every few seconds as a Prefect Variable (stored in the server's
database, so it survives server restarts and needs no extra infrastructure):

    fanout-worker-<client id>  ->  {"client_id", "pool", "task_keys", "runs",
                                    "limit", "free_since", "ts"}

`runs` are the task runs it holds; `free_since` is since when it has continuously had a
free slot (None while full). Times are UNIX seconds of the writer's clock.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fanout.liveness")
PAGE = 200

PREFIX = "fanout-worker-"
RECOVERED_PREFIX = "fanout-recovered-"


def variable_name(client_id: str) -> str:
    """Variable names allow letters, digits, dashes and underscores only."""
    return PREFIX + re.sub(r"[^a-z0-9_-]", "-", client_id.lower())[:200]


def ledger_name(tag: str) -> str:
    """The reaper counts the runs of one fan-out (tagged `fanout-<id>`) it scheduled again here."""
    return f"{RECOVERED_PREFIX}{tag.removeprefix('fanout-')}"


def fanout_tags(tags: Iterable[str]) -> list[str]:
    """The fan-out tags (`fanout-<id>`) among a task run's tags."""
    return [t for t in tags if t.startswith("fanout-")]


@dataclass(frozen=True)
class Heartbeat:
    """One worker's last word."""

    client_id: str
    pool: str
    task_keys: frozenset[str]
    runs: frozenset[str]
    limit: int
    free_since: float | None
    ts: float

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> Heartbeat:
        return cls(
            client_id=str(value["client_id"]),
            pool=str(value.get("pool", "")),
            task_keys=frozenset(value.get("task_keys", ())),
            runs=frozenset(value.get("runs", ())),
            limit=int(value.get("limit", 0)),
            free_since=value.get("free_since"),
            ts=float(value["ts"]),
        )

    def to_value(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "pool": self.pool,
            "task_keys": sorted(self.task_keys),
            "runs": sorted(self.runs),
            "limit": self.limit,
            "free_since": self.free_since,
            "ts": self.ts,
        }

    def alive(self, now: float, stale_after: float) -> bool:
        return now - self.ts < stale_after

    def idle_for(self, now: float) -> float:
        """Seconds it has had a free slot without interruption (0 when full)."""
        return 0.0 if self.free_since is None else max(0.0, now - self.free_since)


def read_heartbeats(client: Any) -> dict[str, Heartbeat]:
    """Every worker heartbeat on the server, by variable name (a sync Prefect client)."""
    variables: list[dict[str, Any]] = []
    while True:
        body = {"variables": {"name": {"like_": f"{PREFIX}%"}}, "limit": PAGE, "offset": len(variables)}
        page = client.request("POST", "/variables/filter", json=body).json()
        variables += page
        if len(page) < PAGE:
            break
    beats = {}
    for var in variables:
        try:
            value = var["value"] if isinstance(var["value"], dict) else json.loads(var["value"])
            beats[var["name"]] = Heartbeat.from_value(value)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed heartbeat %s", var.get("name"))
    return beats


def task_name(task_key: str) -> str:
    """The task's name part of a Prefect task key, `<qualname>-<hash of its code>`."""
    return task_key.rsplit("-", 1)[0]


def unserved_reason(task_key: str, served: Iterable[str]) -> str | None:
    """None if a live worker serves `task_key`; else why no worker will ever run it.

    A task key embeds a hash of the task's code, so a submitter whose code differs from
    the workers' by a single character creates runs that no worker receives.
    """
    served = set(served)
    if task_key in served:
        return None
    name = task_name(task_key)
    same_name = sorted(k for k in served if task_name(k) == name)
    if same_name:
        return (
            f"no live task worker serves task {name!r} with this code (key {task_key}); workers serve "
            f"{', '.join(same_name)}: the task's code differs between the submitter and the workers "
            "(the key embeds a hash of it); run the same code on both sides (rebuild the image)"
        )
    shown = ", ".join(sorted(served)[:10]) or "nothing (no live worker)"
    return (
        f"no live task worker serves task {name!r} (key {task_key}); live workers serve: {shown}. "
        f"Start workers for it (python -m fanout.worker --tasks module:{name}, or a chart pool's tasks)"
    )
