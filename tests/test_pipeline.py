"""sd3ref.pipeline: the generation tasks. Their parity with KerasHub and diffusers runs in verify
(tests/test_parity.py); here: coverage of that parity, the framework facts it relies on, and the
properties of the loop."""

import json
import shutil

import numpy as np
import pytest

from sd3ref import Model, pipeline, verify
from sd3ref.weights import load_weights

SET = verify.GOLDEN / "sd3"
STAGES = ("t2i/", "i2i/", "inpaint/")


def _model(source="keras", dtype="float32"):
    weights, config = load_weights(str(SET / source))
    return Model(config, dict(weights), dtype)


@pytest.fixture(scope="module")
def keras32():
    return _model("keras")


@pytest.fixture(scope="module")
def inputs():
    return verify.load_npz(SET / "inputs.npz")


@pytest.fixture(scope="module")
def token_ids():
    """KerasHub's token ids of the set: (prompt, negative prompt), each {encoder: (B, L) ids}."""
    ref = verify.load_npz(SET / "keras_float32.npz")
    ids = {k: ref[f"tokens/{k}"] for k in ("clip_l", "clip_g", "t5")}
    return ids, {k: ref[f"neg_tokens/{k}"] for k in ids}


@pytest.mark.parametrize("set_name", verify.golden_sets())
@pytest.mark.parametrize("convention,source,ref_file", [("keras", "keras", "keras_float32.npz"),
                                                        ("diffusers", "diffusers", "diffusers_float32.npz")])
def test_tokenize_reproduces_the_frameworks_ids(set_name, convention, source, ref_file):
    d = verify.GOLDEN / set_name
    prompts = json.loads((d / "manifest.json").read_text())["spec"]["prompts"]
    # The golden diffusers folder's tokenizer_3 is what transformers 5 saves, a tokenizer.json alone
    tok = pipeline.load_tokenizers(d / source, convention)
    ref = verify.load_npz(d / ref_file)
    for kind, texts in (("tokens", prompts), ("neg_tokens", [""] * len(prompts))):
        ids = pipeline.tokenize(tok, texts, convention)
        expected = {k[len(kind) + 1:] for k in ref if k.startswith(kind + "/")}
        assert set(ids) == expected, (set(ids), expected)
        for k in ids:
            np.testing.assert_array_equal(ids[k], ref[f"{kind}/{k}"], err_msg=f"{kind}/{k}")


@pytest.mark.parametrize("run", [verify.RUNS[0], verify.RUNS[2]], ids=["keras-float32", "diffusers-float64"])
def test_every_stage_key_is_compared_and_passes(run):
    ref = verify.load_npz(SET / run[1])
    rows = verify.set_rows(SET, runs=[run])
    compared = {r["component"] for r in rows}
    wanted = {k for k in ref if k.startswith(STAGES) and k not in ("t2i/latents_0",)}  # latents_0 is the input
    assert wanted <= compared, wanted - compared
    assert "t5/sequence" in compared  # diffusers: through cond/context[:, 77:]
    failed = [r for r in rows if r["status"] != "PASS"]
    assert not failed, verify.format_table(failed)


def test_diffusers_inpaint_decodes_without_the_latent_shift():
    # diffusers 0.42.1's inpaint pipeline: vae.decode(latents / scale), no + shift (golden/README.md).
    model = _model("diffusers", "float64")
    ref = verify.load_npz(SET / "diffusers_float64.npz")
    final = ref["inpaint/latents_3"].transpose(0, 2, 3, 1)
    expected = ref["inpaint/decoded"].transpose(0, 2, 3, 1)
    without = verify.compare(pipeline.decode(model, final, shift=False), expected, "float64")
    with_shift = verify.compare(pipeline.decode(model, final), expected, "float64")
    assert without["status"] == "PASS", without
    assert with_shift["max_rel"] > 1e-2, with_shift  # the shift is a visible difference, not round-off


def test_guidance_at_most_one_skips_the_unconditional_pass(keras32, inputs, token_ids, monkeypatch):
    cond = pipeline.encode_text(keras32, *token_ids, "keras")
    batches = []
    original = Model.mmdit
    monkeypatch.setattr(Model, "mmdit", lambda self, x, *a: batches.append(len(x)) or original(self, x, *a))
    sigmas = pipeline.schedule(keras32, 2)
    x0 = inputs["t2i/latents"]
    plain = pipeline.denoise(keras32, x0, cond, sigmas, 1.0)
    assert batches == [2, 2]  # B = 2 prompts, no negatives
    unguided = pipeline.denoise(keras32, x0, pipeline.Conditioning(cond.context, cond.pooled), sigmas, 5.0)
    np.testing.assert_array_equal(plain, unguided)
    batches.clear()
    guided = pipeline.denoise(keras32, x0, cond, sigmas, 5.0)
    assert batches == [4, 4]
    assert np.abs(guided - plain).max() > 1e-3


