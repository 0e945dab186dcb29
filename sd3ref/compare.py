"""Compare two traces and name the first divergence, with its likely cause.

    python -m sd3ref compare THEIRS.safetensors OURS.safetensors [--map mapping.json] [--rtol R] [--atol A] [--json]

OURS is the oracle's trace (``python -m sd3ref trace``); THEIRS is the port's (or a framework's, see
golden/trace_*.py), written under the names of docs/porting.md. Tensors are aligned by name, walked in
OURS' execution order, and each gets max |theirs − ours| and that over max |ours|. A tensor fails when
max abs > atol + rtol · max |ours|. Errors propagate, so only the FIRST failing tensor says where the port
goes wrong: it is named with the most likely cause from ``CATALOGUE``, the traps that SD3 ports fall into.

Layout differences are undone before comparing, from the shapes (or from ``layout`` hints in the map):
NCHW vs NHWC, token-major (B, L, heads, hd) or merged (B, L, heads·hd) vs head-major (B, heads, L, hd)
q/k/v, fused ``X.qkv`` (Stability's (3, heads, hd) feature order) vs ``X.q``/``X.k``/``X.v``, a fused
adaLN output ``X.mod`` (B, n·D) vs its chunks, and (scale, shift)-ordered 2-chunk modulations.

The map (JSON) renames THEIRS and gives hints:

    {"rename": [["^transformer\\\\.", "mmdit."], ...],     # regex substitutions on THEIRS' names, in order
     "layout": {"vae.*": "nchw", "mmdit.blocks.*.x.q": "token_major"},   # glob on OUR name → hint
     "scale_shift": ["mmdit.final.mod"]}                   # fused 2-chunk mods stored (scale, shift)
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import sys
from dataclasses import dataclass

import numpy as np

from . import nn
from .config import VAEConfig
from .verify import TOLERANCE as RTOL

LAYOUTS = ("identity", "nchw", "token_major", "merged_heads")
# SD3's latent normalisation constants (VAEConfig defaults; every SD3 / SD3.5 VAE uses them).
LATENT_SHIFT, LATENT_SCALE = VAEConfig().shift, VAEConfig().scale


# ---------------------------------------------------------------------------------------------------
# Alignment


def _relayout(a, shape, hint):
    """THEIRS' array in OUR layout, or None if ``hint`` does not produce ``shape``."""
    if hint == "identity":
        b = a
    elif hint == "nchw" and a.ndim == 4:
        b = a.transpose(0, 2, 3, 1)
    elif hint == "token_major" and a.ndim == 4:
        b = a.transpose(0, 2, 1, 3)
    elif hint == "merged_heads" and a.ndim == 3 and len(shape) == 4 and a.shape[-1] == shape[1] * shape[3]:
        b = a.reshape(a.shape[0], a.shape[1], shape[1], shape[3]).transpose(0, 2, 1, 3)
    else:
        return None
    return b if b.shape == tuple(shape) else None


def align(a, shape, hint=None):
    """(THEIRS' array in OUR layout, the layout used); with no hint the first layout whose shape fits
    (identity first). (a, None) when nothing fits: a shape mismatch."""
    for h in [hint] if hint else LAYOUTS:
        b = _relayout(a, shape, h)
        if b is not None:
            return b, h
    return a, None


def _split_fused(theirs: dict, ours: dict, scale_shift: list) -> dict:
    """THEIRS' fused ``X.qkv`` and ``X.mod`` tensors as the separate tensors OURS records."""
    out = {}
    for name, a in theirs.items():
        fused = re.fullmatch(r"(.*\.)qkv(2?)", name)
        if fused:  # parts recorded separately (e.g. q and k after a qk-norm) win over the fused projection
            stem, suffix = fused.groups()
            for part, chunk in zip("qkv", np.split(a, 3, axis=-1)):
                if stem + part + suffix not in theirs:
                    out[stem + part + suffix] = chunk
        elif name.endswith(".mod") and not any(n.startswith(name + ".") for n in theirs):
            chunks = [n for n in ours if n.startswith(name + ".")]  # in OUR order = Stability's order
            parts = np.split(a, len(chunks), axis=-1) if chunks else [a]
            if any(fnmatch.fnmatchcase(name, g) for g in scale_shift):
                parts = parts[::-1]
            out.update(zip(chunks, parts) if chunks else [(name, a)])
        else:
            out[name] = a
    return out


