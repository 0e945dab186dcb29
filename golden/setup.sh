#!/usr/bin/env bash
# Creates the golden environment (default: golden/.venv) with the reference frameworks:
# KerasHub 0.32 on the Keras numpy backend WITHOUT TensorFlow, and diffusers + transformers on torch 2.13.0 CPU.
# Then: golden/.venv/bin/python -m golden.generate
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# Pin torch first and alone: an unpinned torch pulls a multi-GB CUDA build.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -r "$here/requirements.txt"
# keras-hub's metadata requires tensorflow-text (and so TensorFlow); the numpy backend needs neither.
"$venv/bin/pip" install -q --no-deps keras-hub==0.32.0
echo "golden environment ready: $venv"
