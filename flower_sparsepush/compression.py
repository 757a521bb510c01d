"""Compressors: which entries of a vector travel, and with how many bits each.

A compressor is a small object with one method, ``compressor(v) -> Compressed``. Selection (top-k, random-k) and
value quantization (b-bit with a per-message scale) compose: ``topk:0.01+q:4``. Everything here works on flat 1-D
torch tensors; no Flower imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COMPRESSOR_SPECS = ("none", "topk:F", "topk-layer:F", "randk:F", "q:B", "topk:F+q:B")


class CompressionError(ValueError):
    """A compressor spec or argument that cannot be used."""


@dataclass(frozen=True)
class Compressed:
    """One compressed vector of length ``dim``.

    ``indices`` are the kept positions (sorted int64, None = all ``dim`` entries in order). The values are either
    raw (``values``: float32 or float64) or quantized (``codes`` in ``0 .. 2**bits - 1`` plus one float32 ``scale``).
    """

    dim: int
    indices: np.ndarray | None
    values: np.ndarray | None = None
    codes: np.ndarray | None = None
    scale: float = 0.0
    bits: int = 0

    @property
    def k(self) -> int:
        return self.dim if self.indices is None else len(self.indices)

    def decoded_values(self) -> np.ndarray:
        """The value of each kept entry, exactly as the receiver sees it."""
        if self.codes is None:
            return self.values
        return dequantize(self.codes, self.scale, self.bits)

    def to_dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The vector this message stands for, zeros where nothing was sent."""
        vals = torch.from_numpy(np.ascontiguousarray(self.decoded_values())).to(dtype)
        if self.indices is None:
            return vals
        out = torch.zeros(self.dim, dtype=dtype)
        out[torch.from_numpy(self.indices)] = vals
        return out

    def add_to_(self, target: torch.Tensor, alpha: float = 1.0) -> None:
        """``target += alpha * self`` in place, touching only the kept entries."""
        vals = torch.from_numpy(np.ascontiguousarray(self.decoded_values())).to(target.dtype)
        if self.indices is None:
            target.add_(vals, alpha=alpha)
        else:
            target.index_add_(0, torch.from_numpy(self.indices), vals, alpha=alpha)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Compressed):
            return NotImplemented
        same = lambda a, b: (
            (a is None and b is None)
            or (  # noqa: E731
                a is not None and b is not None and a.dtype == b.dtype and np.array_equal(a, b)
            )
        )
        return (self.dim, self.scale, self.bits) == (other.dim, other.scale, other.bits) and all(
            same(getattr(self, f), getattr(other, f)) for f in ("indices", "values", "codes")
        )


