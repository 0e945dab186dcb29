"""Tensor storage: dtypes NumPy lacks, safetensors and Keras-HDF5 readers, the atomic writer.

NumPy has no bfloat16 or float8. We carry such tensors *undecoded*, as one-field structured dtypes
over their raw bits (``BF16``, ``F8_E4M3``): reshape, transpose, concatenate and ``tobytes`` work on
them unchanged, so every layout transform stays bit-exact, and the dtype still says what the bits
mean. ``to_float32`` decodes them, ``cast`` converts between storage dtypes.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

BF16 = np.dtype([("bfloat16", "<u2")])
F8_E4M3 = np.dtype([("float8_e4m3fn", "u1")])

# safetensors dtype tag <-> storage dtype. Integer tags exist only so we can name them in errors.
ST_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "BF16": BF16,
             "F8_E4M3": F8_E4M3, "I8": np.dtype("i1"), "U8": np.dtype("u1"), "I16": np.dtype("<i2"),
             "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "I64": np.dtype("<i8"),
             "U64": np.dtype("<u8"), "BOOL": np.dtype("?")}
FLOAT_DTYPES = (np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8"), BF16, F8_E4M3)
DTYPE_NAMES = {np.dtype("<f2"): "float16", np.dtype("<f4"): "float32", np.dtype("<f8"): "float64",
               BF16: "bfloat16", F8_E4M3: "float8_e4m3fn"}
CAST_TARGETS = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "bfloat16": BF16}


class FormatError(ValueError):
    """A file that is not what it claims to be. The message is one line and names the file."""


def dtype_name(dtype: np.dtype) -> str:
    return DTYPE_NAMES.get(np.dtype(dtype), str(dtype))


def st_tag(dtype: np.dtype) -> str:
    for tag, dt in ST_DTYPES.items():
        if dt == dtype:
            return tag
    raise FormatError(f"dtype {dtype} has no safetensors equivalent")


def _is_count(v) -> bool:
    """A non-negative JSON integer (not a bool, not a float)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _contiguous(a) -> np.ndarray:
    return np.require(a, requirements="C")  # unlike ascontiguousarray, keeps 0-d arrays 0-d


# -- decoding -------------------------------------------------------------------------------------------

def _e4m3fn_table() -> np.ndarray:
    """All 256 float8-e4m3fn values: bias 7, no infinities, S.1111.111 is NaN."""
    bits = np.arange(256, dtype=np.uint32)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp, man = (bits >> 3) & 0xF, (bits & 0x7).astype(np.float64)
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    value = np.where((exp == 15) & (man == 7), np.nan, value)
    return (sign * value).astype(np.float32)


_E4M3FN = _e4m3fn_table()


