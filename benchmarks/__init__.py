"""Benchmarks: `python -m benchmarks run SUITES` (the harness; benchmarks/README.md), the longer
studies as modules (`python -m benchmarks.export`, ...), probes in benchmarks/probes/."""
