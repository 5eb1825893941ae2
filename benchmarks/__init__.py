"""Benchmarks: `python -m benchmarks run SUITES` (the harness; benchmarks/README.md), each
suite's longer studies (`--param study=NAME`), probes in benchmarks/probes/."""
