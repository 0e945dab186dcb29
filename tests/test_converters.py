"""Converters: golden sets in every source form, round trips, full-size coverage, bad inputs.

The expected values come from outside sd3ref: the golden files written by KerasHub / diffusers (whose
three forms hold identical weights), the real KerasHub h5 manifests, and the tensor counts and
parameter totals of the published checkpoints."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from converters import canonical, cli, diffusers_layout, keras_layout
from converters import diffusers_to_safetensors, inspect, keras_to_safetensors, sai_to_safetensors, safetensors_to_keras
from converters.sources import open_source
from converters.tensors import BF16, F8_E4M3, SafetensorsFile, cast, to_float32, write_safetensors
from sd3ref.config import CLIPConfig, SD3Config, T5Config

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"
SETS = [s for s in ("sd3", "sd35", "sd3_no_t5") if (GOLDEN / s / "sai.safetensors").is_file()]
# Every dataset path, shape and dtype of the real KerasHub SD3-medium and SD3.5-medium .weights.h5 files
# (listed from the published presets' files; gzipped TSV)
MANIFESTS = Path(__file__).resolve().parent / "data"
needs_golden = pytest.mark.skipif(not SETS, reason="golden sets not generated")


# -- helpers --------------------------------------------------------------------------------------------

def run_cmd(module, argv, capsys):
    """Run a converter command in-process; return (exit status, stdout, stderr)."""
    status = 0
    try:
        cli.main(lambda: module.run([str(a) for a in argv]))
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def read_st(path) -> dict:
    st = SafetensorsFile(path)
    return {n: np.asarray(st.read(n)) for n in st.tensors}


def h5_datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, (o[()], o.dtype, dict(o.attrs), dict(f[n.rsplit("/", 1)[0]].attrs)))
                     if isinstance(o, h5py.Dataset) else None)
    return out


def same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def assert_error(status, err, *names):
    """Exit status 1 and one error line naming ``names`` (after any one-line warnings: the tiny golden
    models' head counts cannot be guessed from a Stability file)."""
    assert status == 1
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


# -- golden sets: every source form gives the SAI file's tensors ----------------------------------------
# Bit for bit where the forms store the same dtype. KerasHub keeps the SD3.5 qk-norm scales in float32 and
# the CLIP projections in the backbone's dtype (bfloat16 for SD3.5), where Stability / diffusers use the
# component's dtype: there the values must be equal and the converter keeps the source's stored dtype.

@needs_golden
@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("form,module", [("keras", keras_to_safetensors), ("diffusers", diffusers_to_safetensors),
                                         ("sai.safetensors", sai_to_safetensors)])
def test_golden_forms_convert_to_the_sai_tensors(name, form, module, tmp_path, capsys):
    sai = read_st(GOLDEN / name / "sai.safetensors")
    out = tmp_path / "c.safetensors"
    status, stdout, err = run_cmd(module, [GOLDEN / name / form, "-o", out], capsys)
    assert status == 0, err
    assert f"{len(sai)} tensors" in stdout
    got = read_st(out)
    assert sorted(got) == sorted(sai)
    differ = [n for n in sai if not same_bits(got[n], sai[n])]
    if form == "keras":
        kept = [n for n in differ if n.endswith(("ln_q.weight", "ln_k.weight", "text_projection.weight"))]
        assert all(np.array_equal(to_float32(got[n]), to_float32(sai[n])) for n in kept)
        differ = sorted(set(differ) - set(kept))
    assert differ == []
    meta = SafetensorsFile(out).metadata
    assert meta["sd3ref.format"] == "canonical-1"
    assert SD3Config.from_json(meta["sd3ref.config"]) == open_source(GOLDEN / name / form).config


@needs_golden
@pytest.mark.parametrize("name", SETS)
def test_keras_round_trip_is_bit_exact(name, tmp_path, capsys):
    canon, back = tmp_path / "c.safetensors", tmp_path / "preset"
    assert run_cmd(keras_to_safetensors, [GOLDEN / name / "keras", "-o", canon], capsys)[0] == 0
    assert run_cmd(safetensors_to_keras, [canon, "-o", back], capsys)[0] == 0
    original, again = h5_datasets(GOLDEN / name / "keras" / "model.weights.h5"), h5_datasets(back / "model.weights.h5")
    assert sorted(original) == sorted(again)
    for n, (data, dtype, attrs, group_attrs) in original.items():
        d2, t2, a2, g2 = again[n]
        assert dtype == t2 and attrs == a2 and group_attrs == g2, n
        assert same_bits(data, d2), n
    keras_cfg = json.loads((back / "config.json").read_text())
    assert open_source(back).config.mmdit_num_heads == keras_cfg["config"]["mmdit_num_heads"]


@needs_golden
@pytest.mark.parametrize("name", SETS)
def test_diffusers_round_trip_is_bit_exact(name, tmp_path, capsys):
    """canonical -> the diffusers tensors, through the same table read backwards."""
    canon = tmp_path / "c.safetensors"
    assert run_cmd(diffusers_to_safetensors, [GOLDEN / name / "diffusers", "-o", canon], capsys)[0] == 0
    plan = open_source(canon)
    folder = GOLDEN / name / "diffusers"
    original = {}
    for comp in plan.components():
        sub = diffusers_layout.SUBFOLDERS[comp]
        for f in sorted((folder / sub).glob("*.safetensors")):
            original.update({f"{sub}/{k}": v for k, v in read_st(f).items()})
    rebuilt = {}
    for comp in plan.components():
        for rule in diffusers_layout.rules(plan.config, comp):
            rebuilt.update(zip(rule.sources, rule.op.from_canonical(plan.read(rule.canonical))))
    assert set(original) - set(rebuilt) <= set(diffusers_layout.KNOWN_EXTRAS)
    assert [n for n in rebuilt if not same_bits(rebuilt[n], original[n])] == []


@needs_golden
def test_sharded_keras_and_old_clip_block_names(tmp_path, capsys):
    """Keras >= 3.10 shards (model_NNNNN.weights.h5 + model.weights.json) and keras-hub <= 0.21 names."""
    name = SETS[0]
    src = GOLDEN / name / "keras"
    preset = tmp_path / "preset"
    preset.mkdir()
    shutil.copy(src / "config.json", preset / "config.json")
    datasets = h5_datasets(src / "model.weights.h5")
    weight_map = {}
    names = sorted(datasets)
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model_{k:05d}.weights.h5"
        with h5py.File(preset / shard, "w") as f:
            for n in part:
                data, _, attrs, group_attrs = datasets[n]
                path = n.replace("/clip_encoder_layer", "/clip_encoder_block")
                g = f.require_group(path.rsplit("/", 1)[0])
                g.attrs.update(group_attrs)
                f.create_dataset(path, data=data).attrs.update(attrs)
                weight_map.setdefault("/" + n.rsplit("/", 1)[0], []).append(shard)
    (preset / "model.weights.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "c.safetensors"
    assert run_cmd(keras_to_safetensors, [preset, "-o", out], capsys)[0] == 0
    sai = read_st(GOLDEN / name / "sai.safetensors")
    got = read_st(out)
    assert sorted(got) == sorted(sai) and all(same_bits(got[n], sai[n]) for n in sai)


@needs_golden
def test_sharded_diffusers_transformer(tmp_path, capsys):
    name = SETS[0]
    folder = tmp_path / "diffusers"
    shutil.copytree(GOLDEN / name / "diffusers", folder, ignore=shutil.ignore_patterns("tokenizer*"))
    tensors = read_st(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"diffusion_pytorch_model-0000{k + 1}-of-00002.safetensors"
        with open(folder / "transformer" / shard, "wb") as f:
            write_safetensors(f, [(n, tensors[n].shape, tensors[n].dtype, lambda n=n: tensors[n]) for n in part], {})
        weight_map.update({n: shard for n in part})
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "c.safetensors"
    assert run_cmd(diffusers_to_safetensors, [folder, "-o", out], capsys)[0] == 0
    sai = read_st(GOLDEN / name / "sai.safetensors")
    assert all(same_bits(read_st(out)[n], sai[n]) for n in sai)


@needs_golden
@pytest.mark.parametrize("prefixed", [True, False])
def test_sai_separate_encoder_files_extras_and_float8(prefixed, tmp_path, capsys):
    name = "sd3" if "sd3" in SETS else pytest.skip("needs the sd3 set (with T5)")
    sai = read_st(GOLDEN / name / "sai.safetensors")
    main, files = {}, {}
    for n, a in sai.items():
        comp = canonical.component_of(n)
        if comp in ("clip_l", "clip_g", "t5"):
            files.setdefault(comp, {})[n if prefixed else n[len(canonical.PREFIX[comp]):]] = a
        else:
            main[n] = a
    t5 = canonical.PREFIX["t5"] if prefixed else ""
    files["t5"] = {k: cast_f8(v) for k, v in files["t5"].items()}  # a t5xxl_fp8_e4m3fn-style file
    files["t5"][t5 + "encoder.embed_tokens.weight"] = files["t5"][t5 + "shared.weight"]
    files["clip_l"][("text_encoders.clip_l." if prefixed else "") + "logit_scale"] = np.float32(4.6).reshape(())
    argv = []
    for comp, tensors in [("main", main), *files.items()]:
        path = tmp_path / f"{comp}.safetensors"
        with open(path, "wb") as f:
            write_safetensors(f, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()], {})
        argv += [path] if comp == "main" else [f"--{comp.replace('_', '-')}", path]
    out = tmp_path / "c.safetensors"
    status, stdout, err = run_cmd(sai_to_safetensors, argv + ["-o", out], capsys)
    assert status == 0, err
    assert "embed_tokens" in err and "logit_scale" in err  # reported, not silently dropped
    got = read_st(out)
    assert sorted(got) == sorted(sai)
    for n in sai:
        if canonical.component_of(n) == "t5":  # float8 decodes exactly into float16
            assert got[n].dtype == np.float16
            np.testing.assert_array_equal(got[n], to_float32(cast_f8(sai[n])))
        else:
            assert same_bits(got[n], sai[n]), n


@pytest.mark.parametrize("form", ["diffusers", "keras"])
def test_separate_encoder_files_only_go_with_a_single_file(form):
    from converters.sources import ConversionError
    with pytest.raises(ConversionError, match="Stability single file"):
        open_source(GOLDEN / SETS[0] / form, encoders={"t5": GOLDEN / SETS[0] / "sai.safetensors"})


@pytest.mark.parametrize("role,shape", [("clip_l", (1280, 32)), ("clip_g", (768, 12))])
def test_swapped_clip_files_are_refused(tmp_path, role, shape):
    # Only the shapes matter: an embedding as wide as the other SD3 encoder's, and as many layers
    from safetensors.numpy import load_file, save_file

    from converters.sources import ConversionError
    main = tmp_path / "sd3.safetensors"  # the golden Stability file without its text encoders
    save_file({n: t for n, t in load_file(str(GOLDEN / SETS[0] / "sai.safetensors")).items()
               if not n.startswith("text_encoders.")}, str(main))
    width, depth = shape
    tensors = {"text_model.embeddings.token_embedding.weight": np.zeros((2, width), np.float16),
               **{f"text_model.encoder.layers.{i}.layer_norm1.weight": np.zeros(1, np.float16) for i in range(depth)}}
    path = tmp_path / f"{role}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ConversionError, match="swapped CLIP-L and CLIP-G") as e:
        open_source(main, encoders={role: path})
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_separate_encoder_file_is_named_in_shape_errors(tmp_path):
    # The golden CLIPs given the wrong way round, with the set's config: each misfit names its own file
    from safetensors.numpy import load_file, save_file

    from converters.sources import ConversionError
    tensors = load_file(str(GOLDEN / SETS[0] / "sai.safetensors"))
    save_file({n: t for n, t in tensors.items() if not n.startswith("text_encoders.")}, str(tmp_path / "main.safetensors"))
    for comp in ("clip_l", "clip_g"):
        prefix = f"text_encoders.{comp}.transformer."
        save_file({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}, str(tmp_path / f"{comp}.safetensors"))
    with pytest.raises(ConversionError) as e:
        open_source(tmp_path / "main.safetensors", open_source(GOLDEN / SETS[0] / "keras").config,
                    {"clip_l": tmp_path / "clip_g.safetensors", "clip_g": tmp_path / "clip_l.safetensors"})
    message = str(e.value)
    assert "token_embedding.weight" in message and f"in {tmp_path / 'clip_g.safetensors'}" in message, message


def cast_f8(a: np.ndarray) -> np.ndarray:
    """Nearest float8-e4m3fn by table search (test-side, independent of the decoder's direction)."""
    table = to_float32(np.arange(256, dtype=np.uint8).view(F8_E4M3))
    finite = np.flatnonzero(np.isfinite(table))
    idx = finite[np.abs(table[finite][None, :] - np.clip(a, -448, 448).reshape(-1, 1)).argmin(1)]
    return idx.astype(np.uint8).reshape(a.shape).view(F8_E4M3)


@needs_golden
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_option_casts_and_keras_writes_bf16_like_keras(dtype, tmp_path, capsys):
    name = SETS[0]
    out, preset = tmp_path / "c.safetensors", tmp_path / "preset"
    status, stdout, _ = run_cmd(keras_to_safetensors, [GOLDEN / name / "keras", "-o", out, "--dtype", dtype], capsys)
    assert status == 0 and f"{dtype} x" in stdout
    assert run_cmd(safetensors_to_keras, [out, "-o", preset], capsys)[0] == 0
    with h5py.File(preset / "model.weights.h5", "r") as f:
        ds = f["layers/mm_di_t/layers/dense/vars/0"]
        if dtype == "bfloat16":
            assert ds.dtype == np.dtype("V2") and ds.attrs["dtype"] == "bfloat16"
        else:
            assert ds.dtype == np.float16
    assert json.loads((preset / "config.json").read_text())["config"]["dtype"]["config"]["name"] == dtype


@needs_golden
def test_inspect_reports_format_components_and_counts(capsys):
    name = SETS[0]
    sai = read_st(GOLDEN / name / "sai.safetensors")
    status, out, _ = run_cmd(inspect, [GOLDEN / name / "keras"], capsys)
    assert status == 0
    params = sum(a.size for a in sai.values())
    assert f"keras, {len(sai)} tensors, {params:,} parameters" in out and "config: {" in out


# -- full-size coverage without full-size files ---------------------------------------------------------

CLIP_L = CLIPConfig(49408, 768, 12, 12, 3072, "quick_gelu", 10)
CLIP_G = CLIPConfig(49408, 1280, 32, 20, 5120, "gelu", 30)
T5XXL = T5Config(32128, 4096, 24, 64, 10240, 64)
SD3_MEDIUM = SD3Config(1536, 24, 24, 192, clip_l=CLIP_L, clip_g=CLIP_G)
SD35_MEDIUM = SD3Config(1536, 24, 24, 384, mmdit_qk_norm="rms_norm", mmdit_dual_attention_indices=tuple(range(13)),
                        clip_l=CLIP_L, clip_g=CLIP_G)
SD35_LARGE = SD3Config(2432, 38, 38, 192, mmdit_qk_norm="rms_norm", clip_l=CLIP_L, clip_g=CLIP_G, t5=T5XXL)


@pytest.mark.parametrize("cfg,tsv", [(SD3_MEDIUM, "stable_diffusion_3_medium"), (SD35_MEDIUM, "stable_diffusion_3.5_medium")])
def test_keras_mapping_covers_the_real_kerashub_files(cfg, tsv):
    manifest = {}
    with gzip.open(MANIFESTS / f"kerashub_sd3_h5_manifest_{tsv}.tsv.gz", "rt") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line and not line.startswith("#"):
            path, shape, _ = line.split("\t")
            manifest[path] = tuple(json.loads(shape))
    ours = {}
    shapes = canonical.expected_shapes(cfg)
    for comp in canonical.present_components(cfg):
        for rule in keras_layout.rules(cfg, comp):
            ours.update(zip(rule.sources, rule.op.source_shapes(shapes[rule.canonical])))
    assert sorted(set(manifest) ^ set(ours)) == []
    assert [p for p in manifest if manifest[p] != ours[p]] == []


@pytest.mark.parametrize("cfg,comp,tensors,params", [
    (SD3_MEDIUM, "mmdit", 491, 2_084_951_104), (SD35_MEDIUM, "mmdit", 665, 2_469_663_936),
    (SD35_LARGE, "mmdit", 923, 8_146_280_768), (SD3_MEDIUM, "vae", 244, 83_819_683),
    (SD3_MEDIUM, "clip_g", 517, 694_659_840), (SD35_LARGE, "t5", 219, 4_762_310_656)])
def test_stability_key_sets_match_the_reference_counts(cfg, comp, tensors, params):
    shapes = canonical.component_shapes(cfg, comp)
    assert (len(shapes), sum(int(np.prod(s)) for s in shapes.values())) == (tensors, params)


def test_clip_l_without_projection_matches_the_reference_counts():
    shapes = canonical.component_shapes(SD3_MEDIUM, "clip_l")
    del shapes[canonical.CLIP_L_PROJECTION]
    assert (len(shapes), sum(int(np.prod(s)) for s in shapes.values())) == (196, 123_060_480)


@pytest.mark.parametrize("cfg", [SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE])
def test_every_layout_produces_exactly_the_canonical_set(cfg):
    """The three tables and the canonical definition cannot drift apart."""
    shapes = canonical.expected_shapes(cfg)
    for layout in (keras_layout, diffusers_layout):
        made = [r.canonical for comp in canonical.present_components(cfg) for r in layout.rules(cfg, comp)]
        assert len(made) == len(set(made)) and set(made) == set(shapes)


# -- bad inputs -----------------------------------------------------------------------------------------

def small_sai(tmp_path, edit=lambda t: t, name="in.safetensors") -> Path:
    tensors = edit(read_st(GOLDEN / SETS[0] / "sai.safetensors"))
    path = tmp_path / name
    with open(path, "wb") as f:
        write_safetensors(f, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()], {})
    return path


def no_leftovers(folder: Path, *allowed):
    assert sorted(p.name for p in folder.iterdir()) == sorted(allowed)


MISSING = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"


@needs_golden
@pytest.mark.parametrize("edit,names", [
    (lambda t: {k: v for k, v in t.items() if k != MISSING}, ["missing", MISSING]),
    (lambda t: {**t, "model.diffusion_model.bogus.weight": np.zeros(3, np.float32)}, ["unexpected", "bogus.weight"]),
    (lambda t: {**t, MISSING: t[MISSING][:, :-1]}, ["wrong shape", MISSING]),
    (lambda t: {**t, MISSING: t[MISSING].astype(np.int32)}, ["dtype", MISSING]),
])
def test_bad_tensor_sets_fail_with_one_line_and_no_output(edit, names, tmp_path, capsys):
    src = small_sai(tmp_path, edit)
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, src, *names)
    no_leftovers(tmp_path, "in.safetensors")


