"""A user's package: plain Prefect tasks and flows, nothing of fanout's in them."""