def apply_map(theirs: dict, ours: dict, mapping: dict | None) -> dict:
    """THEIRS renamed into OUR names, fused tensors split."""
    mapping = mapping or {}
    if not isinstance(mapping, dict):
        raise ValueError("the map is not a JSON object (keys: rename, layout, scale_shift)")
    unknown = sorted(set(mapping) - {"rename", "layout", "scale_shift"})
    if unknown:
        raise ValueError(f"unknown map keys {unknown} (rename, layout, scale_shift)")
    renamed = {}
    for name, a in theirs.items():
        for pattern, repl in mapping.get("rename", []):
            try:
                name = re.sub(pattern, repl, name)
            except re.error as e:
                raise ValueError(f"rename pattern {pattern!r}: {e}") from None
        renamed[name] = a
    return _split_fused(renamed, ours, mapping.get("scale_shift", []))


# ---------------------------------------------------------------------------------------------------
# The catalogue of traps


@dataclass(frozen=True)
class Trap:
    id: str
    title: str
    explanation: str


CATALOGUE = {t.id: t for t in [
    Trap("missing_t5", "zero tokens for a missing T5 (154 or 333 context tokens)",
         "Without T5, KerasHub and Stability append 77 zero tokens to the 77 CLIP tokens (154), diffusers "
         "appends max_sequence_length = 256 (333). The joint attention has no mask: every zero token "
         "takes part (conditioning.MISSING_T5_TOKENS)."),
    Trap("context_tokens", "T5 token count / context length",
         "KerasHub runs T5 on its preset's T5Preprocessor length (256 by default, 77 in some presets), "
         "diffusers on max_sequence_length (256 by default), Stability on max(77, prompt tokens + 1). T5 runs "
         "with an all-ones mask, so even the real tokens' outputs depend on the number of pads."),
    Trap("pooled_projection", "CLIP-L pooled vector not projected (or projected)",
         "KerasHub and diffusers multiply CLIP-L's final-LN EOS state by text_projection; Stability's "
         "reference feeds the unprojected EOS state (convention 'sai'). A Stability CLIP-L file has no "
         "projection; diffusers' single-file loader substitutes the identity."),
    Trap("timestep_rounding", "timestep rounded to an integer",
         "The MMDiT takes t = σ·1000 as a float (e.g. 987.3811). Rounding or truncating it, as DDPM-style "
         "code does, changes the sinusoid and the whole velocity."),
    Trap("sinusoid_order", "timestep sinusoid as [sin, cos] instead of [cos, sin]",
         "SD3's timestep embedding is cos first (flip_sin_to_cos=True in diffusers)."),
    Trap("shift_scale", "(shift, scale) read as (scale, shift)",
         "Stability's 2-chunk adaLN (final layer, pre-only last context block) is (shift, scale); diffusers' "
         "AdaLayerNormContinuous splits the same Linear as (scale, shift) and its converter swaps the halves "
         "of norm_out.linear and of the last block's norm1_context.linear. A converter that forgets the swap "
         "lands here."),
    Trap("latent_order", "latent scale / shift applied in the wrong order",
         "to_latent(z) = (z − 0.0609)·1.5305 after the VAE encoder, from_latent(z) = z/1.5305 + 0.0609 before "
         "the decoder; (z + shift)/scale or z·scale − shift is the classic slip."),
    Trap("attention_scale", "attention logits scaled by 1/hd, 1 or 1/√D instead of 1/√hd",
         "The attention output (before its output projection) is off while q, k and v agree, and it is what "
         "the right q, k, v give with another scale: SD3 scales q·k by 1/√(head dim), 1/8 for 64-wide heads, "
         "before the softmax (diffusers' scaled_dot_product_attention default, KerasHub's 1/√hd, Stability's "
         "optimized_attention)."),
    Trap("head_merge", "attention heads merged without moving the head axis",
         "The attention output is right value for value but in the wrong places: (B, heads, L, hd) was "
         "reshaped straight to (B, L, heads·hd). The head axis has to move next to hd first (transpose to "
         "(B, L, heads, hd), then merge)."),
    Trap("split_attention", "each stream attended only to its own tokens",
         "The attention output is what each stream gives attending to itself alone: MMDiT's attention is "
         "joint — the context and image tokens' q, k and v form one sequence [context; x] with no mask, and "
         "the output is split back per stream. (SD3.5's attn2 alone is image-only.)"),
    Trap("qk_norm", "q / k without their RMSNorm (SD3.5's ln_q, ln_k)",
         "Theirs, RMS-normalised over each head's hd values and scaled by a per-component weight, is ours: "
         "the port skipped SD3.5's qk-norm (per head RMSNorm with a learned weight, eps 1e-6, on q and k of "
         "both streams and of attn2) — or normalised where the model has none."),
    Trap("unpatchify_order", "velocity unpatchified in the wrong order",
         "The final layer's output agrees and the velocity holds its values in other places: each token's "
         "p·p·C features are ordered (row in the patch, column in the patch, channel) — (c, p, q) in diffusers' "
         "einsum 'nhwpqc->nchpwq' terms, channels last — and tokens row-major over the (h, w) grid."),
    Trap("gelu", "GELU variant (exact erf vs tanh approximation)",
         "The first tensor off is an MLP output while the attention before it agrees: the activation. T5 "
         "v1.1 uses tanh GELU in transformers (gelu_new) and Stability's code, exact erf GELU in KerasHub; "
         "the MMDiT uses tanh GELU; CLIP-L quick_gelu, CLIP-G exact GELU."),
    Trap("eps", "LayerNorm / RMSNorm epsilon",
         "A normalisation output is off by a small relative amount while its input agrees: the epsilon. "
         "KerasHub's CLIP final LayerNorm uses 1e-6, HF / Stability 1e-5; the MMDiT's LayerNorms and q/k "
         "RMSNorms use 1e-6, T5's RMSNorm 1e-6, the VAE's GroupNorm 1e-6."),
    Trap("layout", "shape mismatch",
         "The tensors have different shapes and no layout hint aligns them: a token count, a batch order "
         "or a layout the map does not describe (add a 'layout' hint or a 'rename')."),
    Trap("unknown", "no known trap matches",
         "Look at the operations between the last tensor that agrees and this one."),
]}

