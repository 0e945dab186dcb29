"""The cost of sd3ref.trace on the sd35 golden MMDiT forward: tracing off, ``record`` replaced by a no-op
function (the cost of the calls themselves) and tracing on, best of ``--repeat`` runs of ``--calls`` forwards.

    python -m bench.trace
"""

from __future__ import annotations

import argparse
import sys
import time

from sd3ref import trace, verify
from sd3ref.model import load


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args(argv)
    set_dir = verify.GOLDEN / "sd35"
    model = load(str(set_dir / "diffusers"))
    model = type(model)(model.config, dict(model.weights))  # decoded once
    inputs = verify.load_npz(set_dir / "inputs.npz")

    def run():
        model.mmdit(inputs["mmdit/latents"], inputs["mmdit/timestep"], inputs["mmdit/context"], inputs["mmdit/pooled"])

    def best(traced=False):
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            for _ in range(a.calls):
                if traced:
                    with trace.tracing():
                        run()
                else:
                    run()
            times.append((time.perf_counter() - t0) / a.calls)
        return min(times)

    best()
    off = best()
    original, trace.record = trace.record, lambda name, array: None
    try:
        stub = best()
    finally:
        trace.record = original
    on = best(traced=True)
    with trace.tracing() as tensors:
        run()
    print(f"MMDiT forward, sd35 golden, {len(tensors)} record() calls, best of {a.repeat}×{a.calls}: "
          f"tracing off {off * 1e3:.3f} ms, record() a no-op {stub * 1e3:.3f} ms "
          f"(difference {(off - stub) / stub * 100:+.1f} %), tracing on {on * 1e3:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
