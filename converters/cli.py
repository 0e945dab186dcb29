"""What every converter command shares: error reporting, the canonical writer, progress and summary."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from sd3ref.config import ConfigError

from . import canonical
from .sources import ConversionError, Plan
from .tensors import CAST_TARGETS, FormatError, atomic_output, cast, dtype_name, nbytes, write_safetensors

PROGRESS_MIN_BYTES = 64 << 20  # below this a bar is noise


def parser(module: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m converters.{module}", description=description)


def add_output_args(p: argparse.ArgumentParser, what: str = "OUT.safetensors") -> None:
    p.add_argument("-o", "--output", required=True, metavar=what, help="where to write (atomically)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["keep", *CAST_TARGETS], default="keep",
                   help="keep each tensor's stored dtype (float8 becomes float16, exactly), or cast all to one")


def reported(run, expected=()) -> int:
    """Run a command and return its exit status: any expected failure (bad files, sizes, paths, and the
    ``expected`` exception types) becomes one ``error:`` line on stderr and status 1, a warning one
    ``warning:`` line, Ctrl-C status 130; a
    closed stdout (``... | head``) ends quietly with status 0. Shared by the converters and ``sd3ref``."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        with warnings.catch_warnings():  # each warning one "warning:" line, as the errors
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}", file=sys.stderr)
            status = run() or 0
        sys.stdout.flush()  # inside the try: a closed pipe shows up at the flush of buffered output
        return status
    except BrokenPipeError:  # the reader left; nothing to report, and no second error at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}; no output written", file=sys.stderr)
        return 143 if terminated else 130
    except (ConversionError, FormatError, ConfigError, FileExistsError, *expected) as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # includes Pillow's UnidentifiedImageError
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler), raised like Ctrl-C so that every cleanup runs: no temporary file
    is left behind."""


def _terminate(signum, frame):
    raise Terminated


def main(run) -> None:
    """A converter command's entry point: ``reported``, exiting with its status when it is not 0."""
    status = reported(run)
    if status:
        sys.exit(status)


class Progress:
    def __init__(self, total: int, label: str):
        self.bar = None
        if total >= PROGRESS_MIN_BYTES:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)

    def __call__(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summarise(title: str, tensors: list[tuple[str, tuple, np.dtype]], path) -> str:
    """tensors: (canonical name, shape, dtype) as written."""
    params, dtypes = Counter(), Counter()
    for name, shape, dtype in tensors:
        params[canonical.component_of(name)] += int(np.prod(shape, dtype=np.int64))
        dtypes[dtype_name(dtype)] += 1
    lines = [f"{title}: {len(tensors)} tensors, {sum(params.values()):,} parameters, "
             f"{sum(nbytes(s, d) for _, s, d in tensors):,} bytes -> {path}"]
    lines += [f"  {comp:7s} {params[comp]:>16,} parameters" for comp in canonical.COMPONENTS if comp in params]
    lines.append("  dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    return "\n".join(lines)


def write_canonical(plan: Plan, output, dtype: str = "keep", force: bool = False, converter: str = "") -> str:
    """Write ``plan`` as a canonical safetensors file, one tensor in memory at a time."""
    target = None if dtype == "keep" else CAST_TARGETS[dtype]
    entries = []
    for name, shape in plan.shapes.items():
        stored = plan.dtype(name)
        out_dtype = target or cast(np.zeros(0, stored), None).dtype
        entries.append((name, shape, out_dtype, lambda n=name: _cast(plan, n, target)))
    metadata = {
        "format": "pt",  # what torch-side safetensors readers look for
        "sd3ref.format": canonical.FORMAT,
        "sd3ref.config": plan.config.to_json(),
        "sd3ref.source": str(plan.source),
        "sd3ref.source_format": plan.format,
        "sd3ref.converter": converter,
        "sd3ref.dtype": dtype,
    }
    if plan.dropped:
        metadata["sd3ref.dropped"] = ", ".join(sorted(plan.dropped))
    size = sum(nbytes(s, d) for _, s, d, _ in entries)
    progress = Progress(size, Path(output).name)
    try:
        with atomic_output(Path(output), force, inputs=plan.files(), size=size) as tmp:
            with open(tmp, "wb") as f:
                write_safetensors(f, entries, metadata, progress)
    finally:
        progress.close()
    return summarise("wrote canonical", [(n, s, d) for n, s, d, _ in entries], output)


def _cast(plan: Plan, name: str, target) -> np.ndarray:
    """One canonical tensor cast to ``target``; a finite value beyond the target's range (float16: 65504)
    is an error naming the tensor, not a silent inf."""
    with np.errstate(over="raise"):
        try:
            return cast(plan.read(name), target)
        except FloatingPointError:
            raise ConversionError(f"{plan.source}: tensor {name} has values beyond {dtype_name(target)}'s range; "
                                  "keep the stored dtype or choose bfloat16") from None


def report_dropped(plan: Plan) -> None:
    for name, why in sorted(plan.dropped.items()):
        print(f"note: {plan.source}: dropped {name}: {why}", file=sys.stderr)
