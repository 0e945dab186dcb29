"""Benchmarks (never run in CI; tests/test_bench_smoke.py runs each at a tiny size)."""

import sd3ref  # noqa: F401  (before NumPy: sd3ref sets OpenBLAS's thread timeout, which it reads when it loads)