# Tensors whose float32 error is set by another tensor's magnitude: the sinusoid's argument t·f reaches
# t ≈ 1000 rad, so its absolute float32 error is ~ulp(1000) ≈ 6e-5 whatever the values. Their tolerance
# is relative to max |that tensor| instead of their own maximum.
SCALE_FROM = {"mmdit.t_freq": "mmdit.timestep"}

# Above this relative error a small-change trap (eps, GELU) is not a plausible cause.
SMALL = 1e-2


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    return float(np.abs(a - b).max(initial=0.0)) <= tol * max(float(np.abs(b).max(initial=0.0)), 1e-30)


def _attend(q, k, v, scale):
    """The attention of (B, heads, L, hd) arrays in float64 (``nn.attention``: its fast path bounds the logits'
    memory at real sizes)."""
    return nn.attention(*(np.asarray(t, np.float64) for t in (q, k, v)), scale)


def _attention_cause(name, a, ours, tol):
    """Which attention slip turns OUR q, k, v of the block into THEIR attention output ``a`` (B, L, heads·hd):
    a scale, a head merge without the transpose, or per-stream instead of joint attention."""
    block, stream, leaf = name.rsplit(".", 2)
    n = "2" if leaf == "sdpa2" else ""
    streams = [s for s in ("context", "x") if f"{block}.{s}.q{n}" in ours] if not n else ["x"]
    if stream not in streams or not all(f"{block}.{s}.{t}{n}" in ours for s in streams for t in "qkv"):
        return None
    q, k, v = (np.concatenate([ours[f"{block}.{s}.{t}{n}"] for s in streams], axis=2) for t in "qkv")
    B, heads, _, hd = q.shape
    start = sum(ours[f"{block}.{s}.q{n}"].shape[2] for s in streams[:streams.index(stream)])
    rows = slice(start, start + ours[f"{block}.{stream}.q{n}"].shape[2])

    def merged(o):  # (B, heads, L, hd) → this stream's (B, L, heads·hd)
        return o[:, :, rows].transpose(0, 2, 1, 3).reshape(B, -1, heads * hd)

    for scale in (1.0 / hd, 1.0, 1.0 / math.sqrt(heads * hd)):
        if _close(a, merged(_attend(q, k, v, scale)), tol):
            return "attention_scale"
    right = _attend(q, k, v, 1.0 / math.sqrt(hd))
    # reshaped without the transpose, the joint sequence then split, or each stream's part
    if any(_close(a, m, tol) for m in (right.reshape(B, -1, heads * hd)[:, rows],
                                        right[:, :, rows].reshape(B, -1, heads * hd))):
        return "head_merge"
    if len(streams) > 1:
        own = [ours[f"{block}.{stream}.{t}{n}"] for t in "qkv"]
        if _close(a, _attend(*own, 1.0 / math.sqrt(hd)).transpose(0, 2, 1, 3).reshape(B, -1, heads * hd), tol):
            return "split_attention"
    return None


