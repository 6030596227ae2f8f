"""Reproduction studies of the papers' claims (issue #24): one module per study, one shared runner (`runner.py`), one
entry point (`run.py`). See `runner.py` for the protocol and `run.py --help` for the command."""

import sys
from pathlib import Path

_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")  # bench_lib, the benchmark's shared code
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)
