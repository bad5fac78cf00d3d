"""Which Prefect API replicas a task worker subscribes to.

Prefect keeps the `.delay()` runs created through an API process in that process's
memory and offers them only to the task workers subscribed to that same process
(prefect#21218, open). With several API replicas behind one Service, a worker
subscribed through the Service reaches one replica, and the runs created through the
others would wait for good. So a worker subscribes to every replica, each on its own
websocket; the runs of a replica that dies (its memory gone) are the reaper's lost runs,
requeued through a live one.

FANOUT_API_REPLICAS names the replicas: empty (one server: PREFECT_API_URL), a
comma-separated list of API URLs, or a host name, typically a headless Service, whose
addresses are the replicas, each reached with PREFECT_API_URL's scheme, port and path.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit, urlunsplit

ENV = "FANOUT_API_REPLICAS"


def replica_spec() -> str:
    """This process's FANOUT_API_REPLICAS ("" for one server)."""
    return os.environ.get(ENV, "").strip()


def replica_urls(spec: str, api_url: str) -> list[str]:
    """The API URLs to subscribe to, sorted; `api_url` alone when `spec` is empty.

    A host name is looked up now (raises OSError when the lookup fails, so that the
    caller keeps the replicas it knows); a host with no address gives []."""
    spec = spec.strip()
    if not spec:
        return [api_url.rstrip("/")]
    if "://" in spec:
        return sorted({u.strip().rstrip("/") for u in spec.split(",") if u.strip()})
    if "," in spec or "/" in spec:
        raise ValueError(f"{ENV} must be API URLs (with their scheme) or one host name, got {spec!r}")
    parts = urlsplit(api_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = {info[4][0] for info in socket.getaddrinfo(spec, port, type=socket.SOCK_STREAM)}
    return sorted(
        urlunsplit((parts.scheme, f"[{a}]:{port}" if ":" in a else f"{a}:{port}", parts.path.rstrip("/"), "", ""))
        for a in addresses
    )
