"""sd3ref.compare against sd3ref itself with each known porting trap injected (sd3ref.traps): the first
divergent tensor and the cause must be named every time; correct runs in other layouts must pass."""

import functools
import json

import numpy as np
import pytest

from sd3ref import compare, trace, traps
from sd3ref.__main__ import main


@functools.lru_cache(maxsize=None)
def reference(set_name, dtype="float64"):
    run = traps.reference_run(set_name, dtype)
    return run, run.trace()


def expected_first(trap_id, config):
    """Where each trap first shows, from the architecture (execution order: T5, CLIP-L, CLIP-G,
    conditioning, MMDiT, VAE encoder, decoder)."""
    last = config.mmdit_num_layers - 1
    return {"eps": "clip_l.final_layer_norm",  # CLIP-L runs first; the final LN feeds only the pooled vector
            "gelu": "t5.layers.0.mlp",
            # the pre-only last context block's 2-chunk adaLN runs before the final layer's
            "shift_scale": f"mmdit.blocks.{last}.context.mod.shift_msa",
            "missing_t5": "cond.context",
            "context_tokens": "t5.embeddings",
            "pooled_projection": "cond.pooled",
            "timestep_rounding": "mmdit.timestep",
            "latent_order": "vae.from_latent",
            # the joint attention's output, the context stream's rows first
            "attention_scale": "mmdit.blocks.0.context.sdpa",
            "head_merge": "mmdit.blocks.0.context.sdpa",
            "split_attention": "mmdit.blocks.0.context.sdpa",
            "unpatchify_order": "mmdit.velocity",
            "qk_norm": "mmdit.blocks.0.context.q"}[trap_id]


CASES = [(s, t) for s in traps.SETS for t in traps.TRAPS]


