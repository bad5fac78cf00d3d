"""fanout: fan your own Python work out over Prefect task workers, on Kubernetes or locally.

    import fanout

    result = fanout.fan_out(resize, paths)   # a Prefect @task or a plain module-level function
    result.values                            # every result, in item order (raises if any failed)
    result.failed                            # {item index: reason}

    for outcome in fanout.fan_out_iter(resize, huge_iterable):   # as they complete
        ...

Workers serve your function: `python -m fanout.worker --tasks mymodule:resize`. Plain
Prefect code (`.delay()`, `.result()`, process-pool subflows) works unchanged too; see
the README. Every process of the stack runs this same package and image, so task code,
and with it Prefect's task keys, is byte-identical on both sides.
"""

from fanout.api import FanOutFailed, FanOutResult, ItemOutcome, afan_out, fan_out, fan_out_iter
from fanout.chunks import ChunkFailed
from fanout.processpool import WarmProcessPoolTaskRunner

__version__ = "0.2.0"

__all__ = [
    "ChunkFailed",
    "FanOutFailed",
    "FanOutResult",
    "ItemOutcome",
    "WarmProcessPoolTaskRunner",
    "afan_out",
    "fan_out",
    "fan_out_iter",
]
