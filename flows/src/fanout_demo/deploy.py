"""Register the CPU-heavy subflow `crunch` as a deployment on a Kubernetes work pool.

The chart registers it as the default entry of its `deployments` values (through
`fanout.deployments`, like any user's flow); this is the same for a stack you run
yourself. A parent flow can then run `crunch` in a pod of any size by passing per-run
`job_variables`, e.g. `{"cpu_request": "2", "cpu_limit": "2", "memory_request": "1Gi"}`:
the pod's CPU quota is what `crunch` sizes its process pool from.

The code is baked into the image, so the deployment points at a module path
(`fanout_demo.tasks.crunch`) instead of pulling source at run time.
"""

from __future__ import annotations

import argparse
from uuid import UUID

from fanout.deployments import DeploymentSpec
from fanout.deployments import register as register_deployment

DEPLOYMENT = "crunch"
ENTRYPOINT = "fanout_demo.tasks:crunch"


def register(work_pool: str, image: str | None, job_variables: dict[str, str] | None = None) -> UUID:
    """Create or update `crunch/crunch` on `work_pool`; returns the deployment id."""
    spec = DeploymentSpec(
        name=DEPLOYMENT,
        entrypoint=ENTRYPOINT,
        image=image,
        description="CPU-heavy batch on a process pool sized to the pod's CPU quota",
    )
    return register_deployment(spec, work_pool, job_variables)[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fanout_demo.deploy", description=__doc__.split("\n")[0])
    p.add_argument("--work-pool", required=True, help="Kubernetes work pool name")
    p.add_argument("--image", default=None, help="image of flow-run pods (default: the pool's)")
    p.add_argument("--image-pull-policy", default=None, help="e.g. IfNotPresent for locally loaded images")
    args = p.parse_args(argv)
    extra = {"image_pull_policy": args.image_pull_policy} if args.image_pull_policy else None
    deployment_id = register(args.work_pool, args.image, extra)
    print(f"deployment crunch/{DEPLOYMENT} ({deployment_id}) on work pool {args.work_pool!r}")


if __name__ == "__main__":
    main()
