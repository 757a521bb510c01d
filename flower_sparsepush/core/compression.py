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


# Top-k selection rule (every path below gives this same set): the k entries with the largest |v|; where several
# entries share the k-th largest magnitude, the ones with the lowest positions. NaN counts as larger than inf (as in
# torch.topk). Magnitudes are compared as integer keys: the float's bits with the sign bit cleared order exactly as
# |v| does (NaN above inf), and an integer AND is one cheap pass.
_KEY_TYPES = {
    np.dtype(np.float16): (np.int16, 0x7FFF),
    np.dtype(np.float32): (np.int32, 0x7FFF_FFFF),
    np.dtype(np.float64): (np.int64, 0x7FFF_FFFF_FFFF_FFFF),
}
# Below this many entries one torch.topk call is the fastest selection; above it the sampled threshold wins.
# Measured on the 2-core bench machine, one thread: at 15,000 entries both take ~40-60 us, at 20,000 the
# sampled path is 10-20% faster, at 0.27M 3-8x and at 11M 9-20x (top-10/1/0.1%).
SAMPLED_FROM = 16_384
_SAMPLE_SEED = 0x5EED  # the sample only decides how fast the exact answer is found, never which answer


def magnitude_keys(a: np.ndarray) -> np.ndarray:
    """Integer keys that order like ``abs(a)`` (NaN above inf); float16/32/64 only."""
    int_type, mask = _KEY_TYPES[a.dtype]
    return np.bitwise_and(a.view(int_type), int_type(mask))


def _keep_mask(keys: np.ndarray, k: int, b) -> np.ndarray:
    """Mask of the k largest ``keys`` given that ``b`` is the k-th largest: all above ``b``, then ties in order."""
    keep = keys > b
    short = k - int(np.count_nonzero(keep))
    if short:
        keep[np.flatnonzero(keys == b)[:short]] = True
    return keep


def _top_exact(keys: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions of the k largest keys (ties: lowest positions) by introselect, O(d)."""
    d = len(keys)
    b = np.partition(keys, d - k)[d - k]
    return np.flatnonzero(_keep_mask(keys, k, b))


def _top_small(keys: np.ndarray, k: int) -> np.ndarray:
    """torch.topk on the keys (fastest below SAMPLED_FROM); ties at the k-th key resolved by the common rule."""
    vals, idx = torch.topk(torch.from_numpy(keys), k, sorted=False)
    b = vals.min().item()
    if int(np.count_nonzero(keys >= b)) == k:  # no tie crosses the cut: torch's set is the rule's set
        return np.sort(idx.numpy())
    return np.flatnonzero(_keep_mask(keys, k, b))


def _sample_positions(d: int, s: int) -> np.ndarray:
    """``s`` positions in ``0 .. d-1``, drawn with replacement from a fixed seed."""
    return np.random.default_rng(_SAMPLE_SEED).integers(0, d, s)


def _top_sampled(keys: np.ndarray, k: int) -> np.ndarray:
    """The k largest keys in a few linear passes.

    A seeded random sample of s keys brackets the k-th largest key between two thresholds (the sample ranks
    k s / d -+ 4 standard deviations + 1). Entries at or above the lower one are the candidates (one compare, one
    flatnonzero over d entries); those above the upper one are certainly kept, and an introselect on the narrow band
    between them finds the exact cut. If the sample misses (too few candidates, or too many sure ones; probability
    ~1e-4), the exact O(d) introselect over all keys runs instead. The answer never depends on the sample.
    """
    d = len(keys)
    s = int(min(16_384, max(512, 4 * d**0.5)))
    sample = keys[_sample_positions(d, s)]
    p = k / d
    margin = 4.0 * (s * p * (1 - p)) ** 0.5 + 1
    hi, lo = int(p * s - margin), int(np.ceil(p * s + margin))  # ranks from the top of the sample
    if lo > s:
        return _top_exact(keys, k)
    ranks = [s - lo] + ([s - hi] if hi >= 1 else [])
    part = np.partition(sample, ranks)
    cand = np.flatnonzero(keys >= part[s - lo])
    if len(cand) < k:
        return _top_exact(keys, k)
    ck = keys[cand]
    if hi >= 1:
        t_hi = part[s - hi]
        band = ck[ck <= t_hi]
        need = k - (len(ck) - len(band))
        if need < 0:
            return _top_exact(keys, k)
    else:
        t_hi, band, need = None, ck, k
    b = t_hi if need == 0 else np.partition(band, len(band) - need)[len(band) - need]
    return cand[_keep_mask(ck, k, b)]


def top_positions(keys: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 positions of the ``k`` largest ``keys`` (ties at the k-th key: the lowest positions)."""
    d = len(keys)
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = _top_small(keys, k) if d < SAMPLED_FROM else _top_sampled(keys, k)
    return idx.astype(np.int64, copy=False)


class TopK:
    """Keep the ``k`` largest-magnitude entries, globally or per tensor segment (at least one per segment).

    ``amount`` below 1 is a fraction of the entries, 1 or more a count. ``segments`` (sizes summing to the vector
    length) switches to per-tensor selection. Ties at the k-th magnitude go to the lowest positions; NaN counts as
    the largest magnitude (as in ``torch.topk``). float16/32/64 vectors use :func:`top_positions` (linear time);
    other dtypes fall back to ``torch.topk``.
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
        if self.segments is not None and sum(self.segments) != len(v):
            raise CompressionError(f"segments sum to {sum(self.segments)} but the vector has {len(v)} entries")
        if v.dtype not in (torch.float16, torch.float32, torch.float64):
            return self._select_torch(v)
        keys = magnitude_keys(_as_numpy(v))
        if self.segments is None:
            return top_positions(keys, self.count(len(v)))
        parts, start = [], 0
        for size in self.segments:  # each segment's positions are sorted and offset: the concatenation is sorted
            parts.append(top_positions(keys[start : start + size], self.count(size)) + start)
            start += size
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _select_torch(self, v: torch.Tensor) -> np.ndarray:
        mag = v.abs()
        if self.segments is None:
            idx = torch.topk(mag, self.count(len(v)), sorted=False).indices
        else:
            parts, start = [], 0
            for size in self.segments:
                parts.append(torch.topk(mag[start : start + size], self.count(size), sorted=False).indices + start)
                start += size
            idx = torch.cat(parts)
        return sorted_indices(_as_numpy(idx), len(v))

    def __call__(self, v: torch.Tensor) -> Compressed:
        idx = self.select(v)
        return Compressed(len(v), idx, values=_as_numpy(v)[idx])  # fancy indexing already copies


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
