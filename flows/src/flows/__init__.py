"""Distributed fan-out on Prefect 3: flows, task workers and process-pool subflows.

Every process of the stack (server, task workers, flow-run pods, the submitter) runs
this same package, so task code, and with it Prefect's task keys, is byte-identical
on both sides of a `.delay()`.
"""

__version__ = "0.1.0"
