"""Benchmarks: pytest-benchmark suites and `python -m bench --json` headline figures."""