def test_cfg_is_neg_plus_g_times_pos_minus_neg(keras32, inputs, token_ids):
    cond = pipeline.encode_text(keras32, *token_ids, "keras")
    sigmas = pipeline.schedule(keras32, 3)
    x = inputs["t2i/latents"]
    t = np.full(2, sigmas[0] * 1000, np.float32)
    pos = keras32.mmdit(x, t, cond.context, cond.pooled)
    neg_v = keras32.mmdit(x, t, cond.neg_context, cond.neg_pooled)
    expected = x + (sigmas[1] - sigmas[0]) * (neg_v + 3.0 * (pos - neg_v))
    got = pipeline.denoise(keras32, x, cond, sigmas[:2], 3.0)
    assert verify.compare(got, expected, "float32")["status"] == "PASS"


def test_inpaint_keeps_the_image_latents_outside_the_mask(keras32, inputs, token_ids):
    cond = pipeline.encode_text(keras32, token_ids[0])
    last = []
    pipeline.inpaint(keras32, cond, inputs["i2i/image"], inputs["inpaint/mask"], inputs["i2i/noise"], 4, 0.6, 1.0,
                     inputs["i2i/vae_eps"], on_step=lambda k, x: last.append(x))
    mask = pipeline.latent_mask(inputs["inpaint/mask"], last[-1].shape[1:3])
    assert 0 < mask.mean() < 1
    clean = pipeline.encode_image(keras32, inputs["i2i/image"], inputs["i2i/vae_eps"])
    keep = np.broadcast_to(~mask, clean.shape)
    np.testing.assert_array_equal(last[-1][keep], clean[keep])
    assert np.abs(last[-1][~keep] - clean[~keep]).max() > 1e-2
    assert len(last) == 4 - pipeline.start_step(4, 0.6) == 3


def test_latent_mask_samples_pixel_centres_or_top_left_pixels():
    mask = np.zeros((1, 16, 16))
    mask[0, 4, 12] = 1  # pixel (4, 12) is the centre sample of latent cell (0, 1) on an 8x8 grid (KerasHub)
    mask[0, 8, 0] = 1  # pixel (8, 0) is the top-left sample of cell (1, 0) (torch's nearest, diffusers)
    np.testing.assert_array_equal(pipeline.latent_mask(mask, (2, 2))[0, ..., 0], [[False, True], [False, False]])
    np.testing.assert_array_equal(pipeline.latent_mask(mask, (2, 2), "diffusers")[0, ..., 0],
                                  [[False, False], [True, False]])
    np.testing.assert_array_equal(pipeline.latent_mask(mask * 0.5, (2, 2)), False)  # KerasHub: > 0.5
    np.testing.assert_array_equal(pipeline.latent_mask(mask * 0.5, (2, 2), "diffusers")[0, 1, 0], True)  # ≥ 0.5


@pytest.mark.parametrize("steps,strength,start", [(4, 0.6, 1), (28, 0.8, 5), (10, 1.0, 0), (10, 0.0, 10), (3, 0.5, 1)])
def test_start_step(steps, strength, start):
    assert pipeline.start_step(steps, strength) == start


@pytest.mark.parametrize("prefix", ["i2i", "inpaint"])
@pytest.mark.parametrize("reference,convention", [("keras_float32.npz", "keras"), ("diffusers_float32.npz", "diffusers")])
def test_start_steps_follow_each_frameworks_own_code(prefix, reference, convention):
    # golden tables from KerasHub's generate() and diffusers' get_timesteps over a grid with the float ties
    constants = json.loads((SET / "manifest.json").read_text())["constants"]
    table = verify.load_npz(SET / reference)[f"{prefix}/start_steps"]
    ours = [[pipeline.start_step(n, s, convention) for s in constants["START_STEPS_STRENGTH"]]
            for n in constants["START_STEPS_N"]]
    np.testing.assert_array_equal(ours, table)
    # the two frameworks really differ on the grid (strength 0.8 at N = 10: KerasHub 1, diffusers 2)
    n, s = constants["START_STEPS_N"].index(10), constants["START_STEPS_STRENGTH"].index(0.8)
    assert table[n, s] == {"keras": 1, "diffusers": 2}[convention]


