"""A thin convenience namespace over the component functions.

The real API is the functions (``clip.encode``, ``t5.encode``, ``mmdit.forward``, ``vae.encode`` ...)
over a weight mapping; ``Model`` only remembers the config, the weights, the compute dtype and where each
component's weights live in the canonical (Stability single-file) key space.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from converters import canonical  # the one table of canonical names; PREFIX is read at call time

from . import clip, conditioning, mmdit, t5, vae
from .config import SD3Config
from .nn import Scope


def _scope(weights, component: str) -> Scope:
    """The weights of one component, by its prefix in the canonical (Stability single-file) key space."""
    return Scope(weights, canonical.PREFIX[component])


@dataclass(frozen=True)
class Model:
    config: SD3Config
    weights: Mapping  # canonical key → array (float16/32/64, possibly memory-mapped)
    dtype: str = "float32"  # compute dtype: "float32" or "float64"

    def clip_l(self, token_ids) -> dict:
        return clip.encode(_scope(self.weights, "clip_l"), self.config.clip_l, token_ids, self.dtype, "clip_l")

    def clip_g(self, token_ids) -> dict:
        return clip.encode(_scope(self.weights, "clip_g"), self.config.clip_g, token_ids, self.dtype, "clip_g")

    def t5(self, token_ids):
        if self.config.t5 is None:
            raise ValueError("this model has no T5 encoder")
        return t5.encode(_scope(self.weights, "t5"), self.config.t5, token_ids, self.dtype)

    def condition(self, ids_l, ids_g, ids_t5=None, convention="keras", t5_length=None):
        """Token ids → (context, pooled) in the given convention (see ``conditioning``).
        Without ``ids_t5`` (or without a T5 encoder) the convention's zero tokens stand in for T5
        (``t5_length`` of them under diffusers: its max_sequence_length)."""
        t5_out = self.t5(ids_t5) if ids_t5 is not None and self.config.t5 is not None else None
        return conditioning.condition(self.clip_l(ids_l), self.clip_g(ids_g), t5_out, convention,
                                      self.config.mmdit_context_dim, t5_length)

    def mmdit(self, latents, timestep, context, pooled):
        """NHWC latents, timestep σ·1000 (B,) → NHWC velocity."""
        return mmdit.forward(_scope(self.weights, "mmdit"), self.config, latents, timestep, context, pooled,
                             self.dtype)

    def vae_encode(self, image):
        """NHWC image in [-1, 1] → (mean, logvar) in VAE latent space (before ``vae.to_latent``)."""
        return vae.encode(_scope(self.weights, "vae"), self.config.vae, image, self.dtype)

    def vae_decode(self, z):
        """VAE-space latent (after ``vae.from_latent``) → NHWC image, roughly in [-1, 1]."""
        return vae.decode(_scope(self.weights, "vae"), self.config.vae, z, self.dtype)


def load(source, dtype="float32", config=None, cache_gb=0.0, encoders=None) -> Model:
    """Load a KerasHub preset folder, a diffusers folder or a Stability / canonical .safetensors file.

    ``config`` (an SD3Config, a KerasHub config.json, a diffusers folder or an SD3Config JSON file) is only
    needed for a Stability file without sd3ref metadata whose head counts differ from Stability's 64-wide
    heads: shapes cannot tell head counts.

    ``encoders`` ({"clip_l" | "clip_g" | "t5": path}) adds Stability's separate text-encoder files.
    ``cache_gb`` > 0 keeps up to that many GB of MMDiT weights upcast to ``dtype`` after their first use
    (``weights.UpcastCache``), for runs that call the MMDiT many times."""
    from .weights import UpcastCache, load_weights  # h5py and safetensors are only needed here

    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"compute dtype must be float32 or float64, not {dtype}")
    weights, config = load_weights(source, config=config, encoders=encoders)
    if cache_gb > 0:
        weights = UpcastCache(weights, canonical.PREFIX["mmdit"], dtype, int(cache_gb * 2**30))
    return Model(config, weights, np.dtype(dtype).name)
