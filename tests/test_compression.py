"""Compressors: what they keep, quantization levels, composition, error feedback, spec parsing."""

import numpy as np
import pytest
import torch

from flower_sparsepush.core import compression
from flower_sparsepush.core.compression import (
    SAMPLED_FROM,
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


def rule_order(v: torch.Tensor) -> np.ndarray:
    """The selection rule spelled out slowly: largest |v| first (NaN above inf), ties to the lowest position."""
    mag = np.abs(v.numpy()).astype(np.float64)
    nan = np.isnan(mag)
    return np.lexsort((np.arange(len(mag)), -np.where(nan, 0.0, mag), ~nan))  # last key first: NaN, |v|, position


def rule_topk(v: torch.Tensor, k: int, order: np.ndarray | None = None) -> np.ndarray:
    return np.sort((rule_order(v) if order is None else order)[:k]).astype(np.int64)


def cut_is_tied(v: torch.Tensor, k: int) -> bool:
    mag = v.abs()
    return 0 < k < len(v) and int((mag >= torch.topk(mag, k).values[-1]).sum()) > k


SIZES = [1, 7, 1000, SAMPLED_FROM - 1, SAMPLED_FROM, SAMPLED_FROM + 1, 50_000, 300_000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", SIZES)
def test_topk_selects_the_same_set_as_torch_topk(d, dtype):
    v = torch.randn(d, dtype=dtype, generator=torch.Generator().manual_seed(d))
    order = rule_order(v)
    for amount in (0.5, 0.1, 0.01, 0.001, 1, 3, d):
        comp = TopK(amount)
        k = comp.count(d)
        c = comp(v)
        assert c.indices.dtype == np.int64 and c.k == k and np.all(np.diff(c.indices) > 0)
        assert np.array_equal(c.indices, rule_topk(v, k, order)), (amount, k)
        if not cut_is_tied(v, k):  # with no tie at the k-th magnitude the set is torch.topk's, exactly
            assert np.array_equal(c.indices, np.sort(torch.topk(v.abs(), k).indices.numpy()))
        assert np.array_equal(c.values, v.numpy()[c.indices]) and c.values.dtype == v.numpy().dtype


@pytest.mark.parametrize("d", [100, SAMPLED_FROM - 1, SAMPLED_FROM + 1, 200_000])
def test_topk_with_many_zeros_and_ties_keeps_the_lowest_positions(d):
    g = torch.Generator().manual_seed(3)
    few_values = torch.randint(-3, 4, (d,), generator=g).float()  # 7 values: every cut is a tie
    mostly_zero = torch.where(torch.rand(d, generator=g) < 0.95, 0.0, torch.randn(d, generator=g))
    constant = torch.full((d,), -2.0, dtype=torch.float64)
    signed_zeros = torch.tensor([0.0, -0.0]).repeat(d // 2)
    for v in (few_values, mostly_zero, constant, signed_zeros):
        for amount in (0.5, 0.1, 0.01, 0.001, 1):
            k = TopK(amount).count(len(v))
            assert np.array_equal(TopK(amount)(v).indices, rule_topk(v, k)), (amount, v[:5])
    assert TopK(0.1)(constant).indices.tolist() == list(range(TopK(0.1).count(d)))


def test_topk_is_deterministic_and_does_not_depend_on_the_sample(monkeypatch):
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(5))
    want = TopK(0.01)(v).indices
    assert np.array_equal(TopK(0.01)(v.clone()).indices, want)
    mag_order = np.argsort(np.abs(v.numpy()))
    samples = {
        "other seed": lambda d, s: np.random.default_rng(99).integers(0, d, s),
        "only the largest": lambda d, s: np.resize(mag_order[-5:], s),  # threshold too high: too few candidates
        "only the smallest": lambda d, s: np.resize(mag_order[:5], s),  # everything is a candidate
        "only the median": lambda d, s: np.full(s, mag_order[len(v) // 2]),
    }
    for name, sample in samples.items():
        monkeypatch.setattr(compression, "_sample_positions", sample)
        for amount in (0.1, 0.01, 0.001):
            got = TopK(amount)(v).indices
            assert np.array_equal(got, rule_topk(v, TopK(amount).count(len(v)))), (name, amount)
        assert np.array_equal(TopK(0.01)(v).indices, want), name


@pytest.mark.parametrize("d", [100, 50_000])
def test_topk_treats_nan_as_the_largest_magnitude_like_torch_topk(d):
    v = torch.randn(d, generator=torch.Generator().manual_seed(7))
    v[1::17][:3] = float("nan")
    v[2::19][:2] = -float("nan")
    v[3::23][:4] = float("inf")
    v[4::29][:4] = -float("inf")
    k = 20
    c = TopK(k)(v)
    bad = np.flatnonzero(~np.isfinite(v.numpy()))
    assert len(bad) == 13 and set(bad) <= set(c.indices.tolist())
    assert np.array_equal(c.indices, np.sort(torch.topk(v.abs(), k).indices.numpy()))
    assert np.array_equal(c.indices, rule_topk(v, k))
    nans = np.flatnonzero(np.isnan(v.numpy()))
    assert np.array_equal(TopK(5)(v).indices, nans)  # NaN before inf, as torch.topk orders them
    assert np.array_equal(np.sort(torch.topk(v.abs(), 5).indices.numpy()), nans)


def test_per_tensor_topk_applies_the_rule_in_each_segment():
    segments = [1, 5, 300, SAMPLED_FROM - 1, SAMPLED_FROM + 1, 40_000, 2]
    v = torch.randn(sum(segments), dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    v[300:400] = 0.5  # a tied stretch inside one segment
    for amount in (0.1, 0.01, 0.001):
        comp = TopK(amount, segments=segments)
        want, start = [], 0
        for size in segments:
            want.append(rule_topk(v[start : start + size], comp.count(size)) + start)
            start += size
        got = comp(v).indices
        assert np.array_equal(got, np.concatenate(want)) and np.all(np.diff(got) > 0)


def test_topk_of_other_dtypes_falls_back_to_torch_topk():
    v = torch.randn(30_000, generator=torch.Generator().manual_seed(2))
    sel = TopK(0.01).select(v.to(torch.bfloat16))
    assert len(sel) == 300 and np.all(np.diff(sel) > 0)
    h = v.to(torch.float16)
    assert np.array_equal(TopK(0.01)(h).indices, rule_topk(h.float(), 300))  # float16 -> float32 is exact


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