def test_to_uint8_roundings():
    # (x + 1)/2·255 = 127.5 exactly at x = 0/255 shifted: x = 2·127.5/255 − 1 = 0.
    x = np.array([-2.0, -1.0, 0.0, 2 * 128.5 / 255 - 1, 0.999, 1.0, 3.0], np.float64)
    assert pipeline.to_uint8(x, "keras").tolist() == [0, 0, 128, 128, 255, 255, 255]  # half to even
    assert pipeline.to_uint8(x, "sai").tolist() == [0, 0, 127, 128, 254, 255, 255]  # truncation
    assert pipeline.to_uint8(x, "diffusers").tolist() == [0, 0, 128, 128, 255, 255, 255]
    with pytest.raises(ValueError):
        pipeline.to_uint8(x, "round")


def _generate(model, tok, prompts, **kw):
    kw = {"height": 48, "width": 48, "steps": 2, "guidance": 4.0, **kw}
    return pipeline.generate(model, tok, prompts, **kw)


def test_generate_is_seeded_and_batch_rows_are_independent(keras32):
    tok = pipeline.load_tokenizers(SET / "keras")
    one = _generate(keras32, tok, "a red cube", rng=np.random.default_rng(7))
    again = _generate(keras32, tok, "a red cube", rng=np.random.default_rng(7))
    other = _generate(keras32, tok, "a red cube", rng=np.random.default_rng(8))
    both = _generate(keras32, tok, ["a red cube", "a blue ball"], rng=np.random.default_rng(7))
    np.testing.assert_array_equal(one, again)
    assert np.abs(one - other).max() > 1e-2
    assert verify.compare(both[:1], one, "float32")["status"] == "PASS"  # same first noise rows
    assert one.shape == (1, 48, 48, 3) and one.dtype == np.float32


def test_generate_float64_and_inputs_checks():
    model = _model("keras", "float64")
    tok = pipeline.load_tokenizers(SET / "keras")
    image = np.zeros((48, 48, 3))
    out = _generate(model, tok, "x", image=image, mask=np.ones((48, 48)), strength=0.5)
    assert out.dtype == np.float64
    for bad in ({"height": 40}, {"steps": 0}, {"guidance": -1.0}, {"height": 144, "width": 144}):
        with pytest.raises(pipeline.PipelineError):
            _generate(model, tok, "x", **bad)


def test_long_prompts_are_truncated_with_a_warning():
    tok = pipeline.load_tokenizers(SET / "keras")
    with pytest.warns(UserWarning, match=r"truncated to the token limits \(CLIP-L 77, CLIP-G 77, T5 77\)"):
        ids = pipeline.tokenize(tok, "cat " * 100)
    assert ids["clip_l"].shape == (1, 77)


def test_t5_length_follows_the_preset_the_convention_or_the_caller(tmp_path):

    tok = pipeline.load_tokenizers(SET / "keras")
    assert tok.preset_t5_length == 77  # the golden preset's T5Preprocessor, as KerasHub wrote it
    assert pipeline.tokenize(tok, "x", "keras")["t5"].shape == (1, 77)
    assert pipeline.tokenize(tok, "x", "diffusers")["t5"].shape == (1, 256)  # max_sequence_length's default
    assert pipeline.tokenize(tok, "x", "diffusers", t5_length=300)["t5"].shape == (1, 300)
    with pytest.raises(pipeline.PipelineError, match="t5_length must be at least 1"):
        pipeline.tokenize(tok, "x", "diffusers", t5_length=0)
    preset = tmp_path / "preset"
    shutil.copytree(SET / "keras", preset)
    config = json.loads((preset / "preprocessor.json").read_text())
    config["config"]["t5_preprocessor"]["config"]["sequence_length"] = 256  # T5Preprocessor's own default
    (preset / "preprocessor.json").write_text(json.dumps(config))
    assert pipeline.tokenize(pipeline.load_tokenizers(preset), "x", "keras")["t5"].shape == (1, 256)


