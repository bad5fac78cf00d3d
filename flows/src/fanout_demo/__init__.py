"""The demo workload, one user of the fanout core: `make run`, the chart demo Job, `make bench`."""
