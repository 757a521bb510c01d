"""Wire codec: one push-sum message <-> one bytes object.

Layout (little-endian), format version 1::

    magic b"SP" | version u8 | flags u8 | value bits u8 | sender u32 | round u32 | dim u32 | k u32 | a f64 | y f64
    [index section]  present when sparse (flag bit 0); coding in flag bits 1-2:
        0 bitmap: ceil(dim/8) bytes, bit j set when entry j is kept
        1 rice:   param r u8 | unary-part length u32 | unary bytes | k remainders of r bits
                  (gaps g_i = idx_i - idx_{i-1} - 1 with idx_{-1} = -1; unary part: g_i >> r ones then a zero)
        2 fixed:  width u8 | k indices of `width` bits
    [value section]  quantized (flag bit 3): scale f32 | k codes of `value bits` bits (1..8)
                     raw: k values of `value bits` bits: float32 (32) or float64 (64, flag bit 4)
    flag bits 5-6: the push-sum form the message belongs to (0 ef, 1 ref, 2 ref-x; see pushsum.py); a receiver of
    another form rejects it

The index coding is chosen per message as the smallest of the three. Bit counts are ``8 * len(bytes)`` of real
messages. No Flower imports.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from flower_sparsepush.core.compression import Compressed

VERSION = 1
MAGIC = b"SP"
HEADER = struct.Struct("<2sBBBIIIIdd")
MAX_DIM = 2**32 - 1
BITMAP, RICE, FIXED = 0, 1, 2
CODING_NAMES = {BITMAP: "bitmap", RICE: "rice", FIXED: "fixed"}
FORMS = ("ef", "ref", "ref-x")  # push-sum forms, by their code on the wire
FORM_CODES = {name: code for code, name in enumerate(FORMS)}


class CodecError(ValueError):
    """A message that cannot be decoded (truncated, corrupt, wrong version, values out of range)."""


@dataclass(frozen=True)
class Message:
    """One push-sum message: the sender's mixing factor ``a``, the weight mass ``y`` it carries, and a payload."""

    sender: int
    round: int
    a: float
    y: float
    payload: Compressed
    form: str = "ef"


# -- bit packing ---------------------------------------------------------------------------------------------------


