"""sd3ref.trace: recording is free when off, names are the documented ones, traces are reproducible."""

import re
from pathlib import Path

import numpy as np
import pytest

from sd3ref import trace, traps, verify
from sd3ref.__main__ import main

PORTING = Path(__file__).resolve().parent.parent / "docs" / "porting.md"


class Untouchable:
    """Fails if anything reads it as an array."""

    def __array__(self, *args, **kwargs):
        raise AssertionError("record() read its argument while tracing was off")


def test_record_returns_immediately_when_off():
    # The structural guarantee behind "tracing off costs nothing": no copy, no conversion, no state.
    assert trace._active is None
    trace.record("anything", Untouchable())
    with trace.scope("step0"):
        trace.record("anything", Untouchable())
    assert trace._active is None and trace._prefix == ""


def test_record_scope_and_duplicates():
    with trace.tracing() as tensors:
        x = np.arange(3.0)
        trace.record("a", x)
        x[0] = 7  # recorded values are copies
        with trace.scope("step1"), trace.scope("mmdit"):
            trace.record("b", x)
        with pytest.raises(KeyError):
            trace.record("a", x)
    assert list(tensors) == ["a", "step1.mmdit.b"] and tensors["a"][0] == 0
    with pytest.raises(RuntimeError), trace.tracing(), trace.tracing():
        pass


NAMES_SECTION = PORTING.read_text().split("\n## Names\n", 1)[1]


def _documented_patterns():
    """Every name pattern in the first column of the tables of docs/porting.md's "Names" section (`{i}` an integer,
    `{chunk}` an adaLN chunk; "`a.b.q`, `.k`" lists `a.b.q` and `a.b.k`)."""
    patterns = []
    for cell in re.findall(r"^\| (`[a-z0-9_.{}]+`(?:, `[a-z0-9_.{}]+`)*) \|", NAMES_SECTION, flags=re.M):
        first, *others = re.findall(r"`([^`]+)`", cell)
        stem = first.rsplit(".", 1)[0]
        for name in [first] + [stem + o for o in others]:
            pattern = re.escape(name).replace(r"\{i\}", r"\d+").replace(r"\{chunk\}", "[a-z_0-9]+")
            patterns.append(re.compile(pattern + "$"))
    assert len(patterns) > 40
    return patterns


def _documented(name, patterns):
    # docs/porting.md lists CLIP-L's names; CLIP-G's are the same under clip_g.
    name = "clip_l." + name[len("clip_g."):] if name.startswith("clip_g.") else name
    return any(p.match(name) for p in patterns)


@pytest.mark.parametrize("set_name", traps.SETS)
def test_every_traced_name_is_documented(set_name):
    patterns = _documented_patterns()
    names = list(traps.reference_run(set_name, "float32").trace())
    undocumented = [n for n in names if not _documented(n, patterns)]
    assert not undocumented


def test_every_documented_name_is_traced():
    names = [n for s in traps.SETS for n in traps.reference_run(s, "float32").trace()]
    unused = [p.pattern for p in _documented_patterns() if not any(_documented(n, [p]) for n in names)]
    # step names are recorded by sd3ref.pipeline, not by this component run
    assert all(p.startswith(r"step\d") for p in unused), unused


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cli_trace_is_bit_identical_across_runs_and_keeps_dtype(tmp_path, dtype):
    set_dir = verify.GOLDEN / "sd35"
    args = ["trace", str(set_dir / "diffusers"), "--inputs", str(set_dir / "inputs.npz"),
            "--inputs", str(set_dir / "keras_float32.npz"), "--dtype", dtype]
    for name in ("a", "b"):
        assert main(args + ["-o", str(tmp_path / f"{name}.safetensors")]) == 0
    a, b = ((tmp_path / f"{n}.safetensors").read_bytes() for n in "ab")
    assert a == b
    tensors, meta = trace.load(tmp_path / "a.safetensors")
    assert meta["dtype"] == dtype and meta["convention"] == "diffusers"
    assert {str(t.dtype) for t in tensors.values()} == {dtype}
    names = list(tensors)  # execution order survives the file
    assert names.index("t5.embeddings") < names.index("cond.context") < names.index("mmdit.x_embed") \
        < names.index("mmdit.velocity") < names.index("vae.encoder.conv_in") < names.index("vae.decoder.out")
