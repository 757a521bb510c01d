"""Compressors: what they keep, quantization levels, composition, error feedback, spec parsing."""

import numpy as np
import pytest
import torch

from flower_sparsepush.compression import (
    CompressionError,
    Identity,
    Quantize,
    RandK,
    TopK,
    compress_with_feedback,
    dequantize,
    make_compressor,
    quantize,
)


def test_identity_keeps_everything_exactly():
    v = torch.randn(50, dtype=torch.float64)
    c = Identity()(v)
    assert c.indices is None and c.k == 50
    assert torch.equal(c.to_dense(torch.float64), v)


def test_topk_keeps_the_largest_magnitudes():
    v = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 1.0])
    c = TopK(3)(v)
    assert c.indices.tolist() == [1, 3, 5]
    assert c.values.tolist() == [-5.0, 3.0, 1.0]
    assert TopK(0.5).count(6) == 3 and TopK(0.001).count(6) == 1 and TopK(100).count(6) == 6


def test_per_tensor_topk_keeps_at_least_one_entry_per_tensor():
    v = torch.cat([torch.full((100,), 10.0), torch.full((3,), 0.001), torch.full((50,), 5.0)])
    c = TopK(0.01, segments=[100, 3, 50])(v)
    assert sum(1 for i in c.indices if 100 <= i < 103) == 1  # the tiny tensor still gets one entry
    assert TopK(0.01)(v).k == 2  # global top-k would skip it
    with pytest.raises(CompressionError, match="segments sum"):
        TopK(0.1, segments=[1, 2])(v)


def test_randk_is_seeded_and_keeps_k_distinct_entries():
    v = torch.randn(1000)
    a, b = RandK(0.05, seed=1)(v), RandK(0.05, seed=1)(v)
    assert np.array_equal(a.indices, b.indices) and len(np.unique(a.indices)) == 50
    assert not np.array_equal(a.indices, RandK(0.05, seed=2)(v).indices)


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantization_error_is_bounded_by_the_level_spacing(bits):
    rng = np.random.default_rng(bits)
    v = rng.normal(size=2000).astype(np.float32)
    codes, scale = quantize(v, bits)
    assert codes.max() < 2**bits
    back = dequantize(codes, scale, bits)
    if bits == 1:
        assert np.array_equal(np.sign(back), np.where(v >= 0, 1, -1))
        assert np.allclose(np.abs(back), np.abs(v).mean(), rtol=1e-6)
    else:
        levels = 2 ** (bits - 1) - 1
        assert np.abs(back - v).max() <= scale / levels / 2 * (1 + 1e-5)
        assert np.abs(back).max() == pytest.approx(np.abs(v).max(), rel=1e-6)


def test_quantize_all_zero_values():
    codes, scale = quantize(np.zeros(5, dtype=np.float32), 4)
    assert scale == 0.0 and np.all(dequantize(codes, scale, 4) == 0)


def test_composition_quantizes_only_the_kept_values():
    v = torch.randn(1000)
    c = make_compressor("topk:0.01+q:4")(v)
    assert isinstance(make_compressor("topk:0.01+q:4"), Quantize)
    assert c.k == 10 and c.bits == 4 and c.values is None
    assert np.array_equal(c.indices, TopK(0.01)(v).indices)
    assert np.abs(c.decoded_values() - v.numpy()[c.indices]).max() <= c.scale / 7 / 2 * (1 + 1e-5)


def test_error_feedback_keeps_what_was_left_out():
    v = torch.randn(200, dtype=torch.float64)
    e0 = torch.randn(200, dtype=torch.float64)
    c, e = compress_with_feedback(make_compressor("topk:0.1+q:2"), v, e0)
    assert torch.allclose(c.to_dense(torch.float64) + e, v + e0, atol=1e-12)


def test_error_feedback_transmits_everything_eventually():
    # a constant signal sent through top-1 with error feedback: the sum of what is sent approaches t * v
    v = torch.linspace(-1, 1, 20, dtype=torch.float64)
    sent, e, worst = torch.zeros(20, dtype=torch.float64), None, 0.0
    for _ in range(2000):
        c, e = compress_with_feedback(TopK(1), v, e)
        sent += c.to_dense(torch.float64)
        worst = max(worst, float(e.abs().max()))
    assert torch.allclose(sent + e, 2000 * v)  # nothing is lost: sent + memory = everything
    assert worst < 20  # the memory stays bounded, so the average sent converges to v
    assert torch.allclose(sent / 2000, v, atol=0.01)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("zip", "unknown compressor"),
        ("topk:0", "fraction in"),
        ("topk:1.5", "whole count"),
        ("topk:x", "needs a number"),
        ("q:9", "1..8"),
        ("q:0", "1..8"),
        ("q:4+topk:0.1", "unknown compressor"),
        ("topk:0.1+q:4+q:2", "at most one"),
        ("topk-layer:0.1", "tensor sizes"),
    ],
)
def test_bad_specs_get_one_clear_error(spec, msg):
    with pytest.raises(CompressionError, match=msg):
        make_compressor(spec)


def test_spec_round_trip_names():
    for spec in ["none", "topk:0.01", "randk:0.1", "q:4", "topk:0.01+q:2", "topk:50"]:
        assert make_compressor(spec).spec == spec
    assert make_compressor("topk-layer:0.1", segments=[5, 5]).spec == "topk-layer:0.1"
