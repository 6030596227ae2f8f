"""Helpers of `scripts/benchmark.py`: benchmark specs, measurement workers, one module per mode, reporting."""
