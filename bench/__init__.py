"""Benchmarks: `python -m bench throughput` prints a table of tokens/s."""