def _uint_view(width: int) -> tuple[str, int]:
    """Big-endian unsigned dtype wide enough for ``width`` bits, and its bit count."""
    for dt, bits in ((">u1", 8), (">u2", 16), (">u4", 32)):
        if width <= bits:
            return dt, bits
    return ">u8", 64


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers, ``width`` bits each, most significant bit first."""
    if width == 0 or len(values) == 0:
        return b""
    # bytes of each value big-endian -> bits (uint8, no 64-bit temporaries) -> keep the low ``width`` bits
    dt, bits = _uint_view(width)
    allbits = np.unpackbits(np.ascontiguousarray(values, dtype=dt).view(np.uint8)).reshape(len(values), bits)
    return np.packbits(allbits[:, bits - width :]).tobytes()


def unpack_uint(buf: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * width).reshape(count, width)
    dt, nbits = _uint_view(width)
    if nbits != width:  # left-pad each value's bits to a whole big-endian integer
        full = np.zeros((count, nbits), dtype=np.uint8)
        full[:, nbits - width :] = bits
        bits = full
    return np.packbits(bits).view(dt).astype(np.int64)


def _nbytes(bits: int) -> int:
    return (bits + 7) // 8


# -- index codings -------------------------------------------------------------------------------------------------


def _rice_param(gaps: np.ndarray) -> tuple[int, int]:
    """The Rice parameter with the fewest bits, and that bit count (unary + remainder parts, byte-aligned)."""
    mean = float(gaps.mean()) if len(gaps) else 0.0
    guess = max(0, int(math.log2(mean * math.log(2) + 1)))
    best = None
    for r in range(max(0, guess - 2), min(guess + 3, 33)):
        size = 8 * (_nbytes(int((gaps >> r).sum()) + len(gaps)) + _nbytes(r * len(gaps)))
        if best is None or size < best[1]:
            best = (r, size)
    return best


def _encode_rice(idx: np.ndarray, r: int, gaps: np.ndarray | None = None) -> bytes:
    if gaps is None:
        gaps = np.diff(idx, prepend=-1) - 1
    q = gaps >> r
    ends = np.cumsum(q + 1) - 1  # position of each terminating zero
    unary = np.ones(int(ends[-1]) + 1 if len(ends) else 0, dtype=np.uint8)
    unary[ends] = 0
    ubytes = np.packbits(unary).tobytes()
    return struct.pack("<BI", r, len(ubytes)) + ubytes + pack_uint(gaps & ((1 << r) - 1), r)


def _decode_rice(buf: memoryview, pos: int, k: int) -> tuple[np.ndarray, int]:
    r, ulen = struct.unpack_from("<BI", buf, pos)
    pos += 5
    if r > 32:
        raise CodecError(f"corrupt message: Rice parameter {r} is out of range (0..32)")
    if pos + ulen > len(buf):
        raise CodecError("truncated message: the index section is cut short")
    unary = np.unpackbits(np.frombuffer(buf[pos : pos + ulen], dtype=np.uint8))
    pos += ulen
    ends = np.flatnonzero(unary == 0)[:k]
    if len(ends) < k:
        raise CodecError("corrupt message: the index section holds fewer indices than the header says")
    q = np.diff(ends, prepend=-1) - 1
    rlen = _nbytes(r * k)
    if pos + rlen > len(buf):
        raise CodecError("truncated message: the index section is cut short")
    rem = unpack_uint(bytes(buf[pos : pos + rlen]), k, r)
    gaps = (q.astype(np.int64) << r) | rem
    return np.cumsum(gaps + 1) - 1, pos + rlen


def _index_sizes(idx: np.ndarray, dim: int) -> tuple[dict[int, int], np.ndarray, int]:
    """Bits of each index coding, the gaps and the best Rice parameter (computed once, shared by the callers)."""
    k = len(idx)
    width = max(1, int(dim - 1).bit_length())
    gaps = np.diff(idx, prepend=-1) - 1
    r, rice = _rice_param(gaps) if k else (0, 0)
    sizes = {BITMAP: 8 * _nbytes(dim), RICE: 8 * 5 + rice, FIXED: 8 + 8 * _nbytes(width * k)}
    return sizes, gaps, r


def index_bits(idx: np.ndarray, dim: int) -> dict[int, int]:
    """Bits each index coding would use for these indices (byte-aligned, parameters included)."""
    return _index_sizes(idx, dim)[0]


def _bitmap(idx: np.ndarray, dim: int) -> bytes:
    mask = np.zeros(dim, dtype=np.bool_)
    mask[idx] = True
    return np.packbits(mask).tobytes()


def _bitmap_indices(raw: np.ndarray, dim: int) -> np.ndarray:
    """Positions of the set bits among the first ``dim`` bits of a bitmap (only its non-zero bytes are unpacked)."""
    nz = np.flatnonzero(raw)
    rows, cols = np.nonzero(np.unpackbits(raw[nz]).reshape(len(nz), 8))
    idx = nz[rows] * 8 + cols
    return idx[idx < dim] if len(idx) and idx[-1] >= dim else idx


def encode_indices(idx: np.ndarray, dim: int) -> tuple[int, bytes]:
    """The smallest coding of sorted unique indices, as (coding id, bytes)."""
    sizes, gaps, r = _index_sizes(idx, dim)
    coding = min(sizes, key=sizes.get)
    if coding == BITMAP:
        return coding, _bitmap(idx, dim)
    if coding == RICE:
        return coding, _encode_rice(idx, r, gaps)
    width = max(1, int(dim - 1).bit_length())
    return coding, struct.pack("<B", width) + pack_uint(idx, width)


# -- messages ------------------------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Serialize a message to bytes (the only form that travels)."""
    c = msg.payload
    if not 0 < c.dim <= MAX_DIM:
        raise CodecError(f"vector length {c.dim} is out of range 1..{MAX_DIM}")
    flags, parts = 0, []
    if c.indices is not None:
        coding, ibytes = encode_indices(c.indices, c.dim)
        flags |= 1 | (coding << 1)
        parts.append(ibytes)
    if c.codes is not None:
        flags |= 8
        vbits = c.bits
        parts.append(struct.pack("<f", c.scale) + pack_uint(c.codes, c.bits))
    elif c.values.dtype == np.float64:
        flags |= 16
        vbits = 64
        parts.append(c.values.astype("<f8").tobytes())
    else:
        vbits = 32
        parts.append(c.values.astype("<f4").tobytes())
    flags |= FORM_CODES[msg.form] << 5
    head = HEADER.pack(MAGIC, VERSION, flags, vbits, msg.sender, msg.round, c.dim, c.k, msg.a, msg.y)
    return head + b"".join(parts)


