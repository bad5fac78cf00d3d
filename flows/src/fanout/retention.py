"""Storage that stays bounded: delete what no one will read again.

Every task run leaves its parameters (with the pickled run context, ~35 KB) and its
result in `FANOUT_STORAGE`, and Prefect never deletes either. Two things remove them:

- `fanout.fan_out` deletes the parameters and the result of each of its chunk runs once it
  has read the result (`Remover`, in batches: one request per poll for a bucket);
- the reaper's time-to-live sweep (`sweep`) deletes whatever is older than a few hours:
  what a parent that crashed left behind, and the results of plain `.delay()` runs, which
  the user reads through Prefect's futures and we cannot see being read.

Both work on a directory (`FANOUT_STORAGE=/path`) and on an `s3-bucket` block; with any
other block type nothing is deleted (logged once).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from fanout.storage import storage_setting

log = logging.getLogger("fanout.retention")
PARAMETERS = "parameters"  # Prefect's folder of `.delay()` parameters (prefect.task_worker.store_parameters)


class Backend(Protocol):
    def delete(self, keys: list[str]) -> int: ...
    def sweep(self, older_than: float) -> tuple[int, int]: ...


class Directory:
    """FANOUT_STORAGE as a directory: keys are paths under it (or absolute)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def delete(self, keys: list[str]) -> int:
        gone = 0
        for key in keys:
            try:
                (self.root / key).unlink()  # an absolute key replaces the root
                gone += 1
            except FileNotFoundError:
                pass
        return gone

    def sweep(self, older_than: float) -> tuple[int, int]:
        """Delete files last written before `older_than` (epoch seconds): (files, bytes)."""
        files = size = 0
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                path = Path(dirpath, name)
                try:
                    st = path.stat()
                    if st.st_mtime < older_than:
                        path.unlink()
                        files, size = files + 1, size + st.st_size
                except FileNotFoundError:
                    pass
        return files, size


class Bucket:
    """FANOUT_STORAGE as an `s3-bucket` block: keys are object keys under its folder."""

    def __init__(self, block: Any) -> None:
        self.bucket = block.bucket_name
        self.folder = (block.bucket_folder or "").strip("/")
        self.client = block.credentials.get_s3_client()

    def key(self, path: str) -> str:
        # As the block writes them: under its folder, unless the path already is.
        if not self.folder or path == self.folder or path.startswith(self.folder + "/"):
            return path
        return f"{self.folder}/{path}"

    def delete(self, keys: list[str]) -> int:
        gone = 0
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": self.key(k)} for k in keys[i : i + 1000]]
            out = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            gone += len(batch) - len(out.get("Errors", []))
        return gone

    def sweep(self, older_than: float) -> tuple[int, int]:
        """Delete objects last written before `older_than` (epoch seconds): (objects, bytes)."""
        old: list[str] = []
        size = 0
        prefix = f"{self.folder}/" if self.folder else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["LastModified"].timestamp() < older_than:
                    old.append(obj["Key"])
                    size += obj.get("Size", 0)
        return self.delete(old), size


def backend(setting: str | None = None) -> Backend | None:
    """The backend of FANOUT_STORAGE, or None when we cannot delete from it."""
    value = setting or storage_setting()
    if value.startswith("/"):
        return Directory(Path(value))
    block_type, _, name = value.partition("/")
    if block_type != "s3-bucket":
        log.warning("FANOUT_STORAGE=%s: only directories and s3-bucket blocks are cleaned up", value)
        return None
    from prefect_aws import S3Bucket

    from fanout.internals import load_block

    return Bucket(load_block(S3Bucket, name))


def parameters_key(parameters_id: UUID | str) -> str:
    return f"{PARAMETERS}/{parameters_id}"


def result_key(state: Any) -> str | None:
    """Where a final state's result was written (None: no persisted result)."""
    return getattr(getattr(state, "data", None), "storage_key", None)


class Remover:
    """Deletes the keys it is given, in one batch per `flush()`; never raises (what it
    cannot delete, the time-to-live sweep will)."""

    def __init__(self, setting: str | None = None) -> None:
        self._setting = setting
        self._backend: Backend | None | bool = False  # False: not resolved yet
        self.pending: list[str] = []
        self.deleted = 0

    def add(self, keys: Iterable[str | None]) -> None:
        self.pending.extend(k for k in keys if k)

    def flush(self) -> None:
        if not self.pending:
            return
        keys, self.pending = self.pending, []
        try:
            if self._backend is False:
                self._backend = backend(self._setting)
            if self._backend:
                self.deleted += self._backend.delete(keys)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - cleanup must never fail a fan-out
            log.warning("could not delete %d stored parameters/results (the sweep will): %s", len(keys), exc)


def sweep(ttl: float, setting: str | None = None) -> tuple[int, int]:
    """Delete everything in FANOUT_STORAGE written more than `ttl` seconds ago."""
    found = backend(setting)
    return found.sweep(time.time() - ttl) if found else (0, 0)
