"""Every component against every golden set, weight source and reference framework (see sd3ref.verify)."""

import functools

import pytest

from sd3ref import verify

SETS = verify.golden_sets()
CASES = [(s, run) for s in SETS for run in verify.RUNS]


@functools.lru_cache(maxsize=None)
def rows(set_name, run):
    return verify.set_rows(verify.GOLDEN / set_name, runs=[run])


def test_golden_sets_present():
    assert SETS, f"no golden sets under {verify.GOLDEN}"


@pytest.mark.parametrize("set_name,run", CASES, ids=[f"{s}-{r[0]}-{r[1].removesuffix('.npz')}" for s, r in CASES])
def test_parity(set_name, run):
    result = rows(set_name, run)
    if not (verify.GOLDEN / set_name / run[1]).exists():
        pytest.skip(f"{set_name} has no {run[1]}")
    assert result, "no component was compared"
    failed = [r for r in result if r["status"] != "PASS"]
    assert not failed, "\n" + verify.format_table(failed)


@pytest.mark.parametrize("set_name,run", CASES, ids=[f"{s}-{r[0]}-{r[1].removesuffix('.npz')}" for s, r in CASES])
def test_every_reference_output_is_compared(set_name, run):
    # Every output a framework recorded is compared, none silently skipped: all keys of the reference file
    # but the inputs the runs start from (token ids, tested in test_pipeline; the initial latents).
    path = verify.GOLDEN / set_name / run[1]
    if not path.exists():
        pytest.skip(f"{set_name} has no {run[1]}")
    outputs = {k for k in verify.load_npz(path) if not k.startswith(("tokens/", "neg_tokens/")) and k != "t2i/latents_0"}
    compared = {r["component"] for r in rows(set_name, run)}
    assert outputs and outputs <= compared, sorted(outputs - compared)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float16_weights_compute_in_the_callers_dtype(dtype):
    # Weights are upcast per layer at use: float16 storage must neither leak into nor demote the result.
    import numpy as np

    from sd3ref import Model, vae
    from sd3ref.weights import load_weights

    name = "sd35" if "sd35" in SETS else SETS[0]
    weights, config = load_weights(str(verify.GOLDEN / name / "diffusers"))
    half = {k: np.asarray(weights[k], np.float16) for k in weights}
    model = Model(config, half, dtype)
    inputs = verify.load_npz(verify.GOLDEN / name / "inputs.npz")
    ref = verify.load_npz(verify.GOLDEN / name / "diffusers_float32.npz")
    outs = verify.outputs(model, inputs, ref, "diffusers")
    # The schedule is float64 by design; every float computed from weights is in the caller's dtype.
    computed = {k: v for k, v in outs.items() if not k.startswith("scheduler/") and np.issubdtype(v.dtype, np.floating)}
    assert computed and all(v.dtype == np.dtype(dtype) for v in computed.values()), {k: v.dtype for k, v in computed.items()}
    assert vae.to_latent(outs["vae/mean"], config.vae).dtype == np.dtype(dtype)
