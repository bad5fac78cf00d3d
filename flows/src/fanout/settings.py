"""Every tunable of the stack with its default, in one place.

The code reads these (each can be overridden by the environment variable named beside
it, for pods), the chart's defaults are checked against them by the chart tests, and the
local stack starts its server with `SERVER_SETTINGS`, so nothing is kept in step by hand.
"""

from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


# -- task workers (`python -m fanout.worker`) -------------------------------------------
WORKER_LIMIT = 10  # task runs at once per worker (FANOUT_WORKER_LIMIT)
HEARTBEAT_SECONDS = 5.0  # between worker heartbeats (FANOUT_HEARTBEAT_SECONDS)
LOOP_STALL_SECONDS = 60.0  # /livez fails once the worker's event loop has not turned this long
# A run offered while every slot is busy waits un-acked this long for a slot; then the
# worker hands it back (another worker with a free slot takes it at once) and subscribes
# again once a slot frees. Prefect's protocol offers the next run as soon as one is acked.
HOLD_OFFER_SECONDS = 0.25

# -- the reaper (`python -m fanout.reaper`) ---------------------------------------------
REAPER_INTERVAL = 10.0  # seconds between sweeps
STALE_AFTER = 30.0  # heartbeat age after which a worker counts as dead (>= 3 heartbeats)
MAX_DELIVERIES = 3  # deliveries before a run is failed as poison
FAIL_UNSERVED_AFTER = 600.0  # seconds before a run no live worker serves is failed (0: never)
BACKLOG_SCAN = 500  # runs read per state and sweep, oldest first; past it counts are extrapolated
STORAGE_TTL = 21600.0  # seconds: stored parameters and results older than this are deleted (0: never)
STORAGE_SWEEP_INTERVAL = 600.0  # seconds between those deletions (they list the whole storage)

# -- waiting (every process, through our Prefect plugin) ---------------------------------
WAIT_POLL_SECONDS = 2.0  # futures also poll their runs' states this often (FANOUT_WAIT_POLL_SECONDS)

# -- the fan-out API (`fanout.fan_out`) ---------------------------------------------------
UNSERVED_PATIENCE = 60.0  # seconds before a fan-out whose task no live worker serves is told so
MAX_AUTO_TASK_RUNS = 100  # automatic chunking: at most this many task runs per fan-out...
RUNS_PER_SLOT = 1  # ...and about this many per live worker slot (see fanout.api.auto_chunk_size)
# A fan-out of at most this many task runs takes its runs' outcomes from their terminal
# events as they happen (fanout.api); a larger one is bound by the server's cost per run,
# and listening to every run's event cost the server ~4 ms more per run (1,000 unchunked).
EVENTS_MAX_RUNS = 100
# Such a fan-out then waits, at most this long, until the API shows those runs final too
# (the Prefect UI reads it; the server's recorder writes states in batches): what it
# returns and what the UI shows agree. Past it, it returns and logs which runs lag.
SETTLE_SECONDS = 10.0
STREAM_CHUNK_SIZE = 100  # items per task run when the number of items is not known up front
ITER_MAX_IN_FLIGHT = 1000  # fan_out_iter: task runs submitted and not yet finished, at most
PARAMETERS_RETRY_AFTER = 5.0  # seconds before a worker reads a run's unreadable parameters once more
RESULT_PATIENCE = 180.0  # seconds a Completed run's result may stay unreadable (being written; storage away)
MAX_PARAMETER_BYTES = 1 << 20  # one task run's parameters, at most (FANOUT_MAX_PARAMETER_BYTES)

# -- object storage (FANOUT_STORAGE=s3-bucket/<block>; fanout.storage) --------------------
# botocore's retry settings (its documented environment variables, set in every process):
# standard mode retries connection errors and throttling with capped exponential backoff
# and jitter, riding out ~30 s of an object store away instead of 3 attempts in ~2 s.
OBJECT_STORE_RETRIES = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
# botocore's timeouts, in the saved block (botocore reads them from no environment
# variable). Its defaults are 60 s each: a pooled connection to an object server whose pod
# went away (its address gone, so no reset comes back) held a result's write for a minute
# per attempt, long enough for the reader to give up. Seconds without a byte, not the
# length of a transfer.
OBJECT_STORE_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 20}

# -- the Prefect server (the chart's `server.settings` defaults; a chart test keeps them
# equal): task-run states and events written to the database in batches, and a
# connection pool big enough that the server does not open a PostgreSQL connection per
# request under load (Prefect's 5 + 10 overflow did: backends lived ~1-7 s).
SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20",
    # The server's in-memory queue of `.delay()` runs per task (Prefect: 1,000). When it
    # is full, creating a run waits inside its database transaction: with no free worker,
    # a plain `.delay()` loop of more runs than that held every pooled connection and the
    # whole API stalled (measured: 5,000 runs, no worker). ~10 KB of server memory each.
    "PREFECT_SERVER_TASKS_SCHEDULING_MAX_SCHEDULED_QUEUE_SIZE": "20000",
    # Prefect's own database vacuum: besides old events (its default), flow runs that ended
    # more than 14 days ago, with their task runs (a fan-out's runs belong to its parent
    # flow run), states, logs and artifacts. Prefect keeps them 90 days and deletes none.
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(14 * 24 * 3600),
}


# -- several API replicas (the chart's `server.replicas` > 1; Prefect's documented HA
# layout): the replicas and the services process share PostgreSQL and, for events,
# ordering, leases and periodic services, Redis through `prefect-redis`. `{redis}` is the
# Redis URL.
HA_SERVER_SETTINGS = {
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
    "PREFECT_REDIS_MESSAGING_URL": "{redis}",
    "PREFECT_SERVER_DOCKET_URL": "{redis}",
    # prefect-redis publishes events in batches of 5 or every 10 s: a run's last events
    # then reached the recorder and the waiting callers up to 10 s late (a 50-item fan-out
    # took 10-16 s instead of ~1 s). One XADD per event costs Redis next to nothing.
    "PREFECT_REDIS_MESSAGING_PUBLISHER_BATCH_SIZE": "1",
}
# Workers subscribe to every API replica: each replica keeps the `.delay()` runs created
# through it in its own memory and offers them only to workers connected to it.
# FANOUT_API_REPLICAS names them: a comma-separated list of API URLs, or a host name
# (a headless Service) whose addresses are the replicas, each reached with
# PREFECT_API_URL's scheme, port and path. Looked up again this often:
REPLICAS_REFRESH_SECONDS = 5.0


def ha_server_settings(redis_url: str) -> dict[str, str]:
    """HA_SERVER_SETTINGS for the Redis at `redis_url`."""
    return {k: v.format(redis=redis_url) for k, v in HA_SERVER_SETTINGS.items()}


def worker_limit() -> int:
    return int(_env_float("FANOUT_WORKER_LIMIT", WORKER_LIMIT))


def heartbeat_seconds() -> float:
    return _env_float("FANOUT_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)


def wait_poll_seconds() -> float:
    return max(0.2, _env_float("FANOUT_WAIT_POLL_SECONDS", WAIT_POLL_SECONDS))


def max_parameter_bytes() -> int:
    return int(_env_float("FANOUT_MAX_PARAMETER_BYTES", MAX_PARAMETER_BYTES))