@needs_golden
@pytest.mark.parametrize("damage", ["truncate", "header", "text"])
def test_corrupt_safetensors_fail_cleanly(damage, tmp_path, capsys):
    src = small_sai(tmp_path)
    data = src.read_bytes()
    src.write_bytes({"truncate": data[: len(data) // 2], "header": data[:8] + b"{not json" + data[17:],
                     "text": b"hello, I am not a model\n"}[damage])
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, src)
    no_leftovers(tmp_path, "in.safetensors")


def _with_header(path, edit, tail=b""):
    """Rewrite a safetensors file's JSON header with ``edit(header)``, data unchanged, ``tail`` appended."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = edit(json.loads(data[8:8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:] + tail)


@needs_golden
@pytest.mark.parametrize("damage,words", [
    # what the safetensors library itself rejects: overlapping or gapped offsets, trailing bytes, non-string metadata
    (lambda h: {**h, MISSING: {**h[MISSING], "data_offsets": [0, h[MISSING]["data_offsets"][1] - h[MISSING]["data_offsets"][0]]}},
     "overlaps"),
    (lambda h: {**h, "__metadata__": {"sd3ref.config": {"not": "a string"}}}, "__metadata__"),
    (lambda h: {**h, MISSING: {**h[MISSING], "data_offsets": [float(v) for v in h[MISSING]["data_offsets"]]}}, MISSING),
    (lambda h: {**h, MISSING: {**h[MISSING], "data_offsets": [str(v) for v in h[MISSING]["data_offsets"]]}}, MISSING),
    (lambda h: {**h, "__metadata__": {"sd3ref.config": "[1, 2]"}}, "sd3ref.config"),
    (lambda h: {**h, "__metadata__": {"sd3ref.config": "{not json"}}, "sd3ref.config"),
    (None, "bytes after the last tensor"),
])
def test_malformed_safetensors_headers_fail_cleanly(damage, words, tmp_path, capsys):
    src = small_sai(tmp_path)
    _with_header(src, damage or (lambda h: h), tail=b"" if damage else b"\0" * 8)
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, src, words)
    no_leftovers(tmp_path, "in.safetensors")


@needs_golden
@pytest.mark.parametrize("edit,words", [
    (lambda c: c["config"].update(mmdit_num_layers="3"), "mmdit_num_layers '3' is not an integer"),
    (lambda c: c["config"].update(mmdit_num_layers=None), "mmdit_num_layers None is not an integer"),
    (lambda c: c["config"].pop("mmdit_num_layers"), "mmdit_num_layers"),
    (lambda c: c.clear() or c.update(config=[]), "config.json"),
])
def test_malformed_keras_configs_fail_cleanly(edit, words, tmp_path, capsys):
    preset = tmp_path / "preset"
    shutil.copytree(GOLDEN / SETS[0] / "keras", preset)
    config = json.loads((preset / "config.json").read_text())
    edit(config)
    (preset / "config.json").write_text(json.dumps(config))
    status, _, err = run_cmd(keras_to_safetensors, [preset, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, preset / "config.json", words)
    assert err.count(str(preset / "config.json")) == 1
    no_leftovers(tmp_path, "preset")


@needs_golden
def test_diffusers_components_are_never_dropped_silently_and_the_scheduler_is_read(tmp_path, capsys):
    name = "sd3"
    folder = tmp_path / "pipe"
    shutil.copytree(GOLDEN / name / "diffusers", folder)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 5.0}))
    assert open_source(folder).config.shift == 5.0
    for component in ("text_encoder_3", "vae"):
        config = folder / component / "config.json"
        saved = config.read_bytes()
        config.unlink()
        status, _, err = run_cmd(diffusers_to_safetensors, [folder, "-o", tmp_path / "out.safetensors"], capsys)
        assert_error(status, err, config, "missing")
        config.write_bytes(saved)
    shutil.rmtree(folder / "text_encoder_3")  # no folder: the usual way to run without T5
    assert open_source(folder).config.t5 is None
    (folder / "text_encoder" / "config.json").write_text("[]")
    status, _, err = run_cmd(diffusers_to_safetensors, [folder, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, folder / "text_encoder" / "config.json", "not a JSON object")
    no_leftovers(tmp_path, "pipe")


@needs_golden
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_h5_fails_cleanly(damage, tmp_path, capsys):
    preset = tmp_path / "preset"
    preset.mkdir()
    shutil.copy(GOLDEN / SETS[0] / "keras" / "config.json", preset)
    data = (GOLDEN / SETS[0] / "keras" / "model.weights.h5").read_bytes()
    h5 = preset / "model.weights.h5"
    h5.write_bytes(data[: len(data) // 3] if damage == "truncate" else data[:4096] + bytes(len(data) - 4096))
    status, _, err = run_cmd(keras_to_safetensors, [preset, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, h5)
    no_leftovers(tmp_path, "preset")


@needs_golden
def test_keras_h5_with_wrong_shape_names_the_dataset(tmp_path, capsys):
    preset = tmp_path / "preset"
    shutil.copytree(GOLDEN / SETS[0] / "keras", preset)
    path = "layers/mm_di_t/layers/dense/vars/0"
    with h5py.File(preset / "model.weights.h5", "a") as f:
        data = f[path][()]
        del f[path]
        f[path] = data[:-1]
    status, _, err = run_cmd(keras_to_safetensors, [preset, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, preset, path, "wrong shape")
    no_leftovers(tmp_path, "preset")


@needs_golden
def test_existing_output_needs_force_and_unwritable_output_fails(tmp_path, capsys):
    src = small_sai(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", out], capsys)
    assert_error(status, err, out, "--force")
    assert out.read_bytes() == b"keep me"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status, _, err = run_cmd(sai_to_safetensors, [src, "-o", locked / "out.safetensors"], capsys)
        if status == 0:
            pytest.skip("running as a user who can write anywhere")
        assert_error(status, err, locked)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", tmp_path / "nowhere" / "out.safetensors"], capsys)
    assert_error(status, err, "nowhere")


@needs_golden
def test_interrupt_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    src = small_sai(tmp_path)
    calls = []

    def interrupt(nbytes):
        calls.append(nbytes)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "Progress", lambda total, label: type("P", (), {"__call__": lambda s, n: interrupt(n),
                                                                           "close": lambda s: None})())
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", tmp_path / "out.safetensors"], capsys)
    assert status == 130 and len(calls) == 5
    no_leftovers(tmp_path, "in.safetensors")


@needs_golden
def test_force_never_deletes_what_the_command_does_not_write(tmp_path, capsys, monkeypatch):
    canon = tmp_path / "canon.safetensors"
    assert run_cmd(sai_to_safetensors, [small_sai(tmp_path), "-o", canon], capsys)[0] == 0
    # a folder with other files (here: the current folder, holding the input) is refused, untouched
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    status, _, err = run_cmd(safetensors_to_keras, [canon, "-o", ".", "--force"], capsys)
    assert_error(status, err, "the input")
    status, _, err = run_cmd(safetensors_to_keras, [canon, "-o", tmp_path / "new", "--force"], capsys)
    assert status == 0
    (tmp_path / "new" / "tokenizer.json").write_text("{}")  # e.g. a full KerasHub preset's assets
    status, _, err = run_cmd(safetensors_to_keras, [canon, "-o", tmp_path / "new", "--force"], capsys)
    assert_error(status, err, "tokenizer.json", "does not write")
    assert (tmp_path / "new" / "tokenizer.json").exists() and (tmp_path / "new" / "model.weights.h5").exists()
    # the output may not be an input, not even for a file converter with --force, nor a file of an input folder
    status, _, err = run_cmd(sai_to_safetensors, [canon, "-o", canon, "--force"], capsys)
    assert_error(status, err, "would replace the input")
    status, _, err = run_cmd(keras_to_safetensors, [tmp_path / "new", "-o", tmp_path / "new" / "config.json",
                                                    "--force"], capsys)
    assert_error(status, err, "would replace the input")
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["new"]


@needs_golden
def test_a_replaced_folder_survives_a_failed_move(tmp_path, capsys, monkeypatch):
    canon = tmp_path / "canon.safetensors"
    run_cmd(sai_to_safetensors, [small_sai(tmp_path), "-o", canon], capsys)
    preset = tmp_path / "preset"
    run_cmd(safetensors_to_keras, [canon, "-o", preset], capsys)
    old = {p.name: p.read_bytes() for p in preset.iterdir()}
    rename = os.rename

    def failing(src, dst):  # moving the old folder aside works, moving the new one in does not
        if Path(src).name.endswith(".tmp"):
            raise OSError(28, "No space left on device", str(dst))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    status, _, err = run_cmd(safetensors_to_keras, [canon, "-o", preset, "--force"], capsys)
    assert_error(status, err, "No space left")
    assert {p.name: p.read_bytes() for p in preset.iterdir()} == old
    no_leftovers(tmp_path, "canon.safetensors", "in.safetensors", "preset")


@needs_golden
def test_too_little_disk_space_is_refused_up_front(tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    src = small_sai(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", tmp_path / "out.safetensors"], capsys)
    assert_error(status, err, str(tmp_path), "not enough free space")
    no_leftovers(tmp_path, "in.safetensors")


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    # in a child process: were the handler missing, SIGTERM would end the test run itself
    import subprocess
    import sys

    script = f"""