def to_float32(a: np.ndarray) -> np.ndarray:
    """Decode bfloat16 / float8 to float32; other dtypes are returned unchanged."""
    if a.dtype == BF16:
        return (_contiguous(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if a.dtype == F8_E4M3:
        return _E4M3FN[_contiguous(a).view(np.uint8)]
    return a


def _bf16_from_float32(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, keep NaNs quiet (what torch and ml_dtypes do)."""
    u = _contiguous(np.asarray(x, dtype=np.float32)).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(x), np.uint16(0x7FC0), rounded)
    return rounded.view(BF16)


def cast(a: np.ndarray, target: np.dtype | None) -> np.ndarray:
    """Convert between storage dtypes. None keeps the stored dtype, except that float8 (a storage
    format, not a working precision) becomes float16, which holds every e4m3fn value exactly."""
    if target is None:
        return to_float32(a).astype(np.float16) if a.dtype == F8_E4M3 else a
    if a.dtype == target:
        return a
    if target == BF16:
        return _bf16_from_float32(to_float32(a).astype(np.float32))
    return to_float32(a).astype(target)


# -- safetensors ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: np.dtype
    file: str


def nbytes(shape, dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` (int64 product: a full-size layer overflows int32)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class SafetensorsFile:
    """A safetensors file parsed by hand: the header is validated against the file size, and tensors
    are memory-mapped on demand. (``safe_open(framework="np")`` cannot return bfloat16 or float8.)"""

    def __init__(self, path):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 << 20):
                    raise FormatError(f"{self.path}: not a safetensors file (header length {n} exceeds the file)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise FormatError(f"{self.path}: bad header (__metadata__ is not an object of strings)")
        self.metadata = metadata
        self._base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        self._offsets = {}
        spans = []
        for name, h in header.items():
            try:
                dtype, shape, (begin, end) = ST_DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
                if not all(_is_count(v) for v in (*shape, begin, end)):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{self.path}: bad header entry for tensor {name!r}") from None
            if end - begin != nbytes(shape, dtype):
                raise FormatError(f"{self.path}: tensor {name!r} has inconsistent size in the header")
            self.tensors[name] = TensorInfo(shape, dtype, self.path)
            self._offsets[name] = begin
            spans.append((begin, end, name))
        # As the safetensors library requires: the tensors tile the data exactly, no overlap, gap or tail.
        data_end = 0
        for begin, end, name in sorted(spans):
            if begin != data_end:
                what = "overlaps the tensor before it" if begin < data_end else f"leaves {begin - data_end} bytes unused before it"
                raise FormatError(f"{self.path}: bad header (tensor {name!r} {what})")
            data_end = end
        if self._base + data_end > size:
            raise FormatError(f"{self.path}: truncated ({size} bytes, header needs {self._base + data_end})")
        if self._base + data_end < size:
            raise FormatError(f"{self.path}: {size - self._base - data_end} bytes after the last tensor")

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if not info.shape or 0 in info.shape:
            return np.zeros(info.shape, info.dtype)  # np.memmap refuses empty maps
        return np.memmap(self.path, dtype=info.dtype, mode="r", offset=self._base + self._offsets[name], shape=info.shape)


def write_safetensors(f, entries: Iterable[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict[str, str], progress=None) -> None:
    """Stream tensors into an open binary file: the header first (shapes and dtypes are known in
    advance), then each tensor as it is produced, so only one tensor is ever in memory."""
    entries = list(entries)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": st_tag(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, dtype, produce in entries:
        a = _contiguous(produce())
        if a.shape != tuple(shape) or a.dtype != dtype:
            raise AssertionError(f"tensor {name}: produced {a.shape} {a.dtype}, planned {shape} {dtype}")
        f.write(a.tobytes())  # tobytes of a contiguous array is one copy of one tensor
        if progress is not None:
            progress(a.nbytes)


# -- Keras HDF5 -----------------------------------------------------------------------------------------

class H5Weights:
    """The datasets of one or more Keras ``.weights.h5`` files (shards), by path without leading '/'.

    Keras writes bfloat16 as an opaque 2-byte type with the attribute dtype="bfloat16"."""

    def __init__(self, paths: list[str]):
        import h5py

        self.tensors: dict[str, TensorInfo] = {}
        self._files = {}
        for path in paths:
            try:
                f = h5py.File(path, "r")
                found = {}
                f.visititems(lambda n, o: found.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None)
            except (OSError, RuntimeError, KeyError, ValueError) as e:
                raise FormatError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None
            self._files[path] = f
            for name, ds in found.items():
                if name in self.tensors:
                    raise FormatError(f"{path}: dataset {name} also in {self.tensors[name].file}")
                if ds.attrs.get("dtype") in ("bfloat16", b"bfloat16"):
                    if ds.dtype.itemsize != 2:
                        raise FormatError(f"{path}: dataset {name} is tagged bfloat16 but has {ds.dtype.itemsize}-byte items")
                    dtype = BF16
                else:
                    dtype = ds.dtype
                self.tensors[name] = TensorInfo(tuple(ds.shape), np.dtype(dtype), path)

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        try:
            raw = self._files[info.file][name][()]
        except (OSError, RuntimeError, ValueError) as e:
            raise FormatError(f"{info.file}: cannot read dataset {name} ({str(e).splitlines()[0]})") from None
        raw = np.asarray(raw)
        return raw.view(np.uint16).view(BF16) if info.dtype == BF16 else raw


def write_h5_dataset(group, key: str, a: np.ndarray) -> None:
    """Write one Keras variable: bfloat16 as opaque |V2 with attr dtype="bfloat16", as Keras does."""
    a = _contiguous(a)
    if a.dtype == BF16:
        ds = group.create_dataset(key, data=a.view(np.uint16).view("V2"))
        ds.attrs["dtype"] = "bfloat16"
    else:
        group.create_dataset(key, data=a)


# -- atomic output --------------------------------------------------------------------------------------

def refuse_inputs(target: Path, inputs, is_dir: bool = False) -> None:
    """FileExistsError when writing ``target`` would replace one of ``inputs``: the input itself, an existing
    file inside an input folder (its configs and indexes), or, for a folder output, a folder holding one."""
    target = Path(target)
    where = target.resolve()
    for source in map(Path, inputs):
        inside = source.is_dir() and target.exists() and source.resolve() in where.parents
        if source.resolve() == where or inside or (is_dir and where in source.resolve().parents):
            raise FileExistsError(f"{target}: the output would replace the input {source}")


@contextmanager
def atomic_output(target: Path, force: bool, is_dir: bool = False, inputs=(), writes=(), size: int = 0):
    """Yield a temporary path next to ``target``; move it over ``target`` only if the body succeeds.
    Any exception (KeyboardInterrupt included) removes the temporary file or folder.

    Refused before anything is written: an existing target without ``force``; a target that would replace
    one of ``inputs`` (``refuse_inputs``); an existing folder holding anything but the names in
    ``writes`` (so ``--force`` never deletes what the command does not make: the current folder, a preset's
    tokenizer assets); a file where a folder goes or the reverse; a disk with less free space than ``size``
    bytes and a margin (h5py crashes the process when a write fails for space). A replaced folder is moved
    aside, then the new one moved in (the old one restored if that fails), then the old one deleted."""
    import shutil

    target = Path(target)
    refuse_inputs(target, inputs, is_dir)
    if target.exists():
        if target.is_dir() != is_dir:  # before --force: forcing would not help
            raise FileExistsError(f"{target}: exists and is {'not ' if is_dir else ''}a folder")
        if not force:
            raise FileExistsError(f"{target}: already exists (use --force to overwrite)")
        others = sorted(p.name for p in target.iterdir() if p.name not in writes) if is_dir else []
        if others:
            more = f" (+{len(others) - 4} more)" if len(others) > 4 else ""
            raise FileExistsError(f"{target}: holds files this command does not write ({', '.join(others[:4])}{more}); "
                                  "choose a new or empty folder")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{target}: folder {parent} does not exist")
    needed, free = size + size // 100 + (16 << 20), shutil.disk_usage(parent).free if size else 0
    if size and free < needed:
        raise OSError(errno.ENOSPC, f"not enough free space for {target.name} ({needed / 1e9:.2f} GB needed with a "
                                    f"margin, {free / 1e9:.2f} GB free)", str(parent))
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:  # named after the output, not the temporary name that was never made
        raise OSError(e.errno, e.strerror, str(target)) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp make it private; a plain open would not
        yield tmp
        if not is_dir:
            os.replace(tmp, target)
        elif not target.exists():
            os.rename(tmp, target)
        else:
            aside = tmp.with_name(tmp.name + ".old")
            try:
                os.rename(target, aside)
                os.rename(tmp, target)
            except BaseException:  # an interrupt between the two renames included
                if aside.exists() and not target.exists():
                    os.rename(aside, target)
                raise
            shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if is_dir else tmp.unlink(missing_ok=True)
        raise
