"""The local stack with the demo's pools: `make run`, the integration tests, `make bench`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fanout.local import LocalStack
from fanout_demo.tasks import POOL_ENV, POOL_TASKS


class DemoStack(LocalStack):
    """A LocalStack whose `start_worker("light"|"heavy")` serves the demo's pools and whose
    `run_flow` runs the demo's parent flow (`python -m fanout_demo.flow`)."""

    def __init__(
        self, root: Path, database: str = "auto", ui: bool = True, replicas: int = 1, ha: bool | None = None
    ) -> None:
        super().__init__(root, database=database, ui=ui, pools=POOL_TASKS, pool_env=POOL_ENV, replicas=replicas, ha=ha)

    def run_flow(self, args: list[str], timeout: float = 900, capture: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run_module("fanout_demo.flow", args, timeout=timeout, capture=capture)
