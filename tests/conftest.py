"""Hypothesis runs derandomized by default, so that CI on a clean clone sees the same examples every time
(a test that fails does so on every run, not on one in a hundred). ``SD3REF_HYPOTHESIS=explore`` draws
fresh random examples instead: run it when changing a kernel (it found the float32 LayerNorm case that
tests/test_kernels.py::exact documents)."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("explore" if os.environ.get("SD3REF_HYPOTHESIS") == "explore" else "ci")
