"""Named intermediate activations, for diffing a port against sd3ref (docs/porting.md).

Components call ``record(name, array)`` at every point a porter may want to compare. It returns at once
unless a ``tracing()`` context is active — one global read, no copy, no conversion — so a run without
tracing costs nothing measurable: ``tests/test_trace.py`` checks that ``record`` does not touch its
argument when off, ``python -m bench.trace`` times an MMDiT forward with ``record`` as it is and as a
no-op function (the name strings built at the call sites are included in both).

    with sd3ref.trace.tracing("ours.safetensors") as tensors:   # dict name -> array, execution order
        model.mmdit(latents, t, context, pooled)

The file is a plain safetensors file; its metadata holds the execution order (safetensors itself sorts
names), so ``load`` returns the tensors in the order they were computed. Names are stable and documented,
with the matching module of diffusers, KerasHub and Stability's reference code, in docs/porting.md.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np

# The one safetensors metadata key: JSON {"order": names in execution order, ...caller's metadata}.
# One key, because safetensors writes a metadata map in random key order and traces must be bit-identical.
META_KEY = "sd3ref.trace"

_active: dict | None = None
_prefix = ""


def record(name: str, array) -> None:
    if _active is None:
        return
    full = _prefix + name
    if full in _active:
        # Silently overwriting would pair the wrong tensors in a comparison: a second call of a component
        # inside one trace needs its own scope (e.g. one per denoising step).
        raise KeyError(f"trace name recorded twice: {full}")
    _active[full] = np.array(array, copy=True)


@contextlib.contextmanager
def scope(name: str):
    """Prefix the names recorded inside with ``name.`` (e.g. ``step3`` for a denoising step)."""
    global _prefix
    outer = _prefix
    _prefix = f"{outer}{name}."
    try:
        yield
    finally:
        _prefix = outer


@contextlib.contextmanager
def tracing(path=None, metadata: dict | None = None):
    """Record every named intermediate computed inside; yields the dict being filled.
    With ``path``, the tensors are written there (``save``) when the block ends without an error."""
    global _active
    if _active is not None:
        raise RuntimeError("tracing() is already active")
    _active = tensors = {}
    try:
        yield tensors
    finally:
        _active = None
    if path is not None:
        save(tensors, path, metadata)


def _write(tensors: dict, path, metadata: dict | None) -> None:
    """Write a trace (name -> array) as safetensors, keeping the order of ``tensors`` in the metadata."""
    from converters.tensors import write_safetensors

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta = {META_KEY: json.dumps({"order": list(tensors), **meta})}
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with open(path, "wb") as f:
        write_safetensors(f, [(k, a.shape, a.dtype, lambda a=a: a) for k, a in arrays.items()], meta)


def save(tensors: dict, path, metadata: dict | None = None) -> None:
    """``_write`` through a temporary file: never a half-written trace."""
    from pathlib import Path

    from converters.tensors import atomic_output

    with atomic_output(Path(path), force=True) as tmp:
        _write(tensors, tmp, metadata)


def load(path) -> tuple[dict, dict]:
    """(tensors in execution order, metadata) of a trace file. A file written by other tools (no order
    metadata) comes back in the file's own order."""
    from converters.tensors import BF16, F8_E4M3, FormatError, SafetensorsFile, to_float32

    f = SafetensorsFile(path)  # a bad file is one FormatError naming it
    metadata = dict(f.metadata)
    try:
        metadata.update(json.loads(metadata.pop(META_KEY, "{}")))
    except json.JSONDecodeError:
        raise FormatError(f"{path}: metadata {META_KEY} is not JSON") from None
    names = list(f.tensors)
    order = metadata.pop("order", [])
    names = [n for n in order if n in names] + [n for n in names if n not in order]
    # bfloat16 / float8 are stored as their bits (numpy has no such float): decoded to float32 here
    return {n: to_float32(f.read(n)) if f.tensors[n].dtype in (BF16, F8_E4M3) else np.array(f.read(n))
            for n in names}, metadata


def run(model, inputs: dict, convention="diffusers") -> None:
    """The traced run of ``python -m sd3ref trace`` and of golden/trace_*.py: every component on the
    golden input keys that ``inputs`` holds (NHWC), in pipeline order:
    ``tokens/{clip_l,clip_g,t5}`` → text encoders and conditioning; ``mmdit/{latents,timestep,context,pooled}``
    → MMDiT; ``vae/image`` → VAE encoder and ``vae.to_latent`` of the mean; ``vae/z``, taken as a diffusion
    latent → ``vae.from_latent`` and the decoder. Call it inside ``tracing()``."""
    from . import vae

    if "tokens/clip_l" in inputs:
        t5_ids = inputs.get("tokens/t5")
        model.condition(inputs["tokens/clip_l"], inputs["tokens/clip_g"], t5_ids, convention)
    if "mmdit/latents" in inputs:
        model.mmdit(inputs["mmdit/latents"], inputs["mmdit/timestep"], inputs["mmdit/context"],
                    inputs["mmdit/pooled"])
    if "vae/image" in inputs:
        vae.to_latent(model.vae_encode(inputs["vae/image"])[0], model.config.vae)
    if "vae/z" in inputs:
        model.vae_decode(vae.from_latent(np.asarray(inputs["vae/z"], model.dtype), model.config.vae))


def main(args) -> int:
    """``python -m sd3ref trace``."""
    from .model import load
    from .verify import load_npz

    from pathlib import Path

    from converters.tensors import FormatError, atomic_output

    # refused before any work: an existing output without --force, an output that would replace an input
    read = [args.source, *args.inputs, *([args.config] if args.config else [])]
    with atomic_output(Path(args.output), args.force, inputs=read) as tmp:
        inputs = {}
        for path in args.inputs:
            inputs.update(load_npz(path))
        model = load(args.source, args.dtype, args.config)
        with tracing() as tensors:
            run(model, inputs, args.convention)
        if not tensors:
            raise FormatError(f"{', '.join(args.inputs)}: none of the inputs a trace runs on "
                              "(tokens/*, mmdit/*, vae/image, vae/z)")
        _write(tensors, tmp, {"source": args.source, "dtype": model.dtype, "convention": args.convention,
                              "tool": "sd3ref"})
    print(f"{len(tensors)} tensors ({model.dtype}) -> {args.output}")
    return 0
