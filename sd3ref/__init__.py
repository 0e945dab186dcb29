"""sd3ref: a framework-free NumPy reference implementation of Stable Diffusion 3 / 3.5."""

from . import clip, conditioning, mmdit, nn, scheduler, t5, vae
from .config import CLIPConfig, SD3Config, T5Config, VAEConfig
from .model import Model, load

__all__ = ["load", "Model", "SD3Config", "CLIPConfig", "T5Config", "VAEConfig",
           "clip", "t5", "mmdit", "vae", "scheduler", "conditioning", "nn"]
