"""Command line: ``python -m sd3ref <command>``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np


# The default model: golden/sd3's KerasHub preset (2.7 MB, tokenizers included), shipped with the package.
EMBEDDED = Path(__file__).resolve().parent.parent / "golden" / "sd3" / "keras"


def _guarded(command, args) -> int:
    """Expected failures (bad files, sizes, paths) are one line on stderr and exit status 1, warnings one
    ``warning:`` line each, as in the converters (``converters.cli.reported``)."""
    from converters.cli import reported

    from .pipeline import PipelineError
    from .tokenizers import TokenizerFileError

    return reported(lambda: command(args), (PipelineError, TokenizerFileError))


def _at_least(low, kind=int):
    """An argparse type: a ``kind`` number ≥ ``low`` (finite)."""
    what = "an integer" if kind is int else "a finite number"

    def parse(text):
        try:
            n = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} ≥ {low}, got {text!r}") from None
        if not n >= low or n == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {what} ≥ {low}, got {text}")
        return n
    return parse


def _read_image(path, mode, size=None):
    """A Pillow image file → float array in [0, 1], (H, W, 3) for RGB or (H, W) for a mask."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
    if size is not None and im.size != size:
        from .pipeline import PipelineError
        raise PipelineError(f"{path}: the mask is {im.size[0]}x{im.size[1]}, the image {size[0]}x{size[1]}")
    return np.asarray(im, np.float64) / 255


def _load_model(args):
    from .model import load

    encoders = {c: getattr(args, c) for c in ("clip_l", "clip_g", "t5") if getattr(args, c)}
    return load(args.weights, args.dtype, args.config, cache_gb=args.weight_cache_gb, encoders=encoders or None)


def _naming(path, check, *args):
    """``check(*args)``, its PipelineError prefixed with the file or folder it is about."""
    from .pipeline import PipelineError

    try:
        check(*args)
    except PipelineError as e:
        raise PipelineError(f"{path}: {e}") from None


def _image_format(path: Path) -> str:
    """Pillow's format for the output's extension (.png, .jpg, .webp, ...; PNG without one), checked by
    writing a 1×1 RGB image in memory before any work."""
    import io

    from PIL import Image

    from .pipeline import PipelineError

    fmt = Image.registered_extensions().get(path.suffix.lower()) if path.suffix else "PNG"
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (KeyError, OSError, ValueError):  # no such format, or one that cannot hold an RGB image
        raise PipelineError(f"{path}: cannot write an RGB image as {path.suffix!r} (use .png)") from None
    return fmt


def _writable(path: Path, args) -> str:
    """The image format to write ``path`` in, once it is known the output can be written there."""
    from .pipeline import PipelineError

    fmt = _image_format(path)
    parent = path.resolve().parent
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK) or (
            path.exists() and not os.access(path, os.W_OK)):
        raise PipelineError(f"{path}: cannot write the output image there")
    from converters.tensors import refuse_inputs

    read = [getattr(args, a) for a in ("weights", "config", "clip_l", "clip_g", "t5", "init_image", "mask")]
    refuse_inputs(path, [r for r in read if r])
    return fmt


