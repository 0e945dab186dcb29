"""The known SD3 porting traps, injected one at a time into sd3ref itself.

Each ``TRAPS`` entry turns a correct run into the run of a port that fell into one trap: a config field, a
weight layout, an input, a convention or a function, switched exactly as a port would get it wrong.
``tests/test_compare.py`` traces every broken run and checks that ``sd3ref.compare`` names the first
divergent tensor and the trap. The same switches measure the size of each effect (the "Measured effects"
table of docs/conventions.md):

    python -m sd3ref.traps            # prints that table, float64, on the golden sets
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np

from converters import canonical

from . import conditioning, mmdit, nn, trace, vae, verify
from .model import Model

SETS = ("sd3", "sd35", "sd3_no_t5")
FINAL_ADALN = canonical.PREFIX["mmdit"] + "final_layer.adaLN_modulation.1."
LONG_T5 = 256  # diffusers' max_sequence_length


class SwappedHalves(Mapping):
    """Weights whose 2-chunk adaLN Linears (final layer, pre-only last context block) have their two
    output halves swapped: a diffusers → Stability converter that forgets AdaLayerNormContinuous'
    (scale, shift) order."""

    def __init__(self, weights: Mapping, config):
        self._weights = weights
        last = f"{canonical.PREFIX['mmdit']}joint_blocks.{config.mmdit_num_layers - 1}.context_block.adaLN_modulation.1."
        self._swapped = {p + s for p in (FINAL_ADALN, last) for s in ("weight", "bias")}

    def __getitem__(self, key):
        w = self._weights[key]
        return np.concatenate(np.split(np.asarray(w), 2, axis=0)[::-1], axis=0) if key in self._swapped else w

    def __iter__(self):
        return iter(self._weights)

    def __len__(self):
        return len(self._weights)


@contextlib.contextmanager
def _patched(module, name, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _replacing(module, name, replacement):
    """A trap's ``inject``: the run with ``module.name`` replaced while it runs."""
    return lambda run: dataclasses.replace(run, patch=lambda: _patched(module, name, replacement))


def _from_latent_shift_then_scale(z, config):
    """The slip: (z + shift)/scale instead of z/scale + shift."""
    z = (z + config.shift) / config.scale
    trace.record("vae.from_latent", z)
    return z


def _mmdit_attention(scale, merge_heads):
    """``mmdit._attention`` as a port may write it: ``scale(hd)`` for the logits, ``merge_heads(a, B, L)`` to
    turn (B, heads, L, hd) into (B, L, heads·hd)."""
    def attention(qkv):
        B, L, _, heads, hd = qkv.shape
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        return merge_heads(nn.attention(q, k, v, scale(hd)), B, L)
    return attention


def _right_scale(hd):
    return 1.0 / np.sqrt(hd)


def _merge_heads(a, B, L):
    return a.transpose(0, 2, 1, 3).reshape(B, L, -1)


def _merge_heads_without_transpose(a, B, L):  # the slip: (B, heads, L, hd) reshaped straight
    return np.ascontiguousarray(a).reshape(B, L, -1)


@contextlib.contextmanager
def _per_stream_attention():
    """The slip: each stream of a joint block attends only to its own tokens (attn2, image-only, unchanged)."""
    original_block, original_attention, split = mmdit.joint_block, mmdit._attention, []

    def block(w, config, context, *args, **kwargs):
        split.append(context.shape[1])  # the block's first attention is the joint one
        try:
            return original_block(w, config, context, *args, **kwargs)
        finally:
            split.clear()

    def attention(qkv):
        if not split:
            return original_attention(qkv)
        lc = split.pop()
        return np.concatenate([original_attention(qkv[:, :lc]), original_attention(qkv[:, lc:])], axis=1)

    with _patched(mmdit, "joint_block", block), _patched(mmdit, "_attention", attention):
        yield


