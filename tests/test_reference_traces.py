"""The porting workflow end to end on real frameworks: golden/trace_{diffusers,keras}.py trace diffusers and
KerasHub into sd3ref's names; compare must find them equal to sd3ref in their own conventions and name the
real convention difference otherwise. Runs the golden environment (golden/setup.sh) for about a minute, so
it is opt-in: SD3REF_GOLDEN_PYTHON=golden/.venv/bin/python python -m pytest tests/test_reference_traces.py"""

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest

from sd3ref import compare, trace, verify

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("SD3REF_GOLDEN_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="opt-in: SD3REF_GOLDEN_PYTHON=<golden environment's python>")


@functools.lru_cache(maxsize=None)
def framework_trace(tmp_root, script, set_name, dtype="float32"):
    out = Path(tmp_root) / f"{script}_{set_name}_{dtype}.safetensors"
    args = [str(PYTHON), "-m", f"golden.{script}", set_name, "-o", str(out)] + (
        ["--dtype", dtype] if script == "trace_diffusers" else [])
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "KERAS_BACKEND": "numpy"})
    tensors, metadata = trace.load(out)
    versions = json.loads(metadata["versions"])  # which framework build produced the reference
    assert ("diffusers" if script == "trace_diffusers" else "keras-hub") in versions, versions
    return tensors


def ours(source, convention, token_file, dtype):
    from sd3ref import load

    set_dir = verify.GOLDEN / "sd3"
    inputs = {**verify.load_npz(set_dir / "inputs.npz"),
              **{k: v for k, v in verify.load_npz(set_dir / token_file).items() if k.startswith("tokens/")}}
    with trace.tracing() as tensors:
        trace.run(load(str(set_dir / source), dtype), inputs, convention)
    return tensors


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reference_traces"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_diffusers_trace_matches_sd3ref(tmp_root, dtype):
    result = compare.compare(framework_trace(tmp_root, "trace_diffusers", "sd3", dtype),
                             ours("diffusers", "diffusers", "diffusers_float32.npz", dtype))
    assert result["verdict"] is None and not result["unmatched"], compare.format_report(result)
    assert result["compared"] == len(result["rows"])


def test_keras_trace_matches_sd3ref_in_keras_conventions(tmp_root):
    result = compare.compare(framework_trace(tmp_root, "trace_keras", "sd3"),
                             ours("keras", "keras", "keras_float32.npz", "float32"))
    assert result["verdict"] is None and not result["unmatched"], compare.format_report(result)
    assert result["compared"] == len(result["rows"])


def test_keras_against_the_diffusers_form_names_keras_t5_gelu(tmp_root):
    # Same weights and tokens; sd3ref in diffusers' config. KerasHub's first difference in execution order
    # is T5's exact GELU (its CLIP eps comes later and is below float32 tolerance).
    v = compare.compare(framework_trace(tmp_root, "trace_keras", "sd3"),
                        ours("diffusers", "diffusers", "keras_float32.npz", "float64"))["verdict"]
    assert (v["first_divergent"], v["cause"]) == ("t5.layers.0.mlp", "gelu")