def quantize(values: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """b-bit codes and one scale for ``values``.

    ``bits == 1`` keeps the sign and the mean magnitude (sign + scale). ``bits >= 2`` rounds to the nearest of
    ``2L+1`` evenly spaced levels in ``[-s, s]`` with ``L = 2**(bits-1) - 1`` and ``s = max|v|``.
    """
    if not 1 <= bits <= 8:
        raise CompressionError(f"quantization bits must be in 1..8, got {bits}")
    mag = np.abs(values)
    if bits == 1:
        scale = float(np.float32(mag.mean())) if len(values) else 0.0
        return (values >= 0).astype(np.uint8), scale
    scale = float(np.float32(mag.max())) if len(values) else 0.0
    levels = 2 ** (bits - 1) - 1
    if scale == 0.0:
        return np.full(len(values), levels, dtype=np.uint8), 0.0
    codes = np.rint(values / scale * levels).clip(-levels, levels) + levels
    return codes.astype(np.uint8), scale


def dequantize(codes: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """The values that ``codes`` stand for (float32), identical at sender and receiver."""
    if bits == 1:
        return np.where(codes.astype(bool), np.float32(scale), np.float32(-scale)).astype(np.float32)
    levels = 2 ** (bits - 1) - 1
    return ((codes.astype(np.float32) - levels) * np.float32(scale / levels)).astype(np.float32)


def _as_numpy(v: torch.Tensor) -> np.ndarray:
    return v.detach().cpu().numpy()


def sorted_indices(idx: np.ndarray, dim: int) -> np.ndarray:
    """Unique positions ``idx`` of a length-``dim`` vector, sorted, as int64.

    Dense selections (more than 1/32 of the entries) go through a boolean mask, O(dim) and several times faster
    than a comparison sort of ``k`` entries; sparse ones are sorted directly. Same result either way.
    """
    if 32 * len(idx) > dim:
        mask = np.zeros(dim, dtype=np.bool_)
        mask[idx] = True
        return np.flatnonzero(mask).astype(np.int64, copy=False)
    return np.sort(idx.astype(np.int64, copy=False))


class Identity:
    """Send every entry at full precision."""

    spec = "none"

    def __call__(self, v: torch.Tensor) -> Compressed:
        return Compressed(len(v), None, values=_as_numpy(v).copy())


class TopK:
    """Keep the ``k`` largest-magnitude entries, globally or per tensor segment (at least one per segment).

    ``amount`` below 1 is a fraction of the entries, 1 or more a count. ``segments`` (sizes summing to the vector
    length) switches to per-tensor selection.
    """

    def __init__(self, amount: float, segments: list[int] | None = None):
        if not amount > 0:
            raise CompressionError(f"top-k amount must be > 0 (a fraction in (0, 1) or a count >= 1), got {amount}")
        self.amount = amount
        self.segments = list(segments) if segments else None
        self.spec = f"topk{'-layer' if segments else ''}:{amount:g}"

    def count(self, d: int) -> int:
        """How many entries of a length-``d`` vector are kept."""
        k = round(self.amount * d) if self.amount < 1 else int(self.amount)
        return min(d, max(1, k))

    def select(self, v: torch.Tensor) -> np.ndarray:
        mag = v.abs()
        if self.segments is None:
            idx = torch.topk(mag, self.count(len(v)), sorted=False).indices
        else:
            if sum(self.segments) != len(v):
                raise CompressionError(f"segments sum to {sum(self.segments)} but the vector has {len(v)} entries")
            parts, start = [], 0
            for size in self.segments:
                parts.append(torch.topk(mag[start : start + size], self.count(size), sorted=False).indices + start)
                start += size
            idx = torch.cat(parts)
        return sorted_indices(_as_numpy(idx), len(v))

    def __call__(self, v: torch.Tensor) -> Compressed:
        idx = self.select(v)
        return Compressed(len(v), idx, values=_as_numpy(v)[idx].copy())


class RandK:
    """Keep ``k`` entries drawn uniformly at random (unscaled), from a seeded generator."""

    def __init__(self, amount: float, seed: int = 0):
        self.topk = TopK(amount)  # only for its count rule
        self.generator = np.random.default_rng(seed)
        self.spec = f"randk:{amount:g}"

    def __call__(self, v: torch.Tensor) -> Compressed:
        d = len(v)
        idx = np.sort(self.generator.choice(d, size=self.topk.count(d), replace=False).astype(np.int64))
        return Compressed(d, idx, values=_as_numpy(v)[idx].copy())


class Quantize:
    """Quantize the values chosen by ``inner`` (all entries by default) to ``bits`` bits with one scale."""

    def __init__(self, bits: int, inner=None):
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise CompressionError(f"quantization bits must be an integer in 1..8, got {bits!r}")
        self.bits = bits
        self.inner = inner or Identity()
        self.spec = (f"{self.inner.spec}+" if inner else "") + f"q:{bits}"

    def __call__(self, v: torch.Tensor) -> Compressed:
        c = self.inner(v)
        codes, scale = quantize(c.values.astype(np.float32), self.bits)
        return Compressed(c.dim, c.indices, codes=codes, scale=scale, bits=self.bits)


def make_compressor(spec: str, segments: list[int] | None = None, seed: int = 0):
    """Parse a compressor spec: ``none``, ``topk:F``, ``topk-layer:F``, ``randk:F``, ``q:B``, ``topk:F+q:B``.

    F is a fraction in (0, 1) or an integer count; B is 1..8. ``topk-layer`` needs ``segments``.
    """
    valid = ", ".join(COMPRESSOR_SPECS)
    parts = str(spec).split("+")
    if len(parts) > 2:
        raise CompressionError(f"compressor {spec!r}: at most one selection and one quantization; valid: {valid}")
    inner = None
    for pos, part in enumerate(parts):
        name, _, arg = part.partition(":")
        if name == "none" and not arg and len(parts) == 1:
            return Identity()
        if name not in ("topk", "topk-layer", "randk", "q"):
            raise CompressionError(f"unknown compressor {spec!r}; valid: {valid}")
        try:
            number = float(arg)
        except ValueError:
            raise CompressionError(f"compressor {spec!r}: {part!r} needs a number after ':'; valid: {valid}") from None
        if name in ("topk", "topk-layer", "randk") and pos == 0:
            if not (0 < number < 1 or (number >= 1 and number.is_integer())):
                raise CompressionError(
                    f"compressor {spec!r}: {name} needs a fraction in (0, 1) or a whole count >= 1, got {arg}"
                )
            if name == "randk":
                inner = RandK(number, seed)
            elif name == "topk-layer":
                if not segments:
                    raise CompressionError(f"compressor {spec!r}: per-tensor top-k needs the model's tensor sizes")
                inner = TopK(number, segments)
            else:
                inner = TopK(number)
        elif name == "q" and pos == len(parts) - 1:
            if not number.is_integer() or not 1 <= number <= 8:
                raise CompressionError(f"compressor {spec!r}: q needs a whole number of bits in 1..8, got {arg}")
            return Quantize(int(number), inner)
        else:
            raise CompressionError(f"unknown compressor {spec!r}; valid: {valid}")
    return inner


def compress_with_feedback(compressor, v: torch.Tensor, error: torch.Tensor | None) -> tuple[Compressed, torch.Tensor]:
    """Error feedback: compress ``v + error`` and return the message and the new error (what was left out)."""
    u = v if error is None else v + error
    c = compressor(u)
    # u - to_dense(c), touching only the kept entries: u + (-1) * c is the same IEEE result as u - c
    err = u.clone() if u is v else u
    if c.indices is None:
        err.sub_(torch.from_numpy(np.ascontiguousarray(c.decoded_values())).to(err.dtype))
    else:
        c.add_to_(err, alpha=-1.0)
    return c, err
