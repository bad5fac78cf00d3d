"""Wait until the Prefect database is migrated to this image's Prefect.

The chart runs Prefect's migrations once, in a Job (`prefect server database upgrade -y`),
and starts its API replicas and background services with
`PREFECT_API_DATABASE_MIGRATE_ON_START=false`: Prefect would otherwise migrate from every
replica at once, with no lock between them. Their init container runs
`python -m fanout.migrations`, which returns once the database is at the head revisions of
the Prefect in this image, and fails naming the revisions when the database is newer than
the image (a rollback to an older image needs `prefect server database downgrade` first).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from fanout.internals import database_revision, migration_revisions


async def wait_migrated(timeout: float, say_every: float = 30.0) -> None:
    """Return once the database is at Prefect's heads; raise TimeoutError after `timeout`
    seconds, RuntimeError when the database holds revisions this Prefect does not know."""
    heads, known = migration_revisions()  # from the image's files: read once
    deadline = time.monotonic() + timeout
    said = 0.0
    while True:
        try:
            current = await database_revision()
        except Exception as exc:  # noqa: BLE001 - not reachable yet, starting up, ...: retried until the timeout
            why = f"database not readable: {type(exc).__name__}: {exc}"
        else:
            if current == heads:
                return
            if current - known:
                raise RuntimeError(
                    f"the database is at {sorted(current)}, which this image's Prefect does not know "
                    f"(its heads: {sorted(heads)}): the database is newer than the image"
                )
            why = f"database at {sorted(current) or 'no revision'}, waiting for {sorted(heads)}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Prefect database was not migrated within {timeout:.0f} s ({why})")
        if time.monotonic() - said >= say_every:
            print(f"waiting for the migrations Job: {why}", flush=True)
            said = time.monotonic()
        await asyncio.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fanout.migrations", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(wait_migrated(args.timeout))
    except (TimeoutError, RuntimeError) as exc:
        print(f"fanout.migrations: {exc}", file=sys.stderr)
        return 1
    print("the Prefect database is migrated", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
