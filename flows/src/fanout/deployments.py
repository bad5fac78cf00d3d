"""Register flows baked into an image as deployments on a work pool.

What the chart's `deployments` values become (its setup hook runs
`python -m fanout.deployments --work-pool kubernetes --config deployments.json`), and what
`fanout_demo.deploy` uses for the demo's `crunch`. Each entry names:

- `name`: the deployment's name (run it as `<flow name>/<name>`);
- `entrypoint`: the flow, as `package.module:flow` (imported from the image's Python
  path) or `/absolute/path/script.py:flow` (a script in the image; its flow runs start
  in the script's directory);
- `jobVariables`: defaults of its flow-run pods (the work pool's job variables, e.g.
  `cpu_limit`, `memory_limit`, `node_selector`), which a run may still override;
- optional `image` (the flow-run pods' image; default: the pool's), `description`, and
  `flowName`: register without importing the code (for a flow that exists only in that
  `image`); otherwise the flow is imported here, for its name, description and the
  parameter schema that the API checks runs against.

The code is in the image, so nothing is uploaded or pulled at run time. Registering is
idempotent: a deployment of the same flow and name is updated in place. Every deployment
registered here carries the tag `fanout.io/managed`; with `--prune`, those of the work
pool that the config no longer lists are deleted (an entry removed from the chart's values
goes away on the next upgrade; deployments made by other means are never touched).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import posixpath
import re
import sys
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

MODULE_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
SCRIPT_REF = re.compile(r"^/[^:]*\.py:[A-Za-z_][A-Za-z0-9_]*$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KEYS = {"name", "entrypoint", "jobVariables", "image", "description", "flowName"}
MANAGED_TAG = "fanout.io/managed"


class DeploymentError(ValueError):
    """A deployment entry that cannot be registered; the message names the entry."""


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str
    job_variables: dict[str, Any] = field(default_factory=dict)
    image: str | None = None
    description: str | None = None
    flow_name: str | None = None

    @classmethod
    def from_values(cls, entry: dict[str, Any], where: str = "deployment") -> DeploymentSpec:
        """From one entry of the chart's `deployments` list (camelCase keys), checked."""
        if not isinstance(entry, dict):
            raise DeploymentError(f"{where}: expected a mapping, got {entry!r}")
        unknown = sorted(set(entry) - KEYS)
        if unknown:
            raise DeploymentError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
        for key in ("name", "entrypoint"):
            if not entry.get(key):
                raise DeploymentError(f"{where}: {key} is required")
        spec = cls(
            name=entry["name"],
            entrypoint=entry["entrypoint"],
            job_variables=dict(entry.get("jobVariables") or {}),
            image=entry.get("image") or None,
            description=entry.get("description") or None,
            flow_name=entry.get("flowName") or None,
        )
        spec.check(where)
        return spec

    def check(self, where: str = "deployment") -> None:
        if not NAME.match(self.name):
            raise DeploymentError(f"{where}: name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if not (MODULE_REF.match(self.entrypoint) or SCRIPT_REF.match(self.entrypoint)):
            raise DeploymentError(
                f"{where} ({self.name}): entrypoint {self.entrypoint!r} must be package.module:flow "
                "or /absolute/path/script.py:flow"
            )

    @property
    def stored_entrypoint(self) -> str:
        """The deployment's entrypoint as Prefect stores it: a module path (`pkg.mod.flow`,
        imported from the image, no code download) or the script path as given."""
        if MODULE_REF.match(self.entrypoint):
            return self.entrypoint.replace(":", ".")
        return self.entrypoint

    @property
    def pull_steps(self) -> list[dict[str, Any]] | None:
        """For a script: start its flow runs in the script's directory (and nothing to
        download: without a pull step Prefect would copy the working directory)."""
        if SCRIPT_REF.match(self.entrypoint):
            directory = posixpath.dirname(self.entrypoint.rsplit(":", 1)[0]) or "/"
            return [{"prefect.deployments.steps.set_working_directory": {"directory": directory}}]
        return None


async def aregister(spec: DeploymentSpec, work_pool: str, defaults: dict[str, Any] | None = None) -> tuple[str, UUID]:
    """Create or update the deployment; returns (`<flow name>/<name>`, its id).

    Job variables: `defaults` (e.g. the image pull policy), then the spec's `image`, then
    its `job_variables`.
    """
    from prefect.client.orchestration import get_client

    variables = dict(defaults or {})
    if spec.image:
        variables["image"] = spec.image
    variables.update(spec.job_variables)

    schema: dict[str, Any] | None = None
    description = spec.description
    flow_name = spec.flow_name
    if flow_name is None:
        from prefect.flows import load_flow_from_entrypoint
        from prefect.utilities.callables import parameter_schema

        try:
            flow = load_flow_from_entrypoint(spec.entrypoint, use_placeholder_flow=False)
        except Exception as exc:  # named with the entry, then raised
            raise DeploymentError(
                f"deployment {spec.name}: cannot load the flow {spec.entrypoint!r} here "
                f"({type(exc).__name__}: {exc}); it must be importable in this image, or set flowName "
                "to register it without importing (code only in the deployment's own image)"
            ) from exc
        flow_name = flow.name
        schema = parameter_schema(flow).model_dump(exclude_unset=True)
        description = description or flow.description

    async with get_client() as client:
        flow_id = await client.create_flow_from_name(flow_name)
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=spec.name,
            work_pool_name=work_pool,
            entrypoint=spec.stored_entrypoint,
            pull_steps=spec.pull_steps,
            job_variables=variables,
            description=description,
            parameter_openapi_schema=schema,
            enforce_parameter_schema=schema is not None,
            tags=[MANAGED_TAG],
        )
    return f"{flow_name}/{spec.name}", deployment_id