def _generate(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from . import pipeline

    output = Path(args.output)
    fmt = _writable(output, args)  # before minutes of work, not after
    image = mask = None
    if args.init_image:
        image = _read_image(args.init_image, "RGB") * 2 - 1  # (H, W, 3) in [-1, 1]
    if args.mask:
        if image is None:
            raise pipeline.PipelineError("--mask needs --init-image")
        mask = _read_image(args.mask, "L", (image.shape[1], image.shape[0]))
    model = _load_model(args)
    _naming(args.weights, pipeline.check_components, model)
    height, width = image.shape[:2] if image is not None else model.config.image_shape[:2]
    asked = (height if args.height is None else args.height, width if args.width is None else args.width)
    if image is not None and asked != (height, width):
        raise pipeline.PipelineError(f"{args.init_image} is {width}x{height}; --width/--height must match it")
    height, width = asked
    if image is not None:
        _naming(args.init_image, pipeline.check_size, model, height, width)
    if args.strength is not None and image is None:
        warnings.warn("--strength applies only with --init-image: ignored")
    use_t5 = not args.no_t5 and model.config.t5 is not None
    tokenizers = pipeline.load_tokenizers(args.weights, args.convention, args.clip_l_tokenizer,
                                          args.clip_g_tokenizer, args.t5_tokenizer)
    pipeline.check_tokenizers(tokenizers, model.config)
    _naming(args.weights, pipeline.check_t5_tokenizer, model, tokenizers, use_t5)

    def progress(stage, total):
        return tqdm(total=total, desc=f"{stage:>7}", unit="step", file=sys.stderr, leave=True)

    out = pipeline.generate(model, tokenizers, args.prompt, args.negative_prompt, height=height, width=width,
                            steps=args.steps, guidance=args.guidance, rng=np.random.default_rng(args.seed),
                            convention=args.convention, use_t5=use_t5, image=image, mask=mask,
                            strength=0.8 if args.strength is None else args.strength, progress=progress,
                            t5_length=args.t5_length)
    from converters.tensors import atomic_output

    with atomic_output(output, force=True) as tmp:  # never a half-written PNG (Ctrl-C, full disk)
        Image.fromarray(pipeline.to_uint8(out, args.rounding)[0]).save(tmp, format=fmt)
    print(f"{width}x{height} {model.dtype} {args.convention} -> {output}")
    return 0


def _info(args) -> int:
    from converters.inspect import describe
    from converters.sources import open_source

    print(describe(open_source(args.weights, args.config)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sd3ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from . import conditioning, pipeline, verify
    p = commands.add_parser("verify", help="compare every component with the golden KerasHub / diffusers outputs")
    p.add_argument("sets", nargs="*", help="golden sets to check (default: all)")
    p.add_argument("--golden", default=str(verify.GOLDEN), help="golden fixture folder (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    p.set_defaults(func=lambda args: _guarded(verify.main, args))

    p = commands.add_parser("generate", help="text-to-image, image-to-image or inpainting to a PNG "
                                             "(default weights: the tiny embedded golden model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int, help="default: the init image's, else the model's configured size")
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0, help="≤ 1 skips the unconditional pass")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--convention", default="keras", choices=conditioning.CONVENTIONS)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--weight-cache-gb", type=_at_least(0.0, float), default=0.0, metavar="GB",
                   help="keep up to GB of MMDiT weights upcast after the first step (SD3-medium: 7.8 GiB in "
                        "float32, ~7%% faster steps in bench.end_to_end; default 0: re-read every step, "
                        "minimal memory)")
    p.add_argument("--rounding", default="keras", choices=pipeline.ROUNDINGS,
                   help="uint8 conversion: keras / diffusers round, sai truncates")
    p.add_argument("--weights", default=str(EMBEDDED),
                   help="KerasHub preset, diffusers folder or .safetensors (default: %(default)s)")
    p.add_argument("--config", help="config for a Stability file without sd3ref metadata (KerasHub config.json "
                                    "or diffusers folder)")
    for name in ("clip-l", "clip-g", "t5"):
        p.add_argument(f"--{name}", metavar="FILE", help=f"separate {name} text-encoder file (Stability)")
        p.add_argument(f"--{name}-tokenizer", metavar="PATH",
                       help="tokenizer folder" + (" or file (spiece.model, vocabulary.spm, tokenizer.json)" if name == "t5" else ""))
    p.add_argument("--no-t5", action="store_true", help="run without T5 even if the weights hold it")
    p.add_argument("--t5-length", type=_at_least(1), metavar="N",
                   help="T5 tokens (diffusers' max_sequence_length, also its zero tokens without T5); default: "
                        "a KerasHub preset's T5Preprocessor length, else 256 (keras, diffusers) or max(77, n + 1) (sai)")
    p.add_argument("--init-image", help="image-to-image / inpainting input")
    p.add_argument("--strength", type=float, help="with --init-image: how much to repaint, 0-1 (default 0.8)")
    p.add_argument("--mask", help="inpainting mask, same size as the init image: white = repaint (> 0.5; "
                                  "≥ 0.5 under --convention diffusers)")
    p.add_argument("-o", "--output", default="sd3ref.png",
                   help="image to write, its format from the extension (default: %(default)s)")
    p.set_defaults(func=lambda args: _guarded(_generate, args))

    p = commands.add_parser("info", help="what a checkpoint holds: format, components, dtypes, parameters, config")
    p.add_argument("weights", nargs="?", default=str(EMBEDDED), help="default: the embedded model")
    p.add_argument("--config", help="config for a Stability file without sd3ref metadata")
    p.set_defaults(func=lambda args: _guarded(_info, args))

    from . import compare, trace
    p = commands.add_parser("trace", help="record every named intermediate of a run on golden-style inputs "
                                          "to a safetensors file (names: docs/porting.md)")
    p.add_argument("source", help="KerasHub preset, diffusers folder or .safetensors")
    p.add_argument("--inputs", action="append", required=True,
                   help="npz with golden input keys (tokens/*, mmdit/*, vae/image, vae/z); repeat to merge")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--convention", default="diffusers", choices=conditioning.CONVENTIONS)
    p.add_argument("--config", help="config for a Stability file without metadata (see sd3ref.load)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=lambda args: _guarded(trace.main, args))

    p = commands.add_parser("compare", help="compare a port's trace with sd3ref's and name the first divergence")
    p.add_argument("theirs", help="the port's (or a framework's) trace, .safetensors")
    p.add_argument("ours", help="sd3ref's trace of the same run (python -m sd3ref trace)")
    p.add_argument("--map", help="JSON: renames and layout hints (see sd3ref.compare)")
    p.add_argument("--rtol", type=float, help="default 1e-10 if both traces are float64, else 1e-5")
    p.add_argument("--atol", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="print rows and verdict as JSON")
    p.set_defaults(func=lambda args: _guarded(compare.main, args))

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
