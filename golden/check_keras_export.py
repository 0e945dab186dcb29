"""Checks sd3ref's KerasHub export in the golden environment:

    golden/.venv/bin/python -m golden.check_keras_export [--sd3ref-python python3]

For every golden set, the Stability single file is converted by ``converters.safetensors_to_keras``
(run with the sd3ref environment's Python: the converters are not installed here), the resulting preset
is loaded with KerasHub's own ``StableDiffusion3Backbone.from_preset`` next to the golden preset, and
- every weight must equal the golden preset's, bit for bit (values and stored dtypes);
- copied into a float32 KerasHub backbone, both presets must give bit-identical outputs in this process;
- those outputs are also compared with keras_float32.npz (float32 round-off only: BLAS summation order
  depends on the process, e.g. on the threads torch configured in the generator).
The result is written to ``golden/keras_export_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np

from golden import keras_side, make_tokenizers
from golden import sets as S
from golden.generate import ROOT, compare
from golden.trace_format import versions

keras, keras_hub = keras_side.keras, keras_side.keras_hub


def check_set(name: str, spec: dict, sd3ref_python: str, tmp: str) -> dict:
    folder = os.path.join(ROOT, name)
    preset = os.path.join(tmp, name)
    command = [sd3ref_python, "-m", "converters.safetensors_to_keras", os.path.join(folder, "sai.safetensors"),
               "--config", os.path.join(folder, "keras", "config.json"), "-o", preset]
    subprocess.run(command, check=True, cwd=os.path.dirname(ROOT), capture_output=True)
    keras.backend.clear_session()
    reference = keras_hub.models.StableDiffusion3Backbone.from_preset(os.path.join(folder, "keras"))
    exported = keras_hub.models.StableDiffusion3Backbone.from_preset(preset)
    # Same architecture: the same weights in the same order.
    weights_differ = [r.path for r, e in zip(reference.weights, exported.weights)
                      if r.dtype != e.dtype or not np.array_equal(keras.ops.convert_to_numpy(r),
                                                                  keras.ops.convert_to_numpy(e))]
    tok = make_tokenizers.paths(os.path.join(ROOT, "tokenizers"))
    inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
    outputs = []
    for loaded in (reference, exported):
        backbone, preprocessor = keras_side.float32_copy(spec, tok, loaded)
        outputs.append(keras_side.run(backbone, preprocessor, spec, inputs))
    same_run = compare(outputs[0], outputs[1])
    vs_golden = compare(dict(np.load(os.path.join(folder, "keras_float32.npz"))), outputs[1])
    # the temporary directory is named as OUT, so that a re-run writes the same file
    return {"command": " ".join(["python"] + command[1:]).replace(ROOT, "golden").replace(tmp, "OUT"),
            "loader": "keras_hub.models.StableDiffusion3Backbone.from_preset",
            "weights": len(exported.weights), "stored_dtypes": sorted({str(v.dtype) for v in exported.weights}),
            "weights_differing_from_golden_preset": weights_differ,
            "outputs_compared": len(same_run),
            "outputs_bit_identical_to_golden_preset": all(r.get("max_abs") == 0.0 for r in same_run.values()),
            "max_rel_vs_keras_float32_npz": max(r["max_rel"] for k, r in vs_golden.items()
                                                if "max_rel" in r and "uint8" not in k),
            "max_abs_uint8_vs_keras_float32_npz": max((r["max_abs"] for k, r in vs_golden.items() if "uint8" in k),
                                                      default=0.0)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd3ref-python", default="python3", help="a Python with sd3ref's dependencies")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"what": __doc__.strip().splitlines()[0], "versions": versions(),
                  "sets": {name: check_set(name, spec, args.sd3ref_python, tmp) for name, spec in S.SETS.items()}}
    with open(os.path.join(ROOT, "keras_export_check.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps({n: (r["weights_differing_from_golden_preset"] == [], r["outputs_bit_identical_to_golden_preset"],
                          r["max_rel_vs_keras_float32_npz"]) for n, r in result["sets"].items()}))


if __name__ == "__main__":
    main()