def register(spec: DeploymentSpec, work_pool: str, defaults: dict[str, Any] | None = None) -> tuple[str, UUID]:
    """Sync `aregister`."""
    return asyncio.run(aregister(spec, work_pool, defaults))


async def aprune(work_pool: str, keep: set[UUID]) -> list[str]:
    """Delete the work pool's deployments tagged `fanout.io/managed` whose id is not in
    `keep`; returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterTags,
        WorkPoolFilter,
        WorkPoolFilterName,
    )

    gone = []
    async with get_client() as client:
        found = await client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[MANAGED_TAG])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool])),
        )
        for d in found:
            if d.id not in keep:
                await client.delete_deployment(d.id)
                gone.append(d.name)
    return gone


def load_specs(entries: list[dict[str, Any]]) -> list[DeploymentSpec]:
    """Every entry checked (all problems at once), names unique."""
    specs, problems = [], []
    for i, entry in enumerate(entries):
        try:
            specs.append(DeploymentSpec.from_values(entry, where=f"deployments[{i}]"))
        except DeploymentError as exc:
            problems.append(str(exc))
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    problems += [f"deployments: name {n!r} is used more than once" for n in twice]
    if problems:
        raise DeploymentError("; ".join(problems))
    return specs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fanout.deployments", description=__doc__.split("\n")[0])
    p.add_argument("--work-pool", required=True, help="work pool the deployments run on")
    p.add_argument("--config", required=True, help="JSON file: a list of entries like the chart's `deployments`")
    p.add_argument("--image-pull-policy", default=None, help="job variable image_pull_policy of every deployment")
    p.add_argument(
        "--prune",
        action="store_true",
        help="delete the work pool's deployments registered here before (tag fanout.io/managed) that the config "
        "no longer lists",
    )
    args = p.parse_args(argv)
    with open(args.config) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        sys.exit(f"{args.config}: expected a JSON list of deployments, got {type(entries).__name__}")
    try:
        specs = load_specs(entries)
    except DeploymentError as exc:
        sys.exit(f"fanout.deployments: {exc}")
    defaults = {"image_pull_policy": args.image_pull_policy} if args.image_pull_policy else {}
    kept = set()
    for spec in specs:
        try:
            full_name, deployment_id = register(spec, args.work_pool, defaults)
        except DeploymentError as exc:
            sys.exit(f"fanout.deployments: {exc}")
        kept.add(deployment_id)
        print(f"deployment {full_name} ({deployment_id}) on work pool {args.work_pool!r}: {spec.entrypoint}")
    if args.prune:
        for name in asyncio.run(aprune(args.work_pool, kept)):
            print(f"deployment {name} deleted: no longer in the config")


if __name__ == "__main__":
    main()