def _rms_scaled(theirs, ours, tol) -> bool:
    """Whether ``ours`` (B, heads, L, hd) is ``theirs`` RMS-normalised over hd times a weight per hd component
    (fitted by least squares), or the other way round: one side has a qk-norm the other lacks."""
    for x, y in ((theirs, ours), (ours, theirs)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        n = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        axes = tuple(range(n.ndim - 1))
        weight = (n * y).sum(axes) / np.maximum((n * n).sum(axes), 1e-30)
        if _close(n * weight, y, tol):
            return True
    return False


def _unpatchify_slip(v, tokens, tol) -> bool:
    """Whether THEIR velocity ``v`` (B, H, W, C) is OUR final-layer ``tokens`` (B, h·w, p·p·C) put back with the
    features read as (C, p, p) or with the patch's rows and columns exchanged, or with tokens column-major."""
    B, H, W, C = v.shape
    p = math.isqrt(tokens.shape[-1] // C) if tokens.shape[-1] % C == 0 else 0
    if p == 0 or p * p * C != tokens.shape[-1] or H % p or W % p:
        return False
    h, w = H // p, W // p
    for major, grid in (("rows", tokens.reshape(B, h, w, -1)),
                        ("columns", tokens.reshape(B, w, h, -1).transpose(0, 2, 1, 3))):
        features = {"pqc": grid.reshape(B, h, w, p, p, C),  # (row in patch, column in patch, channel)
                    "qpc": grid.reshape(B, h, w, p, p, C).transpose(0, 1, 2, 4, 3, 5),
                    "cpq": grid.reshape(B, h, w, C, p, p).transpose(0, 1, 2, 4, 5, 3)}
        for order, patches in features.items():
            if (major, order) == ("rows", "pqc"):
                continue  # ours
            if _close(v, patches.transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C), tol):
                return True
    return False


def diagnose(name: str, theirs: dict, ours: dict, row: dict, rtol: float) -> str:
    """The id of the likely trap behind the first divergent tensor ``name``.
    ``theirs`` is THEIRS renamed and aligned (as far as it goes), ``ours`` OURS."""
    a, b = theirs[name], ours[name]
    # A trap's prediction need only match to the precision of the run (a float32 port accumulates ~1e-6);
    # the alternatives are off by O(1).
    tol = max(10 * rtol, 1e-4)
    leaf = name.rsplit(".", 1)[-1]
    if a.shape != b.shape:
        token_axis_only = a.ndim == b.ndim == 3 and a.shape[::2] == b.shape[::2]
        if token_axis_only and name == "cond.context" and not np.any(a[:, 77:]) and not np.any(b[:, 77:]):
            return "missing_t5"  # beyond the 77 CLIP tokens, both are all zeros: the stand-in for T5
        if token_axis_only and name.startswith(("t5.", "cond.context", "mmdit.context_embed")):
            return "context_tokens"
        return "layout"
    if ".mod." in name and ("shift" in leaf or "scale" in leaf):
        partner = name[:-len(leaf)] + leaf.replace("shift", "@").replace("scale", "shift").replace("@", "scale")
        if partner in ours and _close(a, ours[partner], tol):
            return "shift_scale"
    if name == "mmdit.timestep":
        if any(_close(a, f(b), tol) for f in (np.round, np.floor, np.trunc)):
            return "timestep_rounding"
    if name == "mmdit.t_freq" and "mmdit.timestep" in ours:
        from .mmdit import timestep_embedding

        t = np.asarray(ours["mmdit.timestep"], np.float64)
        if any(_close(a, timestep_embedding(f(t), b.shape[-1]), tol) for f in (np.round, np.floor)):
            return "timestep_rounding"
        if _close(a, np.concatenate(np.split(b, 2, axis=-1)[::-1], axis=-1), tol):
            return "sinusoid_order"
    if name in ("cond.pooled", "clip_l.pooled"):
        for x, y in ((theirs, ours), (ours, theirs)):  # either side may be the unprojected one
            eos = y.get("clip_l.eos")
            if eos is not None and _close(x[name][..., :eos.shape[-1]], eos, tol):
                return "pooled_projection"
    if name == "vae.from_latent":
        z = (np.asarray(b, np.float64) - LATENT_SHIFT) * LATENT_SCALE
        if any(_close(a, f(z), tol) for f in (lambda z: (z + LATENT_SHIFT) / LATENT_SCALE,
                                               lambda z: (z - LATENT_SHIFT) / LATENT_SCALE,
                                               lambda z: z * LATENT_SCALE + LATENT_SHIFT)):
            return "latent_order"
    if name == "vae.to_latent":
        z = np.asarray(b, np.float64) / LATENT_SCALE + LATENT_SHIFT
        if any(_close(a, f(z), tol) for f in (lambda z: z * LATENT_SCALE - LATENT_SHIFT,
                                               lambda z: (z + LATENT_SHIFT) * LATENT_SCALE,
                                               lambda z: z / LATENT_SCALE - LATENT_SHIFT)):
            return "latent_order"
    if name == "mmdit.velocity" and "mmdit.final.linear" in ours:
        if _unpatchify_slip(a, ours["mmdit.final.linear"], tol):
            return "unpatchify_order"
    # A missing qk-norm is an O(1) change; below SMALL the eps rule is the candidate (re-normalising a q that
    # is already normalised would hide an eps slip when the weights are near uniform).
    if leaf in ("q", "k", "q2", "k2") and name.startswith("mmdit.") and row["max_rel"] >= SMALL \
            and _rms_scaled(a, b, tol):
        return "qk_norm"
    if leaf in ("sdpa", "sdpa2"):
        cause = _attention_cause(name, a, ours, tol)
        if cause:
            return cause
    small = row["max_rel"] < SMALL
    if leaf == "mlp" and small:
        return "gelu"
    if small and ("norm" in leaf or leaf in ("q", "k", "q2", "k2")):
        return "eps"
    return "unknown"


# ---------------------------------------------------------------------------------------------------
# Comparison


def compare(theirs: dict, ours: dict, mapping: dict | None = None, rtol=None, atol=0.0) -> dict:
    """Rows in OURS' execution order and the verdict. ``rtol`` defaults to verify's tolerance for the less
    precise trace: 1e-10 when both are float64, 1e-5 when one is float32 (against the float64 oracle), and
    twice that when both are: each float32 run may sit 1e-5 from the exact values, on opposite sides (two
    float32 traces of sd3_no_t5, diffusers' and sd3ref's, differ by 1.1e-5 at mmdit.t_embed: the
    sinusoid's float32 error ~ ulp(1000), through the MLP)."""
    theirs = apply_map(theirs, ours, mapping)
    if rtol is None:
        def lowest(trace):  # the smallest float width among a trace's tensors
            return min((np.asarray(a).dtype.itemsize for a in trace.values()
                        if np.issubdtype(np.asarray(a).dtype, np.floating)), default=8)
        widths = (lowest(theirs), lowest(ours))
        rtol = RTOL["float64"] if min(widths) >= 8 else RTOL["float32"] * (2 if max(widths) < 8 else 1)
    layouts = (mapping or {}).get("layout", {})
    bad = sorted({h for h in layouts.values() if h not in LAYOUTS})
    if bad:
        raise ValueError(f"unknown layout hint(s) {bad}; expected one of {LAYOUTS}")
    aligned, rows, first = {}, [], None
    for name, b in ours.items():
        row = {"name": name, "shape": list(np.shape(b))}
        if name not in theirs:
            rows.append({**row, "status": "missing"})
            continue
        hint = next((h for g, h in layouts.items() if fnmatch.fnmatchcase(name, g)), None)
        a, layout = align(np.asarray(theirs[name]), np.shape(b), hint)
        aligned[name] = a
        row["layout"] = layout
        if layout is None:
            row.update(their_shape=list(a.shape), max_abs=float("inf"), max_rel=float("inf"), status="FAIL")
        else:
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            max_abs = float(np.abs(a64 - b64).max(initial=0.0))
            scale = float(np.abs(b64).max(initial=0.0))
            by = next((name[:-len(k)] + v for k, v in SCALE_FROM.items() if name.endswith(k)), None)
            tol_scale = max(scale, float(np.abs(np.asarray(ours[by], np.float64)).max())) if by in ours else scale
            ok = bool(np.isfinite(a64).all()) and max_abs <= atol + rtol * tol_scale
            row.update(max_abs=max_abs, max_rel=max_abs / scale if scale > 0 else max_abs,
                       tolerance=atol + rtol * tol_scale, status="ok" if ok else "FAIL")
        rows.append(row)
        if row["status"] == "FAIL" and first is None:
            first = row
    verdict = None
    if first is not None:
        trap = CATALOGUE[diagnose(first["name"], {**theirs, **aligned}, ours, first, rtol)]
        verdict = {"first_divergent": first["name"], "max_rel": first["max_rel"], "cause": trap.id,
                   "title": trap.title, "explanation": trap.explanation}
    return {"rtol": rtol, "atol": atol, "rows": rows, "verdict": verdict,
            "compared": sum(r["status"] != "missing" for r in rows),
            "unmatched": [n for n in theirs if n not in ours]}


def format_report(result: dict) -> str:
    head = f"{'tensor':<44} {'shape':<20} {'max abs':>9} {'max rel':>9}  status"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        if r["status"] == "missing":
            continue
        shape = "x".join(map(str, r["shape"]))
        if "their_shape" in r:
            shape += " vs " + "x".join(map(str, r["their_shape"]))
        layout = f" ({r['layout']})" if r.get("layout") not in (None, "identity") else ""
        lines.append(f"{r['name']:<44} {shape:<20} {r['max_abs']:9.2e} {r['max_rel']:9.2e}  {r['status']}{layout}")
    missing = [r["name"] for r in result["rows"] if r["status"] == "missing"]
    lines.append(f"{result['compared']} tensors compared (rtol {result['rtol']:g}, atol {result['atol']:g}); "
                 f"{len(missing)} of ours not in theirs; {len(result['unmatched'])} of theirs unmatched"
                 + (f": {', '.join(result['unmatched'][:8])}" + (" ..." if len(result["unmatched"]) > 8 else "")
                    if result["unmatched"] else ""))
    if len(result["unmatched"]) > result["compared"]:
        lines.append(f"warning: most of theirs ({len(result['unmatched'])}) is unmatched: are the two files in the "
                     "order THEIRS OURS, and is a --map needed for their names?")
    v = result["verdict"]
    if v is None:
        lines.append("no divergence" if result["compared"] else "nothing compared: check the names (--map)")
    else:
        lines += [f"FIRST DIVERGENCE: {v['first_divergent']} (max rel {v['max_rel']:.2e})",
                  f"likely cause [{v['cause']}]: {v['title']}", f"  {v['explanation']}"]
    return "\n".join(lines)


def main(args) -> int:
    """``python -m sd3ref compare``."""
    from .trace import load

    theirs, _ = load(args.theirs)
    ours, _ = load(args.ours)
    mapping = None
    if args.map:
        with open(args.map) as f:
            try:
                mapping = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                print(f"error: {args.map}: not JSON ({e})", file=sys.stderr)
                return 1
    try:
        result = compare(theirs, ours, mapping, args.rtol, args.atol)
    except ValueError as e:  # a map the comparison cannot use
        print(f"error: {args.map}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0 if result["compared"] and result["verdict"] is None else 1
