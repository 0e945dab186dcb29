"""Stability single files (``sd3_medium*.safetensors``, ``sd3.5_*.safetensors``) and their separate
text-encoder files. Their names *are* the canonical names; a separate encoder file holds the same
keys without the ``text_encoders.<name>.transformer.`` prefix, which the reader adds back.
"""

from __future__ import annotations

import re

from sd3ref.config import SD3Config

from .canonical import component_shapes
from .rules import Rule

# Keys real files carry that hold nothing we need: reported, then dropped.
KNOWN_EXTRAS = [
    (re.compile(r"text_encoders\.clip_[lg]\.(transformer\.)?logit_scale$"), "CLIP logit_scale (contrastive training only)"),
    (re.compile(r"text_encoders\.clip_[lg]\.transformer\.text_model\.embeddings\.position_ids$"), "CLIP position ids (a buffer: arange)"),
    (re.compile(r"text_encoders\.t5xxl\.transformer\.encoder\.embed_tokens\.weight$"), "T5 encoder.embed_tokens (tied to shared.weight)"),
]


def known_extra(name: str) -> str | None:
    for pattern, why in KNOWN_EXTRAS:
        if pattern.match(name):
            return why
    return None


def rules(cfg: SD3Config, comp: str) -> list[Rule]:
    return [Rule(name, (name,)) for name in component_shapes(cfg, comp)]