def _unpatchify_channels_first(x, h, w, p, c):
    """The slip: each token's features read as (c, pi, pj) instead of (pi, pj, c)."""
    B = x.shape[0]
    return x.reshape(B, h, w, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(B, h * p, w * p, c)


def _sai_pooled_only():
    """The ``sai`` convention with diffusers' zero-token count: its pooled vector is the only change."""
    return _patched(conditioning, "MISSING_T5_TOKENS",
                    {**conditioning.MISSING_T5_TOKENS, "sai": conditioning.MISSING_T5_TOKENS["diffusers"]})


def _pad_t5(inputs, length=LONG_T5):
    """T5 ids padded with the pad id 0 to ``length``: diffusers' tokenization of the same prompt."""
    ids = inputs["tokens/t5"]
    return {**inputs, "tokens/t5": np.pad(ids, ((0, 0), (0, length - ids.shape[1])))}


@dataclass(frozen=True)
class Run:
    """One traced run: a model, its inputs and the conditioning convention."""
    model: Model
    inputs: dict
    convention: str = "diffusers"
    patch: Callable = contextlib.nullcontext  # a context manager that breaks a function for the run

    def trace(self) -> dict:
        with self.patch(), trace.tracing() as tensors:
            trace.run(self.model, self.inputs, self.convention)
        return tensors


def _config(run: Run, **fields) -> Run:
    """The run with config fields replaced; ``clip`` / ``t5`` fields go to both CLIPs / T5."""
    c = run.model.config
    clip = {k[5:]: v for k, v in fields.items() if k.startswith("clip_")}
    t5 = {k[3:]: v for k, v in fields.items() if k.startswith("t5_")}
    c = dataclasses.replace(c, clip_l=dataclasses.replace(c.clip_l, **clip),
                            clip_g=dataclasses.replace(c.clip_g, **clip),
                            t5=dataclasses.replace(c.t5, **t5) if t5 else c.t5)
    return dataclasses.replace(run, model=dataclasses.replace(run.model, config=c))


@dataclass(frozen=True)
class Trap:
    cause: str  # sd3ref.compare.CATALOGUE id
    what: str
    inject: Callable[[Run], Run]
    applies: Callable[[Run], bool] = lambda run: True  # whether the trap changes anything in this run


def _has_t5(run: Run) -> bool:
    return run.model.config.t5 is not None


TRAPS = {
    "eps": Trap("eps", "CLIP final LayerNorm eps 1e-5 → 1e-6 (KerasHub)",
                lambda r: _config(r, clip_final_layer_norm_epsilon=1e-6)),
    "gelu": Trap("gelu", "T5 GELU tanh → exact erf (KerasHub)",
                 lambda r: _config(r, t5_activation="gelu"), _has_t5),
    "shift_scale": Trap("shift_scale", "2-chunk adaLN halves not swapped by the converter",
                        lambda r: dataclasses.replace(r, model=dataclasses.replace(
                            r.model, weights=SwappedHalves(r.model.weights, r.model.config)))),
    "missing_t5": Trap("missing_t5", "no T5: 77 zero tokens (154, KerasHub) instead of 256 (333, diffusers)",
                       lambda r: dataclasses.replace(r, convention="keras"), lambda r: not _has_t5(r)),
    "context_tokens": Trap("context_tokens", "T5 on 256 tokens (diffusers) instead of 77",
                           lambda r: dataclasses.replace(r, inputs=_pad_t5(r.inputs)), _has_t5),
    "pooled_projection": Trap("pooled_projection", "CLIP-L pooled vector unprojected (Stability)",
                              lambda r: dataclasses.replace(r, convention="sai", patch=_sai_pooled_only)),
    "timestep_rounding": Trap("timestep_rounding", "timestep rounded to an integer",
                              lambda r: dataclasses.replace(r, inputs={**r.inputs, "mmdit/timestep": np.round(
                                  r.inputs["mmdit/timestep"])}),
                              lambda r: bool(np.any(np.round(t := r.inputs["mmdit/timestep"]) != t))),
    "attention_scale": Trap("attention_scale", "attention logits scaled by 1/hd instead of 1/√hd",
                            _replacing(mmdit, "_attention", _mmdit_attention(lambda hd: 1.0 / hd, _merge_heads))),
    "head_merge": Trap("head_merge", "attention heads merged by a reshape without the transpose",
                       _replacing(mmdit, "_attention", _mmdit_attention(_right_scale, _merge_heads_without_transpose))),
    "split_attention": Trap("split_attention", "context and image tokens attend only within their own stream",
                            lambda r: dataclasses.replace(r, patch=_per_stream_attention)),
    "qk_norm": Trap("qk_norm", "SD3.5's q / k RMSNorm left out",
                    lambda r: dataclasses.replace(r, model=dataclasses.replace(
                        r.model, config=dataclasses.replace(r.model.config, mmdit_qk_norm=None))),
                    lambda r: r.model.config.mmdit_qk_norm is not None),
    "unpatchify_order": Trap("unpatchify_order", "velocity patches read channels first",
                             _replacing(mmdit, "unpatchify", _unpatchify_channels_first)),
    "latent_order": Trap("latent_order", "decoder input (z + shift)/scale instead of z/scale + shift",
                         _replacing(vae, "from_latent", _from_latent_shift_then_scale)),
}


def reference_run(set_name: str, dtype="float64") -> Run:
    """The correct run on a golden set: diffusers' weights and convention, the golden inputs, KerasHub's
    77-token T5 ids (``context_tokens`` pads them to diffusers' 256)."""
    from .weights import load_weights

    set_dir = verify.GOLDEN / set_name
    weights, config = load_weights(str(set_dir / "diffusers"))
    weights = dict(weights)  # decoded once: the traps rerun the model many times
    inputs = verify.load_npz(set_dir / "inputs.npz")
    keras = verify.load_npz(set_dir / "keras_float32.npz")
    inputs.update({k: v for k, v in keras.items() if k.startswith("tokens/")})
    return Run(Model(config, weights, dtype), inputs)


# ---------------------------------------------------------------------------------------------------
# Measured effects (docs/conventions.md)


def _rel(a, b) -> float:
    """max|a − b| / max|b|, b the diffusers form."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def effects(set_name: str) -> dict:
    """Each convention switched alone against the diffusers form, float64, on one golden set: the rows of
    the "Measured effects" table (absent where a row does not apply, e.g. T5 rows without T5). The T5 ids
    are the golden 77-token ones except where the T5 length is the switched choice."""
    base = reference_run(set_name)
    m, inputs = base.model, base.inputs
    latents, t, ids_t5 = inputs["mmdit/latents"], inputs["mmdit/timestep"], inputs.get("tokens/t5")
    long_ids = _pad_t5(inputs)["tokens/t5"] if _has_t5(base) else None

    def cond(run: Run, convention="diffusers", ids_t5=ids_t5):
        with run.patch():
            return run.model.condition(inputs["tokens/clip_l"], inputs["tokens/clip_g"], ids_t5, convention)

    def velocity(run: Run, context, pooled, timestep=t):
        return run.model.mmdit(latents, timestep, context, pooled)

    ctx, pooled = cond(base)
    v = velocity(base, ctx, pooled)
    out = {"context_velocity": _rel(velocity(base, *cond(base, "keras")), velocity(base, *cond(base, ids_t5=long_ids)))}

    if _has_t5(base):
        short, long = m.t5(ids_t5), m.t5(long_ids)
        out["t5_length"] = _rel(short, long[:, :short.shape[1]])
    sai = TRAPS["pooled_projection"].inject(base)
    sai_ctx, sai_pooled = cond(sai, "sai")
    out["pooled_vector"] = _rel(sai_pooled, pooled)
    out["pooled_velocity"] = _rel(velocity(base, sai_ctx, sai_pooled), v)
    eps = TRAPS["eps"].inject(base)
    eps_ctx, eps_pooled = cond(eps)
    out["eps_pooled"], out["eps_velocity"] = _rel(eps_pooled, pooled), _rel(velocity(base, eps_ctx, eps_pooled), v)
    if _has_t5(base):
        gelu = TRAPS["gelu"].inject(base)
        out["gelu_t5"] = _rel(gelu.model.t5(ids_t5), short)
        out["gelu_velocity"] = _rel(velocity(base, *cond(gelu)), v)
    swapped = TRAPS["shift_scale"].inject(base)
    out["shift_scale_velocity"] = _rel(velocity(swapped, ctx, pooled), v)

    # The second step of the 28-step, shift-3 schedule: a typical non-integer timestep.
    from . import scheduler
    t1 = scheduler.timesteps(scheduler.sigmas(28, 3.0))[1]
    out["timestep"] = t1
    full = np.full_like(t, t1)
    out["timestep_velocity"] = _rel(velocity(base, ctx, pooled, np.round(full)), velocity(base, ctx, pooled, full))

    z = np.asarray(inputs["vae/z"], m.dtype)
    right = m.vae_decode(vae.from_latent(z, m.config.vae))
    out["latent_order_image"] = _rel(m.vae_decode(_from_latent_shift_then_scale(z, m.config.vae)), right)

    x01 = np.clip((m.vae_decode(z) + 1.0) / 2.0, 0.0, 1.0) * 255.0
    out["uint8_truncation"] = float(np.mean(np.round(x01).astype(np.uint8) != x01.astype(np.uint8)))
    return out


ROWS = [  # (key, switched choice, what is compared)
    ("context_velocity", "context: keras (77 + 77 T5 tokens, or 77 zeros) → diffusers (77 + 256 T5 tokens, "
                         "or 256 zeros)", "MMDiT velocity"),
    ("t5_length", "T5 run on 77 → 256 tokens (pads unmasked)", "T5 output at the first 77 tokens"),
    ("pooled_vector", "CLIP-L pooled projected → unprojected (sai)", "pooled vector"),
    ("pooled_velocity", "same", "MMDiT velocity"),
    ("eps_pooled", "CLIP final LayerNorm eps 1e-5 → 1e-6 (keras)", "pooled vector"),
    ("eps_velocity", "same", "MMDiT velocity"),
    ("gelu_t5", "T5 GELU tanh → exact erf (keras)", "T5 output"),
    ("gelu_velocity", "same", "MMDiT velocity"),
    ("shift_scale_velocity", "2-chunk adaLN read as (scale, shift) instead of (shift, scale)", "MMDiT velocity"),
    ("timestep_velocity", "timestep {timestep} → rounded {rounded}", "MMDiT velocity"),
    ("latent_order_image", "decode `(z + shift)/scale` instead of `z/scale + shift`", "decoded image"),
    ("uint8_truncation", "uint8 by truncation instead of rounding", "share of values that change (each by 1)"),
]


def _fmt(key, value) -> str:
    if value is None:
        return "—"
    if key == "uint8_truncation":
        return f"{100 * value:.1f} %"
    if value >= 1:
        return f"{value:.2f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"  # 2.1e-2, the docs' style


def effects_table(sets=SETS) -> str:
    measured = {s: effects(s) for s in sets}
    t1 = next(iter(measured.values()))["timestep"]
    lines = ["| Switched choice (one at a time) | What is compared | " + " | ".join(sets) + " |",
             "|---|---|" + "---|" * len(sets)]
    for key, what, compared in ROWS:
        what = what.format(timestep=f"{t1:.4f}", rounded=f"{round(t1)}")
        lines.append(f"| {what} | {compared} | " + " | ".join(_fmt(key, measured[s].get(key)) for s in sets) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(effects_table())