import os, signal, sys, time
from pathlib import Path
from converters import cli
from converters.tensors import atomic_output

def run():
    with atomic_output(Path({str(tmp_path / "out.safetensors")!r}), False) as tmp:
        tmp.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

sys.exit(cli.reported(run))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and "terminated; no output written" in done.stderr, done.stderr
    no_leftovers(tmp_path)


@needs_golden
def test_a_cast_that_overflows_names_the_tensor(tmp_path, capsys):
    src = small_sai(tmp_path, lambda t: {**t, MISSING: np.full(t[MISSING].shape, 1e6, np.float32)})
    status, _, err = run_cmd(sai_to_safetensors, [src, "-o", tmp_path / "out.safetensors", "--dtype", "float16"], capsys)
    assert_error(status, err, src, MISSING, "float16's range")
    no_leftovers(tmp_path, "in.safetensors")


def test_outputs_get_the_usual_permissions(tmp_path, capsys):
    # written through a private temporary file, renamed: the result is as readable as a plain open's
    umask = os.umask(0o022)
    try:
        out = tmp_path / "out.safetensors"
        status, _, _ = run_cmd(sai_to_safetensors, [small_sai(tmp_path), "-o", out], capsys)
        assert status == 0 and out.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


# -- number formats -------------------------------------------------------------------------------------

