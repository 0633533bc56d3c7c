"""Reproducible benchmarks: each module prints a table and writes benchmarks/results/NAME.json."""
