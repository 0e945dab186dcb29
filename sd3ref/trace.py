"""Named intermediate activations, for diffing a port against sd3ref (docs/porting.md).

Components call ``record(name, array)`` at every point a porter may want to compare. It returns at once
unless a ``tracing()`` context is active — one global read per call, no copy, no string work — so a run
without tracing costs nothing measurable (``tests/test_trace.py`` checks the structure,
``python -m sd3ref.trace --bench`` measures it).

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

ORDER_KEY = "sd3ref.trace.order"  # safetensors metadata: JSON list of names in execution order

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
    """Prefix the names recorded inside with ``name.`` (e.g. ``steps.3`` for a denoising step)."""
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


def save(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write a trace (name -> array) as safetensors, keeping the order of ``tensors`` in the metadata."""
    from safetensors.numpy import save_file

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[ORDER_KEY] = json.dumps(list(tensors))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)


def load(path) -> tuple[dict, dict]:
    """(tensors in execution order, metadata) of a trace file. A file written by other tools (no order
    metadata) comes back in the file's own order."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        metadata = dict(f.metadata() or {})
        names = list(f.keys())
        order = json.loads(metadata.pop(ORDER_KEY, "[]"))
        names = [n for n in order if n in names] + [n for n in names if n not in order]
        return {n: f.get_tensor(n) for n in names}, metadata


def _bench(repeats=5) -> None:
    """Times the same MMDiT forward with tracing off, then with every record() call removed
    (``record`` replaced by a bare pass-through), then with tracing on."""
    import time

    from . import mmdit, verify
    from .weights import load_weights

    global record
    set_dir = verify.GOLDEN / "sd35"
    weights, config = load_weights(str(set_dir / "diffusers"))
    weights = {k: weights[k] for k in weights}
    inputs = verify.load_npz(set_dir / "inputs.npz")
    w = {k[len("model.diffusion_model."):]: v for k, v in weights.items() if k.startswith("model.diffusion_model.")}

    def run():
        return mmdit.forward(w, config, inputs["mmdit/latents"], inputs["mmdit/timestep"],
                             inputs["mmdit/context"], inputs["mmdit/pooled"])

    def best():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(20):
                run()
            times.append((time.perf_counter() - t0) / 20)
        return min(times)

    run()
    off = best()
    original, record = record, lambda name, array: None
    try:
        absent = best()
    finally:
        record = original
    with tracing() as tensors:
        run()
    n = len(tensors)

    def traced():
        with tracing():
            run()
    t0 = time.perf_counter()
    for _ in range(20):
        traced()
    on = (time.perf_counter() - t0) / 20
    print(f"MMDiT forward (sd35 golden, {n} record() calls): tracing off {off * 1e3:.3f} ms, "
          f"record() stubbed out {absent * 1e3:.3f} ms ({(off / absent - 1) * 100:+.1f} %), "
          f"tracing on {on * 1e3:.3f} ms")


if __name__ == "__main__":
    _bench()