def test_float8_e4m3fn_decoding_known_values():
    bits = np.array([0x00, 0x01, 0x07, 0x08, 0x38, 0x3C, 0x7E, 0xFE, 0x80, 0x7F, 0xFF], np.uint8)
    want = [0, 2**-9, 7 * 2**-9, 2**-6, 1.0, 1.5, 448, -448, -0.0]
    got = to_float32(bits.view(F8_E4M3))
    np.testing.assert_array_equal(got[:9], np.array(want, np.float32))
    assert np.isnan(got[9:]).all()


def test_bfloat16_rounding_known_values():
    x = np.array([1.0, -2.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, np.inf], np.float32)
    want = np.array([0x3F80, 0xC000, 0x3F80, 0x3F82, 0x3F81, 0x7F80], np.uint16)  # ties go to even
    np.testing.assert_array_equal(cast(x, BF16).view(np.uint16), want)
    assert cast(np.array([np.nan], np.float32), BF16).view(np.uint16)[0] & 0x7FC0 == 0x7FC0


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64))
def test_bfloat16_decode_encode_is_identity_on_non_nan_bits(raw):
    bits = np.array(raw, np.uint16)
    value = to_float32(bits.view(BF16))
    keep = ~np.isnan(value)
    np.testing.assert_array_equal(cast(value, BF16).view(np.uint16)[keep], bits[keep])