def decode(data: bytes, expected_dim: int | None = None) -> Message:
    """Parse and validate a message; raise :class:`CodecError` with the reason when it is not a valid message."""
    buf = memoryview(bytes(data))
    if len(buf) < HEADER.size:
        raise CodecError(f"truncated message: {len(buf)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, flags, vbits, sender, rnd, dim, k, a, y = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError("not a sparse-push message (bad magic bytes)")
    if version != VERSION:
        raise CodecError(f"message format version {version} is not supported (this build reads version {VERSION})")
    if flags & ~127 or (flags >> 5) >= len(FORM_CODES):
        raise CodecError(f"corrupt message: unknown flag bits {flags:#x}")
    if vbits != (64 if flags & 16 else 32) and not (flags & 8 and 1 <= vbits <= 8):
        raise CodecError(f"corrupt message: {vbits} bits per value does not match the value format")
    if expected_dim is not None and dim != expected_dim:
        raise CodecError(f"message is for a vector of {dim} entries, the model has {expected_dim}")
    if dim == 0 or k > dim or (not flags & 1 and k != dim):
        raise CodecError(f"corrupt message: {k} kept entries of a {dim}-entry vector")
    if not (math.isfinite(a) and 0 < a <= 1):
        raise CodecError(f"corrupt message: mixing factor a={a} is not in (0, 1]")
    if not (math.isfinite(y) and y > 0):
        raise CodecError(f"corrupt message: weight y={y} is not finite and positive")
    pos = HEADER.size
    idx = None
    try:
        if flags & 1:
            coding = (flags >> 1) & 3
            if coding == BITMAP:
                n = _nbytes(dim)
                if pos + n > len(buf):
                    raise CodecError("truncated message: the index bitmap is cut short")
                idx = _bitmap_indices(np.frombuffer(buf[pos : pos + n], dtype=np.uint8), dim)
                pos += n
            elif coding == RICE:
                idx, pos = _decode_rice(buf, pos, k)
            elif coding == FIXED:
                (width,) = struct.unpack_from("<B", buf, pos)
                n = _nbytes(width * k)
                if not 1 <= width <= 32 or pos + 1 + n > len(buf):
                    raise CodecError("truncated or corrupt message: fixed-width index section")
                idx = unpack_uint(bytes(buf[pos + 1 : pos + 1 + n]), k, width)
                pos += 1 + n
            else:
                raise CodecError(f"corrupt message: unknown index coding {coding}")
            idx = idx.astype(np.int64, copy=False)
            if len(idx) != k:
                raise CodecError(f"corrupt message: {len(idx)} indices where the header says {k}")
            if k and (idx[0] < 0 or idx[-1] >= dim or np.any(np.diff(idx) <= 0)):
                raise CodecError("corrupt message: indices out of range, repeated or unsorted")
        if flags & 8:
            (scale,) = struct.unpack_from("<f", buf, pos)
            n = _nbytes(vbits * k)
            if not math.isfinite(scale) or scale < 0:
                raise CodecError(f"corrupt message: quantization scale {scale} is not finite and >= 0")
            if pos + 4 + n != len(buf):
                raise CodecError("truncated or oversize message: the value section has the wrong length")
            codes = unpack_uint(bytes(buf[pos + 4 : pos + 4 + n]), k, vbits).astype(np.uint8)
            if vbits >= 2 and codes.max(initial=0) > 2**vbits - 2:
                raise CodecError("corrupt message: a quantization code is out of range")
            payload = Compressed(dim, idx, codes=codes, scale=float(scale), bits=vbits)
        else:
            dtype = np.dtype("<f8") if flags & 16 else np.dtype("<f4")
            if len(buf) - pos != k * dtype.itemsize:
                raise CodecError("truncated or oversize message: the value section has the wrong length")
            values = np.frombuffer(buf[pos:], dtype=dtype).astype(dtype.newbyteorder("="))
            if not np.isfinite(values).all():
                raise CodecError("corrupt message: values are NaN or infinite")
            payload = Compressed(dim, idx, values=values)
    except struct.error:
        raise CodecError("truncated message: a section header is cut short") from None
    return Message(sender, rnd, a, y, payload, FORMS[flags >> 5])


def max_size(c: Compressed) -> int:
    """The longest encoding, in bytes, of any payload with the dim, kept-entry count and value format of ``c``.

    The encoder picks the smallest index coding, so the index section is at most the bitmap or the fixed-width
    one, whichever is smaller. The relay refuses longer messages (guard.py).
    """
    size = HEADER.size
    if c.indices is not None:
        width = max(1, int(c.dim - 1).bit_length())
        size += min(_nbytes(c.dim), 1 + _nbytes(width * c.k))
    if c.codes is not None:
        return size + 4 + _nbytes(c.bits * c.k)
    return size + c.k * c.values.dtype.itemsize


def entropy_bits(dim: int, k: int, value_bits: int) -> float:
    """The entropy bound for a message: ``log2 C(dim, k)`` for the positions plus the value bits."""
    positions = (
        0.0 if k in (0, dim) else (math.lgamma(dim + 1) - math.lgamma(k + 1) - math.lgamma(dim - k + 1)) / math.log(2)
    )
    return positions + value_bits


def message_entropy_bits(data: bytes) -> float:
    """Entropy bound of an encoded message, read from its header alone (positions plus value bits)."""
    _, _, flags, vbits, _, _, dim, k, _, _ = HEADER.unpack_from(data, 0)
    return entropy_bits(dim, k, k * vbits + (32 if flags & 8 else 0))


def payload_entropy_bits(c: Compressed) -> float:
    """Entropy bound of one payload: positions plus the bits its values need (raw width, or codes plus scale)."""
    if c.codes is not None:
        return entropy_bits(c.dim, c.k, c.k * c.bits + 32)
    return entropy_bits(c.dim, c.k, c.k * 8 * c.values.dtype.itemsize)
