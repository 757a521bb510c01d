"""Wire codec: exact round trips, real bit counts, index-coding choice, rejection of bad input."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_sparsepush.core.codec import (
    BITMAP,
    FIXED,
    HEADER,
    RICE,
    CodecError,
    Message,
    decode,
    encode,
    encode_indices,
    entropy_bits,
    index_bits,
    message_entropy_bits,
    pack_uint,
    payload_entropy_bits,
    unpack_uint,
)
from flower_sparsepush.core.compression import Compressed, quantize


@st.composite
def messages(draw):
    dim = draw(st.integers(1, 5000))
    dense = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    k = dim if dense else draw(st.integers(0, dim))
    idx = None if dense else np.sort(rng.choice(dim, size=k, replace=False)).astype(np.int64)
    kind = draw(st.sampled_from(["f32", "f64", "q"]))
    vals = rng.normal(size=k)
    if kind == "q":
        bits = draw(st.integers(1, 8))
        codes, scale = quantize(vals.astype(np.float32), bits)
        payload = Compressed(dim, idx, codes=codes, scale=scale, bits=bits)
    else:
        payload = Compressed(dim, idx, values=vals.astype(np.float32 if kind == "f32" else np.float64))
    return Message(
        sender=draw(st.integers(0, 2**32 - 1)),
        round=draw(st.integers(0, 2**32 - 1)),
        a=draw(st.floats(1e-6, 1.0)),
        y=draw(st.floats(1e-300, 1e300)),
        payload=payload,
        form=draw(st.sampled_from(["ef", "ref", "ref-x"])),
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip_is_exact_for_every_kind_of_message(msg):
    data = encode(msg)
    assert decode(data) == msg
    assert decode(data, expected_dim=msg.payload.dim) == msg


def test_bit_count_is_the_encoded_length_and_the_smallest_index_coding_is_used():
    rng = np.random.default_rng(0)
    dim = 100_000
    for k, expected in [(2, FIXED), (20, RICE), (1000, RICE), (40_000, BITMAP)]:
        idx = np.sort(rng.choice(dim, size=k, replace=False))
        coding, body = encode_indices(idx, dim)
        assert coding == expected
        sizes = index_bits(idx, dim)
        assert 8 * len(body) == sizes[coding] == min(sizes.values())
        data = encode(Message(0, 0, 0.5, 0.5, Compressed(dim, idx, values=np.zeros(k, np.float32))))
        assert len(data) == HEADER.size + len(body) + 4 * k


def test_rice_coding_is_near_the_entropy_bound_for_random_positions():
    rng = np.random.default_rng(1)
    dim = 270_000
    for frac in (0.1, 0.01, 0.001):
        k = int(frac * dim)
        idx = np.sort(rng.choice(dim, size=k, replace=False))
        positions = entropy_bits(dim, k, 0)
        assert min(index_bits(idx, dim).values()) / positions < 1.06


def test_entropy_ratio_of_a_top1_percent_4bit_message():
    rng = np.random.default_rng(2)
    dim, k = 270_000, 2700
    idx = np.sort(rng.choice(dim, size=k, replace=False))
    codes, scale = quantize(rng.normal(size=k).astype(np.float32), 4)
    c = Compressed(dim, idx, codes=codes, scale=scale, bits=4)
    data = encode(Message(1, 2, 0.5, 0.5, c))
    assert message_entropy_bits(data) == pytest.approx(payload_entropy_bits(c))
    ratio = 8 * len(data) / payload_entropy_bits(c)
    assert 1.0 < ratio < 1.05


@pytest.mark.parametrize("width", [1, 3, 8, 17, 32])
def test_pack_unpack_uint(width):
    vals = np.random.default_rng(width).integers(0, 2**width, size=101)
    assert np.array_equal(unpack_uint(pack_uint(vals, width), 101, width), vals)


def _valid(dim=1000, k=10, **kw):
    idx = np.arange(0, dim, dim // k)[:k]
    return Message(3, 7, 0.25, 0.5, Compressed(dim, idx, values=np.ones(k, np.float32)), **kw)


def test_every_truncation_is_rejected_with_a_clear_error():
    data = encode(_valid())
    for cut in range(len(data)):
        with pytest.raises(CodecError, match="truncated|corrupt|header|section"):
            decode(data[:cut])


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda b: b"XX" + b[2:], "bad magic"),
        (lambda b: b[:2] + bytes([9]) + b[3:], "version 9 is not supported"),
        (lambda b: b + b"\0", "oversize"),
        (lambda b: b[:-4] + struct.pack("<f", float("nan")), "NaN"),
        (lambda b: b[:-4] + struct.pack("<f", float("inf")), "infinite"),
    ],
)
def test_corrupt_messages_are_rejected(mutate, msg):
    with pytest.raises(CodecError, match=msg):
        decode(mutate(encode(_valid())))


def _with_header(**fields):
    m = _valid()
    data = encode(m)
    vals = dict(
        zip(["magic", "version", "flags", "vbits", "sender", "round", "dim", "k", "a", "y"], HEADER.unpack_from(data))
    )
    vals.update(fields)
    return HEADER.pack(*vals.values()) + data[HEADER.size :]


@pytest.mark.parametrize(
    "fields,msg",
    [
        ({"y": float("nan")}, "weight y=nan"),
        ({"y": -1.0}, "weight y=-1.0"),
        ({"y": 0.0}, "weight y=0.0"),
        ({"a": 2.0}, "mixing factor"),
        ({"k": 2000}, "kept entries"),
        ({"dim": 0}, "kept entries"),
        ({"flags": 0xFF}, "unknown flag"),
        ({"vbits": 4}, "bits per value"),
    ],
)
def test_bad_header_fields_are_rejected(fields, msg):
    with pytest.raises(CodecError, match=msg):
        decode(_with_header(**fields))


def test_out_of_range_and_duplicate_indices_are_rejected():
    # fixed-width indices: write them by hand so that they are out of range / repeated
    for idx in ([5, 5, 9], [1, 2, 1000], [9, 3, 4]):
        body = struct.pack("<B", 10) + pack_uint(np.array(idx), 10)
        head = HEADER.pack(b"SP", 1, 1 | (FIXED << 1), 32, 0, 0, 1000, 3, 0.5, 0.5)
        with pytest.raises(CodecError, match="out of range, repeated or unsorted"):
            decode(head + body + np.ones(3, np.float32).tobytes())


def test_dimension_mismatch_is_rejected():
    with pytest.raises(CodecError, match="the model has 999"):
        decode(encode(_valid()), expected_dim=999)


def test_random_corruptions_never_crash_the_decoder():
    rng = np.random.default_rng(5)
    base = [encode(_valid()), encode(Message(1, 1, 0.5, 1.0, Compressed(300, None, values=np.ones(300))))]
    c, s = quantize(np.linspace(-1, 1, 50).astype(np.float32), 3)
    base.append(encode(Message(1, 1, 0.5, 1.0, Compressed(4000, np.arange(0, 4000, 80), codes=c, scale=s, bits=3))))
    for _ in range(3000):
        data = bytearray(base[rng.integers(len(base))])
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] = rng.integers(256)
        try:
            msg = decode(bytes(data))
        except CodecError:
            continue
        vals = msg.payload.decoded_values()  # what survives must be usable: finite values, valid indices
        assert np.isfinite(vals).all() and len(vals) == msg.payload.k
        if msg.payload.indices is not None and msg.payload.k:
            assert 0 <= msg.payload.indices.min() and msg.payload.indices.max() < msg.payload.dim
