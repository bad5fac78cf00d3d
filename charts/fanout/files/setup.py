"""Setup hook of the fanout chart (post-install, post-upgrade), run in the runtime image.

1. Wait for the Prefect server's /api/health.
2. Create or update the Kubernetes work pool with a base job template: Prefect's default
   template for the installed prefect-kubernetes, plus what flow-run pods of this release
   need (security contexts, /tmp emptyDir, the shared volume and FANOUT_STORAGE, node
   selector and tolerations as job variables) and the chart's defaults for the job
   variables (image, namespace, cpu/memory requests and limits, ...).
3. storage.type s3: save the `s3-bucket` block that FANOUT_STORAGE names
   (`python -m fanout.storage s3`), creating the bucket of the bundled object store.
4. Register the chart's `deployments` on the pool (`python -m fanout.deployments`): each
   entry's image defaults to the chart's, its job variables must be the pool's. Those it
   registered before and the values no longer list are deleted (`--prune`).

Everything it needs comes from one JSON file rendered by Helm (FANOUT_SETUP_CONFIG).
Idempotent: every step overwrites what a previous run created.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def log(message: str) -> None:
    print(f"setup: {message}", flush=True)


def wait_for_server(api_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    log(f"server {api_url} is healthy")
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(3)
    sys.exit(
        f"setup: the Prefect server at {api_url} was not healthy within {timeout:.0f}s ({last})"
    )


def base_job_template(cfg: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The default template with this release's pod settings and variable defaults."""
    template = copy.deepcopy(default)
    job_spec = template["job_configuration"]["job_manifest"]["spec"]
    pod = job_spec["template"]["spec"]
    container = pod["containers"][0]
    # prefect-kubernetes' default puts these Job fields into the pod spec, where the API
    # server silently drops them (and strict validation rejects them): move them.
    for key in ("completions", "parallelism"):
        if key in pod:
            job_spec[key] = pod.pop(key)
    pod["securityContext"] = cfg["podSecurityContext"]
    pod["automountServiceAccountToken"] = False
    pod["enableServiceLinks"] = False
    pod["volumes"] = cfg["volumes"]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    if cfg.get("imagePullSecrets"):
        pod["imagePullSecrets"] = cfg["imagePullSecrets"]
    container["securityContext"] = cfg["containerSecurityContext"]
    container["volumeMounts"] = cfg["volumeMounts"]
    # A fixed list: prefect-kubernetes prepends its own variables (PREFECT_API_URL, the flow
    # run id, the `env` job variable) to a list it finds here.
    container["env"] = cfg["env"]

    props = template["variables"]["properties"]
    props["node_selector"] = {
        "title": "Node Selector",
        "description": "Node labels a flow-run pod must match (e.g. a pool of large nodes).",
        "type": "object",
        "additionalProperties": {"type": "string"},
    }
    props["tolerations"] = {
        "title": "Tolerations",
        "description": "Taints a flow-run pod tolerates, in Kubernetes' format.",
        "type": "array",
        "items": {"type": "object"},
    }
    for key, value in cfg["jobVariables"].items():
        if key not in props:
            sys.exit(
                f"setup: job variable {key!r} is not in the work pool's template; known: {sorted(props)}"
            )
        props[key]["default"] = value
    return template


def deployment_entries(
    cfg: dict[str, Any], template: dict[str, Any]
) -> list[dict[str, Any]]:
    """The chart's `deployments`, each with the chart's image unless it names its own; a job
    variable the work pool does not know is named here (the schema checks it at install)."""
    known = template["variables"]["properties"]
    entries = []
    for i, entry in enumerate(cfg.get("deployments") or []):
        unknown = sorted(set(entry.get("jobVariables") or {}) - set(known))
        if unknown:
            sys.exit(
                f"setup: deployments[{i}] ({entry.get('name')}): job variable(s) {', '.join(unknown)} "
                f"not in the work pool's template; known: {', '.join(sorted(known))}"
            )
        entries.append({**entry, "image": entry.get("image") or cfg["image"]})
    return entries


def run(*cmd: str) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def main() -> None:
    with open(os.environ.get("FANOUT_SETUP_CONFIG", "/etc/fanout/setup.json")) as f:
        cfg = json.load(f)
    wait_for_server(cfg["apiUrl"], float(cfg.get("serverTimeout", 300)))

    from prefect_kubernetes.worker import KubernetesWorker

    template = base_job_template(cfg, KubernetesWorker.get_default_base_job_template())
    path = "/tmp/base-job-template.json"
    with open(path, "w") as f:
        json.dump(template, f, indent=2)
    run(
        "prefect",
        "work-pool",
        "create",
        cfg["workPool"],
        "--type",
        "kubernetes",
        "--base-job-template",
        path,
        "--overwrite",
    )

    if s3 := cfg.get("s3"):
        # The bundled object store starts with no bucket; a user's own bucket exists.
        create = ["--create-bucket"] if s3.get("createBucket") else []
        run(
            sys.executable, "-m", "fanout.storage", "s3", "--block", s3["blockName"], "--bucket", s3["bucket"],
            "--folder", s3.get("folder") or "", "--endpoint-url", s3.get("endpointUrl") or "", *create,
        )  # fmt: skip

    # Also with an empty list: deployments an earlier release registered and the values no
    # longer list are deleted (--prune; only those this hook registered).
    deployments = deployment_entries(cfg, template)
    if not deployments:
        log("no deployments to register (deployments: [])")
    path = "/tmp/deployments.json"
    with open(path, "w") as f:
        json.dump(deployments, f, indent=2)
    run(
        sys.executable,
        "-m",
        "fanout.deployments",
        "--work-pool",
        cfg["workPool"],
        "--config",
        path,
        "--image-pull-policy",
        cfg["imagePullPolicy"],
        "--prune",
    )
    log("done")


if __name__ == "__main__":
    main()