def test_without_t5_diffusers_stands_in_max_sequence_length_zero_tokens():
    no_t5 = verify.GOLDEN / "sd3_no_t5"
    model = Model(*reversed(load_weights(no_t5 / "diffusers")), "float32")
    tok = pipeline.load_tokenizers(no_t5 / "diffusers", "diffusers")
    ids = pipeline.tokenize(tok, "x", "diffusers")
    assert pipeline.encode_text(model, ids, convention="diffusers").context.shape[1] == 77 + 256
    assert pipeline.encode_text(model, ids, convention="diffusers", t5_length=77).context.shape[1] == 77 + 77
    assert pipeline.encode_text(model, ids, convention="keras", t5_length=300).context.shape[1] == 77 + 77


def test_generate_never_leaves_t5_out_silently_and_takes_per_prompt_negatives(keras32, tmp_path):
    # a diffusers folder without tokenizer_3
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(SET / "diffusers" / name, tmp_path / name)
    tok = pipeline.load_tokenizers(tmp_path, "diffusers")
    assert tok.t5 is None and keras32.config.t5 is not None
    with pytest.raises(pipeline.PipelineError, match="no T5 tokenizer"):
        _generate(keras32, tok, "x", convention="diffusers")
    assert _generate(keras32, tok, "x", convention="diffusers", use_t5=False).shape == (1, 48, 48, 3)
    tok = pipeline.load_tokenizers(SET / "keras")
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    listed = _generate(keras32, tok, ["a", "b"], negative_prompt=["x", "y"], rng=rng())
    first = _generate(keras32, tok, ["a", "b"], negative_prompt="x", rng=rng())
    np.testing.assert_array_equal(listed[0], first[0])  # the rows are independent: row 0 had "x" both times
    assert np.abs(listed[1] - first[1]).max() > 1e-3
    with pytest.raises(pipeline.PipelineError, match="1 negative prompts for 2 prompts"):
        _generate(keras32, tok, ["a", "b"], negative_prompt=["x"])


def test_keras_schedule_is_kerashubs_float32_computation_bit_for_bit():
    # KerasHub's sigmas (golden keras file): a float32 timestep one step off moved image-to-image by 1.4e-5
    ref = verify.load_npz(SET / "keras_float32.npz")
    keys = [k for k in ref if k.startswith("scheduler/sigmas_")]
    assert len(keys) >= 20
    for key in keys:
        n, shift = key[len("scheduler/sigmas_n"):].split("_shift")
        ours = pipeline.schedule_for(int(n), float(shift), 1000, "keras")
        np.testing.assert_array_equal(ours.astype(np.float32), ref[key], err_msg=key)
        assert ours.dtype == np.float64 and np.array_equal(ours, ours.astype(np.float32))


def test_a_mode_vae_encodes_images_to_the_posterior_mean(keras32, inputs):
    import dataclasses

    from sd3ref import config as cfgmod

    cfg = keras32.config
    mode = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, sampler_method="mode"))
    model = Model(mode, keras32.weights, "float32")
    image, eps = inputs["i2i/image"], inputs["i2i/vae_eps"]
    np.testing.assert_array_equal(pipeline.encode_image(model, image, eps), pipeline.encode_image(model, image))
    assert np.abs(pipeline.encode_image(keras32, image, eps) - pipeline.encode_image(keras32, image)).max() > 1e-2
    # KerasHub's VAEBackbone sampler_method survives the KerasHub config both ways
    keras = cfgmod.to_keras(mode, {c: "float32" for c in ("mmdit", "vae", "clip_l", "clip_g", "t5")})
    assert cfgmod.from_keras(keras).vae.sampler_method == "mode"


def test_clip_encoders_shorter_than_the_tokenizers_are_refused(keras32):
    import dataclasses

    cfg = keras32.config
    short = dataclasses.replace(cfg, clip_l=dataclasses.replace(cfg.clip_l, max_sequence_length=32))
    tok = pipeline.load_tokenizers(SET / "keras")
    pipeline.check_tokenizers(tok, cfg)
    with pytest.raises(pipeline.PipelineError, match="clip_l encoder has 32 positions"):
        pipeline.check_tokenizers(tok, short)


def test_generate_passes_the_t5_length_to_the_t5_encoder(keras32, monkeypatch):
    tok = pipeline.load_tokenizers(SET / "keras")
    seen = []
    t5 = Model.t5
    monkeypatch.setattr(Model, "t5", lambda self, ids: seen.append(np.shape(ids)) or t5(self, ids))
    _generate(keras32, tok, "x", steps=1, t5_length=40)
    _generate(keras32, tok, "x", steps=1)
    assert [s[1] for s in seen] == [40, 77]  # the caller's length, then the golden preset's own
