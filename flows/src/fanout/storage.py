"""Where task parameters and results live: one setting, read by every process.

A `.delay()` writes the task's parameters to storage and the task worker reads them
back; the worker writes the result and the submitter reads it. Both sides therefore
need the *same* storage, which Prefect's default (the submitter's own
`$PREFECT_HOME/storage`) is not once they run in different pods.

`FANOUT_STORAGE` is either
- an absolute directory shared by every process (locally a directory, in the cluster
  a shared volume mounted at the same path everywhere), or
- the slug of a saved Prefect storage block, `<block-type>/<block-name>` (for example
  an S3-compatible bucket saved as `s3-bucket/fanout`, see `save_s3_block`).

`python -m fanout.storage s3 --block fanout --bucket B [--endpoint-url URL]` saves such a
block (the chart's setup hook runs it); the keys are never in the block: every process
reads them from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from fanout import settings

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
        # An object store that restarts (its pod rescheduled) must not cost a run: a
        # worker that cannot read a run's parameters deletes the run (Prefect's
        # TaskWorker). boto3's own retries ride out ~30 s of connection errors instead
        # of its default 3 attempts in ~2 s.
        **settings.OBJECT_STORE_RETRIES,
    }


def ensure_s3_bucket(bucket: str, endpoint_url: str = "", wait: float = 180) -> bool:
    """Create `bucket` unless it exists; True when it was created. Waits up to `wait`
    seconds for the endpoint to answer.

    The bundled object store starts empty; a user's own bucket usually exists already
    (then nothing is done, and no create permission is needed).
    """
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    client = boto3.client("s3", endpoint_url=endpoint_url or None)
    deadline = time.monotonic() + wait
    while True:
        try:
            client.head_bucket(Bucket=bucket)
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            break
        except EndpointConnectionError:
            # The bundled object server may still be starting (the setup hook runs beside it).
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    client.create_bucket(Bucket=bucket)
    return True


def save_s3_block(block: str, bucket: str, folder: str = "", endpoint_url: str = "") -> str:
    """Save the `s3-bucket` block that `FANOUT_STORAGE=s3-bucket/<block>` names; returns the slug.

    Needs `prefect-aws` and PREFECT_API_URL. No keys are stored in Prefect's database:
    boto3 reads them from the environment of each process.
    """
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    params = AwsClientParameters(endpoint_url=endpoint_url or None, config=settings.OBJECT_STORE_TIMEOUTS)
    S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=AwsCredentials(aws_client_parameters=params)).save(
        block, overwrite=True
    )
    return f"s3-bucket/{block}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fanout.storage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s3 = sub.add_parser("s3", help="save an s3-bucket block (and create the bucket if asked)")
    s3.add_argument("--block", required=True, help="block name: FANOUT_STORAGE=s3-bucket/<block>")
    s3.add_argument("--bucket", required=True)
    s3.add_argument("--folder", default="", help="folder inside the bucket")
    s3.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (empty: AWS)")
    s3.add_argument("--create-bucket", action="store_true", help="create the bucket when it does not exist")
    args = parser.parse_args(argv)
    if args.create_bucket and ensure_s3_bucket(args.bucket, args.endpoint_url):
        print(f"storage: created bucket {args.bucket}", flush=True)
    slug = save_s3_block(args.block, args.bucket, args.folder, args.endpoint_url)
    print(f"storage: saved block {slug} (bucket {args.bucket}, folder {args.folder or '-'})", flush=True)


if __name__ == "__main__":
    main()
