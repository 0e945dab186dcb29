"""A mapping rule ties one canonical tensor to the source tensor(s) it is made of, through an invertible,
bit-exact layout operation. Each ``*_layout`` module is a table of such rules; conversion in either
direction and the checks (which source tensors must exist, with which shapes) all read that table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Op:
    """Layout change between the source form(s) and the canonical (PyTorch) form."""
    name: str

    def to_canonical(self, parts: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def from_canonical(self, a: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def source_shapes(self, shape: tuple) -> list[tuple]:
        # A zero-stride stand-in: the layout ops are views, so no memory of the real size is touched.
        return [tuple(p.shape) for p in self.from_canonical(np.broadcast_to(np.empty((), np.uint8), shape))]


class _Copy(Op):
    def to_canonical(self, parts):
        return parts[0]

    def from_canonical(self, a):
        return [a]


class _Transpose(Op):
    """Dense kernel (in, out) <-> Linear weight (out, in)."""
    def to_canonical(self, parts):
        return parts[0].T

    def from_canonical(self, a):
        return [a.T]


class _Conv(Op):
    """Keras kernel HWIO <-> PyTorch OIHW."""
    def to_canonical(self, parts):
        return parts[0].transpose(3, 2, 0, 1)

    def from_canonical(self, a):
        return [a.transpose(2, 3, 1, 0)]


class _AddBatch(Op):
    """KerasHub position table (P², D) <-> Stability's (1, P², D)."""
    def to_canonical(self, parts):
        return parts[0][None]

    def from_canonical(self, a):
        return [a[0]]


@dataclass(frozen=True)
class _Heads(Op):
    """Keras MultiHeadAttention (EinsumDense) forms of a Linear layer split into heads.
    kind "in": kernel (D_in, heads, hd); "bias": (heads, hd); "out": kernel (heads, hd, D_out)."""
    heads: int = 1
    kind: str = "in"

    def to_canonical(self, parts):
        a = parts[0]
        if self.kind == "bias":
            return a.reshape(-1)
        if self.kind == "in":
            return a.reshape(a.shape[0], -1).T
        return a.reshape(-1, a.shape[-1]).T

    def from_canonical(self, a):
        if self.kind == "bias":
            return [a.reshape(self.heads, -1)]
        if self.kind == "in":
            return [a.T.reshape(a.shape[1], self.heads, -1)]
        return [a.T.reshape(self.heads, -1, a.shape[0])]


@dataclass(frozen=True)
class _Fuse(Op):
    """Separate q, k, v Linear layers <-> one fused qkv (rows q, then k, then v)."""
    n: int = 3

    def to_canonical(self, parts):
        return np.concatenate(parts, axis=0)

    def from_canonical(self, a):
        return list(np.split(a, self.n, axis=0))


class _SwapHalves(Op):
    """diffusers' AdaLayerNormContinuous chunks (scale, shift); Stability's final/pre-only adaLN
    chunks (shift, scale). Swapping the two row halves is its own inverse."""
    def to_canonical(self, parts):
        a = parts[0]
        h = a.shape[0] // 2
        return np.concatenate([a[h:], a[:h]], axis=0)

    def from_canonical(self, a):
        return [self.to_canonical([a])]


class _Unsqueeze(Op):
    """diffusers' VAE attention Linear (C, C) <-> LDM 1x1 conv (C, C, 1, 1)."""
    def to_canonical(self, parts):
        return parts[0][:, :, None, None]

    def from_canonical(self, a):
        return [a[:, :, 0, 0]]


COPY, TRANSPOSE, CONV, ADD_BATCH = _Copy("copy"), _Transpose("transpose"), _Conv("conv"), _AddBatch("add_batch")
FUSE_QKV, SWAP_HALVES, UNSQUEEZE = _Fuse("fuse_qkv"), _SwapHalves("swap_halves"), _Unsqueeze("unsqueeze")


def heads_in(heads: int) -> Op:
    return _Heads("heads_in", heads, "in")


def heads_bias(heads: int) -> Op:
    return _Heads("heads_bias", heads, "bias")


def heads_out(heads: int) -> Op:
    return _Heads("heads_out", heads, "out")


@dataclass(frozen=True)
class Rule:
    canonical: str
    sources: tuple  # source tensor names, in the order ``op`` combines them
    op: Op = COPY
