"""sd3ref.weights.load_weights and the config readers it relies on."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from converters import canonical
from converters.tensors import BF16, SafetensorsFile, cast, to_float32, write_safetensors
from sd3ref import config as cfgmod
from sd3ref.config import SD3Config
from sd3ref.weights import WeightsError, load_weights

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SETS = [s for s in ("sd3", "sd35", "sd3_no_t5")
        if all((GOLDEN / s / f).exists() for f in ("sai.safetensors", "keras/config.json", "diffusers/model_index.json"))]
needs_golden = pytest.mark.skipif(not SETS, reason="golden sets not generated")


def sai_tensors(name):
    """As load_weights returns them: bfloat16 decoded to float32, other dtypes as stored."""
    st = SafetensorsFile(GOLDEN / name / "sai.safetensors")
    return {n: (to_float32(a) if a.dtype == BF16 else np.asarray(a)) for n, a in ((n, st.read(n)) for n in st.tensors)}


@needs_golden
@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("form", ["keras", "keras/model.weights.h5", "diffusers", "sai.safetensors"])
def test_every_source_loads_the_same_canonical_tensors(name, form):
    sai = sai_tensors(name)
    weights, config = load_weights(GOLDEN / name / form)
    assert sorted(weights) == sorted(sai)
    for n, a in sai.items():
        got = weights[n]
        # Values are identical in every form; KerasHub stores the SD3.5 qk-norm scales in float32 and the CLIP
        # projections in the backbone's dtype, where Stability uses the component's 16-bit dtype.
        keras_kept = form.startswith("keras") and n.endswith(("ln_q.weight", "ln_k.weight", "text_projection.weight"))
        assert (keras_kept or got.dtype == a.dtype) and np.array_equal(got, a), n
    assert weights.shapes == {n: a.shape for n, a in sai.items()}


@needs_golden
@pytest.mark.parametrize("name", SETS)
def test_configs_of_keras_and_diffusers_agree_on_the_architecture(name):
    keras = load_weights(GOLDEN / name / "keras")[1]
    diffusers = load_weights(GOLDEN / name / "diffusers")[1]
    fields = ("mmdit_hidden_dim", "mmdit_num_layers", "mmdit_num_heads", "mmdit_position_size", "mmdit_qk_norm",
              "mmdit_dual_attention_indices", "mmdit_context_dim", "mmdit_pooled_dim", "vae")
    assert [getattr(keras, f) for f in fields] == [getattr(diffusers, f) for f in fields]
    for enc in ("clip_l", "clip_g"):
        k, d = getattr(keras, enc), getattr(diffusers, enc)
        assert (k.hidden_dim, k.num_layers, k.num_heads, k.intermediate_activation) == \
               (d.hidden_dim, d.num_layers, d.num_heads, d.intermediate_activation)
        assert (k.final_layer_norm_epsilon, d.final_layer_norm_epsilon) == (1e-6, 1e-5)  # KerasHub vs HF


@needs_golden
def test_sai_file_takes_the_config_of_another_source():
    """Stability files cannot show the head count when heads are not 64 wide (the tiny sets)."""
    name = SETS[0]
    keras_cfg = load_weights(GOLDEN / name / "keras")[1]
    _, cfg = load_weights(GOLDEN / name / "sai.safetensors", config=GOLDEN / name / "diffusers")
    assert cfg.mmdit_num_heads == keras_cfg.mmdit_num_heads


def test_bfloat16_is_decoded_on_access_and_float16_kept(tmp_path):
    cfg = SD3Config(64, 2, 2, 4, mmdit_context_dim=32, mmdit_pooled_dim=16, vae=None)
    shapes = canonical.expected_shapes(cfg)
    rng = np.random.default_rng(0)
    values = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    stored = {n: (cast(v, BF16) if "joint_blocks.0" in n else v.astype(np.float16)) for n, v in values.items()}
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as f:
        write_safetensors(f, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in stored.items()],
                          {"sd3ref.format": canonical.FORMAT, "sd3ref.config": cfg.to_json()})
    weights, got_cfg = load_weights(path)
    assert got_cfg == cfg
    bf = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    assert weights[bf].dtype == np.float32
    np.testing.assert_allclose(weights[bf], values[bf], rtol=2**-8)
    f16 = "model.diffusion_model.final_layer.linear.weight"
    assert weights[f16].dtype == np.float16 and isinstance(weights[f16], np.memmap)


def _full_size_configs():
    from test_converters import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM

    return [SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE]


@pytest.mark.parametrize("index", range(3))
def test_infer_from_shapes_recovers_full_size_configs(index):
    cfg = _full_size_configs()[index]
    inferred = cfgmod.infer_from_shapes(canonical.expected_shapes(cfg))
    # 64-wide heads, and the SD3 conventions for what shapes cannot show.
    assert inferred == cfg.__class__.from_dict({**cfg.to_dict(), "image_shape": inferred.image_shape})


def test_metadata_round_trip():
    cfg = _full_size_configs()[1]
    assert cfgmod.from_metadata({"sd3ref.config": cfg.to_json()}) == cfg
    assert cfgmod.from_metadata({}) is None


def test_unknown_source_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\x00" * 4)
    with pytest.raises(WeightsError, match="x.bin"):
        load_weights(bad)
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(tmp_path / "missing.safetensors")


@needs_golden
def test_a_vae_without_a_latent_shift_is_a_clear_error(tmp_path):
    # diffusers' AutoencoderKL defaults shift_factor to null (SD1-style VAEs); SD3 latents need the shift
    folder = tmp_path / "pipe"
    shutil.copytree(GOLDEN / "sd3" / "diffusers", folder)
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    vae_config["shift_factor"] = None
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config))
    with pytest.raises(WeightsError, match="VAEConfig.shift None is not a number") as error:
        load_weights(folder)
    assert str(folder) in str(error.value)


@needs_golden
def test_upcast_cache_keeps_mmdit_weights_within_its_budget():
    from sd3ref.weights import UpcastCache

    weights, _ = load_weights(GOLDEN / "sd3" / "sai.safetensors")
    mmdit = [n for n in weights if n.startswith(canonical.PREFIX["mmdit"])]
    budget = sum(int(np.prod(weights.shapes[n])) * 4 for n in mmdit) // 2  # half the MMDiT in float32
    cache = UpcastCache(weights, canonical.PREFIX["mmdit"], "float32", budget)
    for n in weights:
        a = cache[n]
        assert np.array_equal(a, weights[n]) and a.dtype == (np.float32 if n in cache._kept else weights[n].dtype)
    assert cache._kept and set(cache._kept) <= set(mmdit)
    assert budget // 2 < sum(a.nbytes for a in cache._kept.values()) <= budget
    assert all(cache[n] is cache._kept[n] for n in cache._kept)  # kept, not re-read


@needs_golden
def test_membership_does_not_read_the_tensor(monkeypatch):
    weights, _ = load_weights(GOLDEN / "sd3" / "sai.safetensors")
    name = next(iter(weights))
    monkeypatch.setattr(weights.plan, "read", lambda n: pytest.fail(f"read {n} for a membership test"))
    assert name in weights and "no.such.tensor" not in weights


@needs_golden
def test_guessed_head_counts_warn_when_heads_cannot_be_64_wide():
    # The golden models are 32 / 48 wide: a Stability file without metadata cannot show their head counts
    with pytest.warns(UserWarning, match=r"MMDiT is 32 wide, CLIP-L is 32 wide, CLIP-G is 48 wide: pass"):
        _, guessed = load_weights(GOLDEN / "sd3" / "sai.safetensors")
    assert guessed.mmdit_num_heads == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cfg = load_weights(GOLDEN / "sd3" / "sai.safetensors", config=GOLDEN / "sd3" / "diffusers")
    assert cfg.mmdit_num_heads == 2
