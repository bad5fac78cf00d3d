"""Our Prefect plugin: every process of the stack gets our guarantees at `import prefect`.

Registered under Prefect's `prefect.plugins` entry-point group (see pyproject.toml) and
run by Prefect itself when `PREFECT_PLUGINS_ENABLED=true`, which our image, chart and
local stack set. So a user's plain Prefect code (a `@task` with no storage argument,
`.delay()`, `.result()`), run in any process started from our image, gets:

- Prefect's default storage settings pointed at our shared storage (`FANOUT_STORAGE`,
  see `fanout.storage.prefect_storage_env`), unless the process sets them itself;
- the client-side fixes of `fanout.internals` (futures that never wait forever, a
  `.delay()` that rides out a server restart).
"""

from __future__ import annotations

import os

from prefect.plugins import HookContext, register_hook

PREFECT_PLUGIN_API_REQUIRES = ">=0.1,<1"


@register_hook
def setup_environment(*, ctx: HookContext) -> None:
    """Install the fixes and set the storage defaults.

    The environment is set here directly rather than returned as a `SetupResult`:
    Prefect logs every applied result at INFO, a line in every process's output.
    Prefect refreshes its settings from the environment after the hooks have run.
    """
    from fanout import internals
    from fanout.storage import prefect_storage_env

    internals.install()
    for name, value in prefect_storage_env().items():
        os.environ.setdefault(name, value)