@pytest.mark.parametrize("set_name,trap_id", CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_each_trap_is_found_and_named(set_name, trap_id):
    run, ours = reference(set_name)
    trap = traps.TRAPS[trap_id]
    if not trap.applies(run):
        pytest.skip(f"{trap_id} changes nothing in {set_name}")
    result = compare.compare(trap.inject(run).trace(), ours)
    v = result["verdict"]
    assert v is not None, "the broken run was not told apart"
    assert (v["first_divergent"], v["cause"]) == (expected_first(trap_id, run.model.config), trap.cause), v


def test_every_trap_is_exercised():
    applicable = {t for s in traps.SETS for t, trap in traps.TRAPS.items() if trap.applies(reference(s)[0])}
    assert applicable == set(traps.TRAPS)
    assert {t.cause for t in traps.TRAPS.values()} <= set(compare.CATALOGUE)


def test_rounded_timestep_found_from_the_sinusoid_alone():
    # A port that does not trace its timestep input: the rounding still shows, one tensor later.
    run, ours = reference("sd3")
    theirs = traps.TRAPS["timestep_rounding"].inject(run).trace()
    del theirs["mmdit.timestep"]
    v = compare.compare(theirs, ours)["verdict"]
    assert (v["first_divergent"], v["cause"]) == ("mmdit.t_freq", "timestep_rounding")


def _velocity_from(tokens, h, w, p, c, major, order):
    """The final layer's tokens (B, h·w, p·p·c) put back as a port might: tokens row- or column-major,
    each token's features in the given order of (p: row in patch, q: column, c: channel)."""
    B = tokens.shape[0]
    grid = tokens.reshape(B, h, w, -1) if major == "rows" else tokens.reshape(B, w, h, -1).transpose(0, 2, 1, 3)
    patches = grid.reshape(B, h, w, *[{"p": p, "q": p, "c": c}[a] for a in order])
    patches = patches.transpose(0, 1, 2, *[3 + order.index(a) for a in "pqc"])  # → (B, h, w, p, q, c)
    return patches.transpose(0, 1, 3, 2, 4, 5).reshape(B, h * p, w * p, c)


@pytest.mark.parametrize("major,order", [("rows", "qpc"), ("rows", "cpq"), ("columns", "pqc"), ("columns", "qpc"),
                                         ("columns", "cpq"), ("columns", "cqp")])
def test_every_unpatchify_slip_is_named(major, order):
    run, ours = reference("sd3")
    v, tokens = ours["mmdit.velocity"], ours["mmdit.final.linear"]
    B, H, W, C = v.shape
    p = run.model.config.mmdit_patch_size
    np.testing.assert_array_equal(_velocity_from(tokens, H // p, W // p, p, C, "rows", "pqc"), v)  # ours
    theirs = {**ours, "mmdit.velocity": _velocity_from(tokens, H // p, W // p, p, C, major, order)}
    verdict = compare.compare(theirs, ours)["verdict"]
    expected = "unpatchify_order" if (major, order) != ("columns", "cqp") else "unknown"  # not a listed slip
    assert (verdict["first_divergent"], verdict["cause"]) == ("mmdit.velocity", expected)


def test_heads_merged_per_stream_without_the_transpose_is_named():
    # the other form of head_merge: the joint output split per stream first, each reshaped without the transpose
    run, ours = reference("sd35")
    theirs = dict(ours)
    q, k, v = (np.concatenate([ours[f"mmdit.blocks.0.{s}.{t}"] for s in ("context", "x")], axis=2) for t in "qkv")
    heads, hd = q.shape[1], q.shape[3]
    out = compare._attend(q, k, v, 1.0 / np.sqrt(hd))
    lc = ours["mmdit.blocks.0.context.q"].shape[2]
    for stream, rows in (("context", slice(0, lc)), ("x", slice(lc, None))):
        part = np.ascontiguousarray(out[:, :, rows])
        theirs[f"mmdit.blocks.0.{stream}.sdpa"] = part.reshape(part.shape[0], -1, heads * hd)
    verdict = compare.compare(theirs, ours)["verdict"]
    assert (verdict["first_divergent"], verdict["cause"]) == ("mmdit.blocks.0.context.sdpa", "head_merge")


@pytest.mark.parametrize("set_name", traps.SETS)
def test_float32_run_agrees_with_the_float64_oracle(set_name):
    run, ours = reference(set_name)
    result = compare.compare(reference(set_name, "float32")[1], ours)
    assert result["rtol"] == compare.RTOL["float32"]
    assert result["verdict"] is None and result["compared"] == len(ours), compare.format_report(result)


def test_identical_traces_agree_at_float64_tolerance():
    _, ours = reference("sd35")
    result = compare.compare(dict(ours), ours)
    assert result["rtol"] == compare.RTOL["float64"] and result["verdict"] is None
    assert all(r["max_abs"] == 0 for r in result["rows"])


def _foreign_layouts(ours):
    """A correct trace written the way other code lays tensors out: NCHW images, token-major or merged
    q/k/v, fused Stability-order qkv, fused adaLN outputs with the final layer's in diffusers' (scale,
    shift) order, and its own name prefix."""
    theirs = {}
    for name, a in ours.items():
        if name.startswith("vae.") and a.ndim == 4:
            theirs[name] = a.transpose(0, 3, 1, 2)
        elif name.endswith((".x.q", ".x.k", ".x.v")):  # fused (B, L, 3·D), (3, heads, hd) feature order
            if name.endswith(".q"):
                parts = [ours[name[:-1] + p].transpose(0, 2, 1, 3) for p in "qkv"]
                B, L = parts[0].shape[:2]
                theirs[name[:-1] + "qkv"] = np.concatenate([p.reshape(B, L, -1) for p in parts], -1)
        elif name.endswith((".context.q", ".context.k")):
            theirs[name] = a.transpose(0, 2, 1, 3)  # token-major
        elif name.endswith(".context.v"):
            theirs[name] = a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1)  # merged heads
        elif name == "mmdit.final.mod.shift":
            theirs["mmdit.final.mod"] = np.concatenate([ours["mmdit.final.mod.scale"], a], -1)
        elif name == "mmdit.final.mod.scale":
            pass
        else:
            theirs[name] = a
    return {"port." + n: a for n, a in theirs.items()}


def test_layouts_and_names_are_aligned():
    _, ours = reference("sd35")
    mapping = {"rename": [[r"^port\.", ""]], "scale_shift": ["mmdit.final.mod"]}
    result = compare.compare(_foreign_layouts(ours), ours, mapping)
    assert result["verdict"] is None and not result["unmatched"], compare.format_report(result)
    assert result["compared"] == len(ours)
    layouts = {r["name"]: r["layout"] for r in result["rows"]}
    assert layouts["vae.decoder.out"] == "nchw" and layouts["mmdit.blocks.0.context.q"] == "token_major"
    assert layouts["mmdit.blocks.0.context.v"] == "merged_heads"
    # Without the (scale, shift) hint the final layer's chunks are read in Stability's order: the trap.
    del mapping["scale_shift"]
    v = compare.compare(_foreign_layouts(ours), ours, mapping)["verdict"]
    assert (v["first_divergent"], v["cause"]) == ("mmdit.final.mod.shift", "shift_scale")


def test_shape_mismatch_without_a_known_cause_is_a_layout_problem():
    _, ours = reference("sd3")
    theirs = dict(ours, **{"mmdit.x_embed": ours["mmdit.x_embed"][:, :-1]})
    v = compare.compare(theirs, ours)["verdict"]
    assert (v["first_divergent"], v["cause"]) == ("mmdit.x_embed", "layout")


def test_cli_exit_codes_and_json(tmp_path, capsys):
    run, ours = reference("sd3_no_t5")
    trace.save(ours, tmp_path / "ours.safetensors")
    trace.save(traps.TRAPS["missing_t5"].inject(run).trace(), tmp_path / "theirs.safetensors")
    assert main(["compare", str(tmp_path / "ours.safetensors"), str(tmp_path / "ours.safetensors")]) == 0
    assert "no divergence" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "theirs.safetensors"), str(tmp_path / "ours.safetensors"), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)["verdict"]
    assert (verdict["first_divergent"], verdict["cause"]) == ("cond.context", "missing_t5")


def test_unknown_layout_hints_and_mostly_unmatched_traces_are_reported(tmp_path, capsys):
    run, ours = reference("sd3_no_t5")
    trace.save(ours, tmp_path / "ours.safetensors")
    (tmp_path / "map.json").write_text(json.dumps({"layout": {"vae.*": "NCHW"}}))
    assert main(["compare", str(tmp_path / "ours.safetensors"), str(tmp_path / "ours.safetensors"),
                 "--map", str(tmp_path / "map.json")]) == 1
    assert "unknown layout hint(s) ['NCHW']" in capsys.readouterr().err
    few = dict(list(ours.items())[:5])  # a trace that covers a few of theirs only
    trace.save(few, tmp_path / "few.safetensors")
    main(["compare", str(tmp_path / "ours.safetensors"), str(tmp_path / "few.safetensors")])
    assert "warning: most of theirs" in capsys.readouterr().out


def test_a_small_qk_norm_change_is_eps_not_a_missing_norm():
    # q already RMS-normalised with unit weights (a fresh RMSNorm): re-normalising theirs would hide an eps
    # slip, so below the small-change bound the eps rule speaks
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 5, 8))
    ours = {"mmdit.blocks.0.x.q": q / np.sqrt(np.mean(q * q, axis=-1, keepdims=True) + 1e-6)}
    theirs = {"mmdit.blocks.0.x.q": ours["mmdit.blocks.0.x.q"] * (1 + 1e-3 * rng.random((1, 2, 5, 1)))}
    row = {"max_rel": 1e-3}
    assert compare.diagnose("mmdit.blocks.0.x.q", theirs, ours, row, 1e-10) == "eps"
    theirs = {"mmdit.blocks.0.x.q": q * 3.0}  # the raw projection: no qk-norm
    assert compare.diagnose("mmdit.blocks.0.x.q", theirs, ours, {"max_rel": 2.0}, 1e-10) == "qk_norm"


def test_two_float32_traces_get_twice_the_float32_tolerance():
    # each may sit verify's 1e-5 from the exact values, on opposite sides
    _, ours32 = reference("sd3_no_t5", "float32")
    assert compare.compare(dict(ours32), ours32)["rtol"] == 2 * compare.RTOL["float32"]
