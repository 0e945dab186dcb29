"""python -m sd3ref generate / info on the embedded model, and every bad input → one line, exit 1."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sd3ref import __main__ as cli
from sd3ref import verify

SET = verify.GOLDEN / "sd3"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(d / "init.png")
    mask = np.zeros((48, 48), np.uint8)
    mask[:, 24:] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:32, :32]).save(d / "small_mask.png")
    (d / "broken.png").write_text("not an image")
    return d


def test_fresh_machine_command(tmp_path):
    # The README's command, as a user runs it: the embedded model, no weights, no download.
    r = subprocess.run([sys.executable, "-m", "sd3ref", "generate", "--prompt", "a red cube", "--steps", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "denoise" in r.stderr  # the progress bars
    with Image.open(tmp_path / "sd3ref.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (48, 48))


TASKS = {"t2i": [], "i2i": ["--init-image", "{d}/init.png", "--strength", "0.6"],
         "inpaint": ["--init-image", "{d}/init.png", "--mask", "{d}/mask.png", "--strength", "0.6"]}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("convention", ["keras", "diffusers", "sai"])
def test_generate(capsys, images, tmp_path, task, dtype, convention):
    out = tmp_path / "x.png"
    extra = [a.format(d=images) for a in TASKS[task]]
    code, stdout, err = run(capsys, "generate", "--prompt", "a red cube", "--steps", "3", "--dtype", dtype,
                            "--convention", convention, "-o", str(out), *extra)
    assert code == 0, err
    assert f"{dtype} {convention}" in stdout
    with Image.open(out) as im:
        pixels = np.asarray(im)
    assert pixels.shape == (48, 48, 3) and pixels.std() > 0
    if task == "inpaint":
        assert "denoise" in err
    # Same arguments, same file: the seed fixes every draw.
    code, _, _ = run(capsys, "generate", "--prompt", "a red cube", "--steps", "3", "--dtype", dtype,
                     "--convention", convention, "-o", str(tmp_path / "y.png"), *extra)
    assert code == 0 and (tmp_path / "y.png").read_bytes() == out.read_bytes()


def test_conventions_and_roundings_change_the_picture(capsys, tmp_path):
    pictures = {}
    for name, args in {"keras": [], "diffusers": ["--convention", "diffusers"], "sai": ["--rounding", "sai"]}.items():
        code, _, err = run(capsys, "generate", "--prompt", "a red cube", "--steps", "2", "-o",
                           str(tmp_path / f"{name}.png"), *args)
        assert code == 0, err
        pictures[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), np.int16)
    assert np.abs(pictures["keras"] - pictures["diffusers"]).max() > 0
    diff = pictures["keras"] - pictures["sai"]
    assert set(np.unique(diff)) <= {0, 1} and diff.any()  # truncation: 0 or 1 count lower


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and "keras, 370 tensors" in out and '"mmdit_num_layers": 3' in out
    code, out, _ = run(capsys, "info", str(SET / "diffusers"))
    assert code == 0 and "diffusers" in out.splitlines()[0]


def test_verify_without_fixtures(capsys, tmp_path):
    # e.g. after a wheel install: one error line that says where the fixtures are, exit 1
    code, out, err = run(capsys, "verify", "--golden", str(tmp_path))
    assert code == 1 and out == "" and err.startswith("error: no golden sets") and "--golden" in err
    assert len(err.strip().splitlines()) == 1


def test_info_into_a_closed_pipe():
    # `sd3ref info | head -1`: the reader is gone before the output is flushed → exit 0, nothing on stderr
    proc = subprocess.Popen([sys.executable, "-m", "sd3ref", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def _vocab_too_big(tmp_path):
    d = tmp_path / "clip_l"
    shutil.copytree(SET / "keras/assets/clip_l_tokenizer", d)
    vocab = json.loads((d / "vocabulary.json").read_text())
    vocab["extra</w>"] = len(vocab)
    (d / "vocabulary.json").write_text(json.dumps(vocab))
    return d


BAD = {
    "unknown weights format": (lambda d, t: ["--weights", str(d / "broken.png")], "broken.png: not a safetensors"),
    "tokenizer vocabulary": (lambda d, t: ["--clip-l-tokenizer", str(_vocab_too_big(t))], "575 tokens but"),
    "width": (lambda d, t: ["--width", "40"], "multiples of 16"),
    "steps": (lambda d, t: ["--steps", "0"], "steps must be at least 1"),
    "guidance": (lambda d, t: ["--guidance", "-1"], "guidance must be a finite number ≥ 0"),
    "guidance nan": (lambda d, t: ["--guidance", "nan"], "guidance must be a finite number ≥ 0, got nan"),
    "width 0": (lambda d, t: ["--width", "0"], "got 0x48"),
    "output extension": (lambda d, t: ["-o", str(t / "o.xyz")], "o.xyz: cannot write an RGB image"),
    "output format without RGB": (lambda d, t: ["-o", str(t / "o.h5")], "o.h5: cannot write an RGB image"),
    "mask size": (lambda d, t: ["--init-image", str(d / "init.png"), "--mask", str(d / "small_mask.png")],
                  "the mask is 32x32, the image 48x48"),
    "init image": (lambda d, t: ["--init-image", str(d / "broken.png")], "broken.png"),
    "output": (lambda d, t: ["-o", str(t / "no/such/dir/x.png")], "cannot write"),
    "output is an input": (lambda d, t: ["--init-image", str(d / "init.png"), "-o", str(d / "init.png")],
                           "would replace the input"),
    "missing weights": (lambda d, t: ["--weights", str(t / "nothing.safetensors")], "no such file"),
    "stability without tokenizers": (lambda d, t: ["--weights", str(SET / "sai.safetensors"), "--config",
                                                   str(SET / "diffusers")], "--clip-l-tokenizer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(capsys, images, tmp_path, case):
    args, message = BAD[case]
    code, out, err = run(capsys, "generate", "--prompt", "x", "--steps", "1", "-o", str(tmp_path / "o.png"),
                         *args(images, tmp_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]


def _tools_bad_input(t):
    """(arguments, what the one error line must say) for verify / trace / compare."""
    from sd3ref import trace

    (t / "bad.npz").write_bytes(b"not an archive")
    (t / "bad.json").write_text("{bad")
    (t / "short.safetensors").write_bytes(b"short")
    np.savez(t / "other.npz", other=np.zeros(2))
    np.save(t / "one.npy", np.zeros(2))
    shutil.copyfile(SET / "keras" / "config.json", t / "config.json")
    shutil.copyfile(SET / "sai.safetensors", t / "sai.safetensors")
    with trace.tracing(str(t / "trace.safetensors"), {}):
        trace.record("x", np.zeros(2))
    traced = str(t / "trace.safetensors")
    out = ["-o", str(t / "o.safetensors")]
    return {
        "verify: unknown set": (["verify", "nosuchset"], "nosuchset"),
        "trace: missing source": (["trace", str(t / "nothing"), "--inputs", str(SET / "inputs.npz"), *out], "nothing"),
        "trace: missing inputs": (["trace", str(SET / "keras"), "--inputs", str(t / "none.npz"), *out], "none.npz"),
        "trace: not an npz": (["trace", str(SET / "keras"), "--inputs", str(t / "bad.npz"), *out],
                              "bad.npz: not a NumPy .npz archive"),
        "trace: a .npy": (["trace", str(SET / "keras"), "--inputs", str(t / "one.npy"), *out],
                          "one.npy: not a NumPy .npz archive of numbers"),
        "trace: output is the config": (["trace", str(t / "sai.safetensors"), "--config", str(t / "config.json"),
                                         "--inputs", str(SET / "inputs.npz"), "-o", str(t / "config.json"), "--force"],
                                        "would replace the input"),
        "trace: no known inputs": (["trace", str(SET / "keras"), "--inputs", str(t / "other.npz"), *out],
                                   "other.npz: none of the inputs"),
        "trace: output is the source": (["trace", str(t / "sai.safetensors"), "--config", str(SET / "keras"),
                                         "--inputs", str(SET / "inputs.npz"), "-o", str(t / "sai.safetensors")],
                                        "would replace the input"),
        "trace: output exists": (["trace", str(SET / "keras"), "--inputs", str(SET / "inputs.npz"), "-o", traced],
                                 "already exists (use --force"),
        "compare: missing trace": (["compare", str(t / "none.safetensors"), traced], "none.safetensors"),
        "compare: not a trace": (["compare", str(t / "short.safetensors"), traced],
                                 "short.safetensors: not a safetensors file"),
        "compare: map not JSON": (["compare", traced, traced, "--map", str(t / "bad.json")], "bad.json: not JSON"),
    }


@pytest.mark.parametrize("case", ["verify: unknown set", "trace: missing source", "trace: missing inputs",
                                  "trace: not an npz", "trace: a .npy", "trace: output is the config",
                                  "trace: no known inputs", "trace: output is the source",
                                  "trace: output exists", "compare: missing trace", "compare: not a trace",
                                  "compare: map not JSON"])
def test_tools_bad_input_is_one_line(capsys, tmp_path, case):
    args, message = _tools_bad_input(tmp_path)[case]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, out, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced


def test_long_prompt_warns_and_runs(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--prompt", "cat " * 100, "--steps", "1", "-o", str(tmp_path / "o.png"))
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "truncated" in warnings[0], err


def test_weights_without_a_needed_component(capsys, tmp_path):
    # A Stability file holding only the MMDiT: nothing to encode the prompt or decode with.
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(SET / "sai.safetensors").items() if k.startswith("model.diffusion_model.")}
    save_file(tensors, tmp_path / "mmdit.safetensors")
    code, _, err = run(capsys, "generate", "--prompt", "x", "--weights", str(tmp_path / "mmdit.safetensors"),
                       "-o", str(tmp_path / "o.png"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the head-count warning
    assert code == 1 and errors == [line for line in err.splitlines() if not line.startswith("warning:")], err
    assert errors[0].startswith(f"error: {tmp_path / 'mmdit.safetensors'}: the weights have no clip_l"), err
