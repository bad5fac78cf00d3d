"""A whole stack on one machine: database, Prefect server and task-worker processes.

Used by `make run` (the demo) and by the integration tests, so both exercise the same
processes that run in pods later: `prefect server start` and `python -m fanout.worker`,
talking over loopback. Everything it starts runs in its own process group and is
stopped on exit, including after errors.

Each process gets its own PREFECT_HOME, like separate pods; they share only the
directory named by FANOUT_STORAGE.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fanout import metrics, settings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `check()` until true; fail with `what` (and the process's exit) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return 200 <= r.status < 300


def postgres_bin() -> Path | None:
    """Directory holding initdb and postgres, if PostgreSQL is installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    return None


@dataclass
class Proc:
    """A process of the stack, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def client_id(self) -> str:
        """The id Prefect and our results use for this process: `<hostname>-<pid>`."""
        return f"{socket.gethostname()}-{self.popen.pid}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class LocalStack:
    """Database + Prefect server + task workers under `root`; a context manager."""

    def __init__(
        self,
        root: Path,
        database: str = "auto",
        ui: bool = True,
        pools: Mapping[str, str] | None = None,
        pool_env: Mapping[str, Mapping[str, str]] | None = None,
        storage: str = "",
        env: Mapping[str, str] | None = None,
        replicas: int = 1,
        ha: bool | None = None,
    ) -> None:
        """`pools` maps a pool name to the `--tasks` its workers serve (`start_worker(pool)`),
        `pool_env` to extra environment for them. `storage` is every process's
        FANOUT_STORAGE (default: `<root>/storage`; a block slug such as `s3-bucket/x` once
        that block is saved), `env` more environment for every process (e.g. S3 keys).

        `ha` (default: `replicas` > 1) starts Prefect's HA layout: `replicas` API
        processes (`--no-services`) and one services process on PostgreSQL and Redis,
        migrations run once before them; `api_url` is the first replica's and the workers
        subscribe to all of them (FANOUT_API_REPLICAS)."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.ha = replicas > 1 if ha is None else ha
        if self.ha and database == "sqlite":
            raise ValueError("the HA layout (replicas > 1) needs PostgreSQL (database='auto' or 'postgres')")
        if database not in ("auto", "postgres", "sqlite"):
            raise ValueError(f"database must be auto, postgres or sqlite, got {database!r}")
        self.pools = dict(pools or {})
        self.pool_env = {k: dict(v) for k, v in (pool_env or {}).items()}
        self.root = root.resolve()
        self.database = database
        self.ui = ui
        self.procs: list[Proc] = []
        self.api_url = ""
        self.storage = storage or str(self.root / "storage")
        self.extra_env = dict(env or {})
        self.db_url = ""
        self.replicas = replicas
        self.redis_url = ""
        self.api_urls: list[str] = []
        self._cleanup: list[Path] = []

    # -- environment ---------------------------------------------------------------
    def env(self, name: str, **extra: str) -> dict[str, str]:
        """Environment for a process of the stack called `name`."""
        home = self.root / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "FANOUT_STORAGE": self.storage,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
            # Our plugin (fanout.plugin): Prefect's default storage on FANOUT_STORAGE and
            # the client fixes, in every process, as the image does.
            "PREFECT_PLUGINS_ENABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        if self.api_url:
            env["PREFECT_API_URL"] = self.api_url
        if self.api_urls:
            env["FANOUT_API_REPLICAS"] = ",".join(self.api_urls)
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str], port: int = 0, user: str | None = None) -> Proc:
        """Start `argv` in its own process group with output to `<root>/logs/<name>.log`."""
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        out: IO[bytes] = log.open("ab")
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        popen = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.root,
        )
        out.close()
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    # -- database ------------------------------------------------------------------
    def _start_postgres(self, bindir: Path) -> None:
        """A throwaway PostgreSQL on loopback (as user `postgres` when we are root:
        PostgreSQL refuses to run as root)."""
        data = self.root / "pgdata"
        user = None
        if os.geteuid() == 0:
            # The postgres user must reach its data directory: keep it out of private
            # (0700) temp trees such as pytest's, and remove it on close.
            user = "postgres"
            pw = pwd.getpwnam(user)
            data = Path(tempfile.mkdtemp(prefix="fanout-pg-"))
            os.chown(data, pw.pw_uid, pw.pw_gid)
            self._cleanup.append(data)
        else:
            data.mkdir(mode=0o700)
        init = [str(bindir / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8", "--no-sync"]
        if user:
            init = ["runuser", "-u", user, "--", *init]
        subprocess.run(init, check=True, capture_output=True, cwd=self.root)
        port = free_port()
        argv = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(data),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]
        proc = self.spawn("postgres", argv, dict(os.environ), port, user=user)
        wait_until(
            lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None
            and "ready to accept connections" in proc.output(),
            30,
            "postgres",
            proc.popen,
        )
        self.db_url = f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"

    def _database_url(self) -> str:
        bindir = postgres_bin()
        if self.database == "postgres" and bindir is None:
            raise RuntimeError("database=postgres but PostgreSQL (initdb, postgres) is not installed")
        if self.database != "sqlite" and bindir is not None:
            self._start_postgres(bindir)
            return self.db_url
        self.db_url = f"sqlite+aiosqlite:///{self.root / 'prefect.db'}"
        return self.db_url

    def _start_redis(self) -> None:
        """A throwaway Redis on loopback, for the HA layout's events, ordering and leases."""
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError("the HA layout (replicas > 1) needs redis-server (apt-get install redis-server)")
        port = free_port()
        argv = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = self.spawn("redis", argv, dict(os.environ), port)
        wait_until(lambda: "Ready to accept connections" in proc.output(), 30, "redis", proc.popen)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    # -- server and workers ----------------------------------------------------------
    def server_env(self, name: str) -> dict[str, str]:
        """Environment of a Prefect server process (API replica, services, migrations)."""
        env = self.env(
            name,
            **{key: os.environ.get(key, value) for key, value in settings.SERVER_SETTINGS.items()},
            PREFECT_API_DATABASE_CONNECTION_URL=self.db_url,
            PREFECT_SERVER_LOGGING_LEVEL="WARNING",
            PREFECT_UI_ENABLED="true" if self.ui else "false",
        )
        if self.redis_url:
            env.update(settings.ha_server_settings(self.redis_url))
            env["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"  # the migration step did it
        env.pop("PREFECT_API_URL", None)
        env.pop("FANOUT_API_REPLICAS", None)
        return env

    def start_server(self, timeout: float = 90, port: int | None = None) -> Proc:
        """The Prefect server, on its database (created the first time), on `port` (the
        one a stopped server had, so clients find it again) or else any free one. With
        the HA layout: Redis, the migrations, the services process and every API replica
        (the first one is returned)."""
        if not self.db_url:
            self._database_url()
        if not self.ha:
            return self._spawn_server("server", port or free_port(), timeout)
        if not self.db_url.startswith("postgresql"):
            raise RuntimeError("the HA layout (replicas > 1) needs PostgreSQL, which is not installed")
        self._start_redis()
        subprocess.run(
            [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
            env=self.server_env("migrations"), check=True, capture_output=True, timeout=300, cwd=self.root,
        )  # fmt: skip
        argv = [sys.executable, "-m", "prefect", "server", "services", "start"]
        self.spawn("services", argv, self.server_env("services"))
        first = self._spawn_server("server-0", free_port(), timeout, no_services=True)
        for i in range(1, self.replicas):
            self._spawn_server(f"server-{i}", free_port(), timeout, no_services=True)
        self.api_url = self.api_urls[0]
        return first

    def stop_server(self, name: str = "server", kill: bool = False) -> int:
        """Stop a Prefect server process (`server`, or the replica `server-<i>`), as a pod
        deletion would (`kill`: as a forced one, SIGKILL); returns its port, for
        `start_server(port=...)` or `start_replica`. Its database stays."""
        old = next(p for p in self.procs if p.name == name)
        if kill:
            old.signal(signal.SIGKILL)
            old.popen.wait()
        else:
            old.stop()
        self.procs.remove(old)
        return old.port

    def start_replica(self, name: str, port: int, timeout: float = 90) -> Proc:
        """Start the API replica `name` again on `port`, as its pod's restart would."""
        return self._spawn_server(name, port, timeout, no_services=True)

    def _spawn_server(self, name: str, port: int, timeout: float, no_services: bool = False) -> Proc:
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        if no_services:
            argv.append("--no-services")
        proc = self.spawn(name, argv, self.server_env(name), port)
        url = f"http://127.0.0.1:{port}/api"
        wait_until(lambda: http_ok(f"{url}/health"), timeout, f"prefect server {name}", proc.popen)
        if name == "server":
            self.api_url = url
        elif url not in self.api_urls:
            self.api_urls.append(url)
        return proc

    def start_worker(
        self,
        pool: str,
        limit: int = 10,
        name: str | None = None,
        wait: bool = True,
        timeout: float = 60,
        cpus: int | None = None,
        tasks: str = "",
        env: dict[str, str] | None = None,
    ) -> Proc:
        """A `python -m fanout.worker` process; waits until it is subscribed (healthz 200).

        `cpus` pins it (and the process pools it starts) to that many CPUs, the local
        stand-in for a pod's CPU limit. `tasks` (`module:task,...`) serves those tasks
        instead of the pool's own; `env` adds to its environment (e.g. PYTHONPATH).
        """
        name = name or f"worker-{pool}-{sum(p.name.startswith(f'worker-{pool}') for p in self.procs)}"
        tasks = tasks or self.pools.get(pool, "")
        if not tasks:
            raise ValueError(f"pool {pool!r} names no tasks: pass tasks= or LocalStack(pools=...)")
        env = {**self.pool_env.get(pool, {}), **(env or {})}
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "fanout.worker",
            "--pool",
            pool,
            "--limit",
            str(limit),
            "--health-host",
            "127.0.0.1",
            "--health-port",
            str(port),
            "--tasks",
            tasks,
        ]
        if cpus is not None:
            mine = sorted(os.sched_getaffinity(0))
            if not 1 <= cpus <= len(mine):
                raise ValueError(f"cpus must be between 1 and {len(mine)}, got {cpus}")
            argv = ["taskset", "-c", ",".join(map(str, mine[:cpus])), *argv]
        proc = self.spawn(name, argv, self.env(name, **(env or {})), port)
        if wait:
            self.wait_healthy(proc, timeout)
        return proc

    def wait_healthy(self, worker: Proc, timeout: float = 90) -> None:
        """Until the worker's /healthz says it is subscribed to the server."""
        wait_until(lambda: http_ok(f"http://127.0.0.1:{worker.port}/healthz"), timeout, worker.name, worker.popen)

    def start_reaper(
        self,
        interval: float = 2.0,
        stale_after: float = 8.0,
        max_deliveries: int = 3,
        fail_unserved_after: float = 600,
        backlog_scan: int = settings.BACKLOG_SCAN,
        storage_ttl: float = settings.STORAGE_TTL,
        storage_sweep_every: float = settings.STORAGE_SWEEP_INTERVAL,
    ) -> Proc:
        """The reaper (`python -m fanout.reaper`), with short timings for a local demo/test."""
        port = free_port()
        argv = [sys.executable, "-m", "fanout.reaper", "--interval", str(interval), "--stale-after",
                str(stale_after), "--max-deliveries", str(max_deliveries),
                "--fail-unserved-after", str(fail_unserved_after), "--metrics-port", str(port),
                "--backlog-scan", str(backlog_scan), "--storage-ttl", str(storage_ttl),
                "--storage-sweep-every", str(storage_sweep_every)]  # fmt: skip
        return self.spawn("reaper", argv, self.env("reaper"), port)

    def restart_server(self, timeout: float = 90) -> Proc:
        """Stop the Prefect server and start it again on the same port and database, as a
        pod restart would: whatever it held only in memory (its task-run queue) is gone."""
        return self.start_server(timeout, port=self.stop_server())

    def run_module(
        self, module: str, args: list[str], timeout: float = 900, capture: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -m MODULE ARGS` as a separate submitter process, as a flow-run pod
        would; `capture=False` shows its output live."""
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            env=self.env("submitter", **env),
            capture_output=capture,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith("worker-")]

    def pool_report(self, since: float | None = None, timeout: float = 30) -> str:
        """The pools' figures from the reaper's and the live workers' /metrics (as the
        dashboard shows them), from a reaper sweep made after `since` (default: now);
        empty without a reaper."""
        since = time.time() if since is None else since

        def scrape(proc: Proc) -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/metrics", timeout=10) as r:
                    return r.read().decode()
            except OSError:
                return ""

        reaper = [p for p in self.procs if p.name == "reaper" and p.alive()]
        if not reaper:
            return ""
        swept = re.compile(r"^fanout_last_sweep_timestamp_seconds ([0-9.e+]+)$", re.M)

        seen: list[str] = []

        def fresh() -> bool:
            m = swept.search(text := scrape(reaper[0]))
            seen.append(text)
            return bool(m and float(m.group(1)) >= since)

        wait_until(fresh, timeout, "a reaper sweep", reaper[0].popen)
        return metrics.pool_report(seen[-1], [scrape(w) for w in self.workers() if w.alive()])

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> LocalStack:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.start_server()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything, workers first and the database last."""
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self._cleanup.clear()
