"""Helpers of `scripts/benchmarks/benchmark.py`: benchmark specs, measurement workers, one module per mode,
reporting."""
