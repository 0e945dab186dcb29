"""Assembling the MMDiT's (context, pooled) from the text-encoder outputs.

Three conventions are in use (docs/conventions.md has their measured effect):

``keras``      KerasHub: 77 CLIP tokens, then the T5 output, or 77 zero tokens without T5 (154 tokens).
``diffusers``  diffusers: 77 CLIP tokens, then the T5 output (``max_sequence_length``, 256 by default), or
               as many zero tokens without T5 (333 tokens by default).
``sai``        Stability's reference: as ``keras`` (its tokenizer pads T5 to at least 77 tokens), but the
               CLIP-L pooled vector is the final-LN EOS state, NOT projected by ``text_projection``.

Zero tokens are not inert: the context embedder maps them to its bias and they take part in the joint
attention, so the token count changes the output.
"""

from __future__ import annotations

import numpy as np

from . import trace

CONVENTIONS = ("keras", "diffusers", "sai")
# Zero tokens that stand in for a missing T5.
MISSING_T5_TOKENS = {"keras": 77, "diffusers": 256, "sai": 77}


def condition(clip_l: dict, clip_g: dict, t5=None, convention="keras", context_dim=4096, t5_length=None):
    """clip_l, clip_g: outputs of ``clip.encode``; t5: (B, L5, context_dim) or None
    → context (B, 77 + L5 or 77 + zeros, context_dim), pooled (B, D_l + D_g). ``t5_length``: diffusers'
    ``max_sequence_length``, which is also its zero-token count without T5 (KerasHub and Stability always
    use 77 zero tokens)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
    lg = np.concatenate([clip_l["intermediate"], clip_g["intermediate"]], axis=-1)  # (B, 77, D_l + D_g)
    B, L, D = lg.shape
    if D > context_dim:
        raise ValueError(f"CLIP features ({D}) are wider than the context ({context_dim})")
    lg = np.pad(lg, ((0, 0), (0, 0), (0, context_dim - D)))  # zero-pad features on the right
    if t5 is None:
        zeros = t5_length if convention == "diffusers" and t5_length is not None else MISSING_T5_TOKENS[convention]
        t5 = np.zeros((B, zeros, context_dim), lg.dtype)
    context = np.concatenate([lg, np.asarray(t5, lg.dtype)], axis=1)

    pooled_l = clip_l["eos"] if convention == "sai" else clip_l["pooled"]
    pooled = np.concatenate([pooled_l, clip_g["pooled"]], axis=-1)
    trace.record("cond.context", context)
    trace.record("cond.pooled", pooled)
    return context, pooled
