"""Where task parameters and results live: one setting, read by every process.

A `.delay()` writes the task's parameters to storage and the task worker reads them
back; the worker writes the result and the submitter reads it. Both sides therefore
need the *same* storage, which Prefect's default (the submitter's own
`$PREFECT_HOME/storage`) is not once they run in different pods.

`FANOUT_STORAGE` is either
- an absolute directory shared by every process (locally a directory, in the cluster
  a shared volume mounted at the same path everywhere), or
- the slug of a saved Prefect storage block, `<block-type>/<block-name>` (for example
  an S3-compatible bucket saved as `s3-bucket/fanout`).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "FANOUT_STORAGE"
DEFAULT_DIR = Path.home() / ".fanout" / "storage"


def storage_setting() -> str:
    """The configured storage: `FANOUT_STORAGE`, or a directory in the user's home."""
    return os.environ.get(ENV) or str(DEFAULT_DIR)


def result_storage() -> Path | str:
    """The `result_storage=` every fanned-out task uses (parameters go there too).

    A directory is passed as a Path: Prefect turns it into an unsaved local file
    system and records absolute paths in result metadata, so a reader needs no block
    from the API. Anything else is passed on as a block slug for Prefect to load.
    """
    value = storage_setting()
    if value.startswith("/"):
        Path(value).mkdir(parents=True, exist_ok=True)
        return Path(value)
    if value.count("/") != 1:
        raise ValueError(
            f"{ENV}={value!r} is neither an absolute directory nor a block slug '<block-type>/<block-name>'"
        )
    return value


def prefect_storage_env() -> dict[str, str]:
    """Prefect's own default-storage settings for `FANOUT_STORAGE`, so that a plain
    `@task` (no `result_storage=`) keeps its parameters and results where every process
    can read them. Empty when `FANOUT_STORAGE` is not set (Prefect's defaults apply).

    A directory becomes Prefect's local storage path (parameters and results both go
    there by default); a block slug becomes the default result storage and the default
    storage of `.delay()` parameters.
    """
    value = os.environ.get(ENV, "")
    if not value:
        return {}
    if value.startswith("/"):
        return {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": value}
    return {
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": value,
        "PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK": value,
    }
