"""The claims switches: their rules (sparsity ramp, gamma ramp, final merge, validation split), their bits, mass
conservation with them on, and their bad values."""

import math

import numpy as np
import pytest
import torch

from flower_sparsepush.core.merge import merge_bits, merge_traffic
from flower_sparsepush.core.pushsum import NodeState, PushSum
from flower_sparsepush.run.config import ConfigError, validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import local_sgd
from flower_sparsepush.run.preflight import preflight
from flower_sparsepush.run.schedule import compressor_at, gamma_at
from flower_sparsepush.run.setup import get_setup, validation_split


def _cfg(**kw):
    base = {"dataset": "synthetic", "model": "mlp", "num-nodes": 8, "graph": "exponential", "num-rounds": 20,
            "compressor": "topk:0.02+q:4", "gamma": 0.2, "lr": 0.1}  # fmt: skip
    return validate(base | kw)


def test_sparsity_warmup_ramps_exponentially_to_the_target():
    cfg = _cfg(**{"sparsity-warmup": 10, "sparsity-warmup-start": 0.2})
    fracs = [float(compressor_at(cfg, t).split("+")[0].split(":")[1]) for t in range(12)]
    assert fracs[0] == pytest.approx(0.2)
    assert fracs[5] == pytest.approx(math.sqrt(0.2 * 0.02), rel=1e-4)  # geometric midpoint
    assert all(a > b for a, b in zip(fracs[:10], fracs[1:11]))  # strictly falling during the ramp
    assert fracs[10] == fracs[11] == 0.02
    assert all(compressor_at(cfg, t).endswith("+q:4") for t in range(12))  # the quantizer stays
    assert compressor_at(_cfg(), 0) == "topk:0.02+q:4"  # off by default


def test_sparsity_schedule_lr_follows_the_learning_rate_and_keeps_the_mean_fraction():
    cfg = _cfg(**{"sparsity-schedule": "lr", "lr-schedule": "cosine", "num-rounds": 40, "final-gossip-rounds": 5})
    fracs = [float(compressor_at(cfg, t).split("+")[0].split(":")[1]) for t in range(40)]
    lrs = [0.05 * (1 + math.cos(math.pi * t / 40)) for t in range(40)]  # cosine from lr 0.1 (mean 0.05)
    for f, lr in zip(fracs, lrs):
        assert f == pytest.approx(max(0.001, 0.02 * lr / np.mean(lrs)), rel=1e-4)  # F lr_t / mean lr, floor F/20
    assert fracs[0] == pytest.approx(0.04, rel=0.03) and fracs[-1] == pytest.approx(0.001)  # 2F at the start
    assert np.mean(fracs) == pytest.approx(0.02, rel=0.02)  # the run keeps about the bits of F (the floor adds)
    assert compressor_at(cfg, 42) == "topk:0.02+q:4"  # gossip-only final rounds: F
    assert compressor_at(_cfg(**{"sparsity-schedule": "lr"}), 7) == "topk:0.02+q:4"  # constant lr: F throughout


def test_sparsity_schedule_lr_spends_the_bits_early_and_conserves_mass():
    common = {"lr-schedule": "cosine", "num-rounds": 20}
    plain = run_inprocess(_cfg(**common), eval_every=10)
    by_lr = run_inprocess(_cfg(**common | {"sparsity-schedule": "lr"}), eval_every=10)
    first = [r["bits_sent_per_node"] for r in (plain.history[0], by_lr.history[0])]
    assert first[1] > 1.3 * first[0]  # the first half of a cosine keeps 1.64x the entries (headers do not grow)
    assert sum(by_lr.bits_sent) == pytest.approx(sum(plain.bits_sent), rel=0.15)  # about the same in all
    last = by_lr.history[-1]
    assert last["y_nodes"] + last["y_in_transit"] == pytest.approx(8.0, abs=1e-9)


def test_gamma_warmup_is_linear_then_constant():
    cfg = _cfg(**{"gamma-warmup": 4})
    assert [gamma_at(cfg, t) for t in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    assert gamma_at(_cfg(), 0) == 0.2


def test_gamma_schedule_kept_scales_gamma_with_the_kept_fraction_and_conserves_mass():
    common = {"lr-schedule": "cosine", "num-rounds": 20, "sparsity-schedule": "lr", "gamma-warmup": 2}
    cfg = _cfg(**common | {"gamma-schedule": "kept", "final-gossip-rounds": 2})
    for t in range(22):
        frac = float(compressor_at(cfg, t).split("+")[0].split(":")[1])
        warm = min(1.0, (t + 1) / 2)  # the warm-up ramp first, then the kept fraction's share of F
        assert gamma_at(cfg, t) == pytest.approx(0.2 * warm * frac / 0.02, rel=1e-9)
    assert gamma_at(cfg, 0) < gamma_at(cfg, 2) > gamma_at(cfg, 19)  # largest where the kept fraction is
    assert gamma_at(cfg, 20) == 0.2  # gossip-only final rounds: F, so gamma itself
    assert gamma_at(_cfg(**common | {"gamma-schedule": "kept", "gamma": 0.9}), 2) == 1.0  # capped at 1
    plain = run_inprocess(_cfg(**common), eval_every=10)
    kept = run_inprocess(cfg.replace(final_gossip_rounds=0), eval_every=10)
    # the same number of entries per message (only the step changes); the index coding's size follows the positions
    assert sum(kept.bits_sent) == pytest.approx(sum(plain.bits_sent), rel=0.01)
    assert any(torch.any(a.z != b.z) for a, b in zip(kept.states, plain.states))
    for res in (plain, kept):
        last = res.history[-1]
        assert last["y_nodes"] + last["y_in_transit"] == pytest.approx(8.0, abs=1e-9)


def test_sparsity_warmup_costs_more_bits_early_and_conserves_mass():
    plain = run_inprocess(_cfg(), eval_every=20)
    warm = run_inprocess(_cfg(**{"sparsity-warmup": 10, "sparsity-warmup-start": 0.3}), eval_every=20)
    assert sum(warm.bits_sent) > 1.5 * sum(plain.bits_sent)  # the first rounds send up to 15x more entries
    last = warm.history[-1]
    assert last["y_nodes"] + last["y_in_transit"] == pytest.approx(8.0, abs=1e-9)


def test_final_merge_gives_every_node_the_exact_average_and_counts_its_bits():
    base = _cfg(**{"gamma-warmup": 5})
    merged_cfg = _cfg(**{"gamma-warmup": 5, "final-merge": True})
    plain = run_inprocess(base, eval_every=20)
    merged = run_inprocess(merged_cfg, eval_every=20)
    # the average the merge computes: all mass, in the nodes and in transit (what plain would deliver next)
    total_y = sum(s.y for s in plain.states)
    from flower_sparsepush.core.codec import decode

    for box in plain.mailboxes:
        for data in box:
            msg = decode(data)
            total_y += msg.y
    zbar_merged = merged.states[0].z.double()
    for s in merged.states:
        assert torch.equal(s.z, merged.states[0].z)  # every node holds the same model
    assert merged.history[-1]["consensus_distance"] == 0.0
    assert merged.history[-1]["acc_node_min"] == merged.history[-1]["acc_consensus"]
    assert sum(s.y for s in merged.states) == pytest.approx(8.0, abs=1e-9)  # mass kept, nothing in transit
    assert merged.router.in_transit_mass() == 0.0
    assert float(zbar_merged.norm()) > 0 and total_y > 7.999  # (plain's transit mass is part of the total)
    setup = get_setup(merged_cfg)
    d = setup.x0.numel()
    # the merge's bits, exactly, on top of the same gossip: every node sends its tensors to their owners
    assert all(b > a for a, b in zip(plain.bits_sent, merged.bits_sent))
    assert sum(merged.bits_sent) - sum(plain.bits_sent) == merge_traffic(8, 32, setup.segments)
    assert merge_traffic(8, 32, setup.segments) >= 7 / 8 * merge_bits(d) >= 7 / 8 * 2 * 32 * d


def test_validation_split_is_stratified_disjoint_and_seeded():
    y = torch.arange(1000) % 10
    keep, held = validation_split(y, 0.1, seed=3)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 1000
    assert np.bincount(y[held].numpy(), minlength=10).tolist() == [10] * 10
    assert torch.equal(held, validation_split(y, 0.1, seed=3)[1])
    assert not torch.equal(held, validation_split(y, 0.1, seed=4)[1])
    setup = get_setup(_cfg(**{"val-split": 0.2}))
    assert len(setup.val[1]) == 400 and setup.train_size == 1600  # synthetic: 2,000 training samples


def test_gradient_lookahead_points_at_the_mean_of_the_in_copies():
    z = torch.tensor([1.0, 2.0, 3.0])
    state = NodeState(x=2.0 * z, y=2.0)  # de-biased model z
    assert PushSum.lookahead_offset(state, 0.8) is None  # no copy yet: gradients at z
    state.refs_in = {3: torch.tensor([3.0, 2.0, 1.0]), 5: torch.tensor([1.0, 0.0, 5.0])}
    mean = torch.tensor([2.0, 1.0, 3.0])
    assert torch.allclose(PushSum.lookahead_offset(state, 0.8), 0.8 * (mean - z))
    assert torch.allclose(z + PushSum.lookahead_offset(state, 1.0), mean)  # c = 1: at the copies' mean
    assert PushSum.lookahead_offset(state, 0.0) is None  # off


def test_gradient_lookahead_steps_from_z_with_the_gradient_of_the_shifted_point():
    # one plain SGD step (no momentum, no weight decay): z - lr g(z + o), exactly what a step from z + o moves
    cfg = _cfg(**{"local-steps": 1, "momentum": 0.0, "weight-decay": 0.0})
    setup = get_setup(cfg)
    z = setup.x0.clone()
    o = 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    moved, _, _ = local_sgd(setup, z, None, 0, 0, offset=o)
    shifted, _, _ = local_sgd(setup, z + o, None, 0, 0)
    assert torch.allclose(moved - z, shifted - (z + o), atol=1e-6)
    plain, _, _ = local_sgd(setup, z, None, 0, 0)
    assert not torch.allclose(moved, plain, atol=1e-4)  # the offset changed the gradient


def test_gradient_lookahead_conserves_mass_and_trains():
    runs = {c: run_inprocess(_cfg(**{"gradient-lookahead": c, "num-rounds": 30}), eval_every=30) for c in (0.0, 0.8)}
    last = runs[0.8].history[-1]
    assert last["y_nodes"] + last["y_in_transit"] == pytest.approx(8.0, abs=1e-9)
    assert runs[0.8].bits_sent == pytest.approx(runs[0.0].bits_sent, rel=0.05)  # no extra messages
    assert last["acc_consensus"] > 0.8 and last["acc_consensus"] >= runs[0.0].history[-1]["acc_consensus"] - 0.05


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"sparsity-warmup": 10, "compressor": "none"}, "keeps a fraction"),
        ({"sparsity-warmup": 10, "compressor": "topk:20"}, "keeps a fraction"),
        ({"sparsity-warmup": 10, "sparsity-warmup-start": 0.01}, "larger than"),
        ({"sparsity-warmup": -1}, "sparsity-warmup"),
        ({"sparsity-schedule": "lr", "compressor": "none"}, "sparsity-schedule=lr: needs a compressor that keeps"),
        ({"sparsity-schedule": "lr", "sparsity-warmup": 5}, "not both"),
        ({"sparsity-schedule": "step"}, "sparsity-schedule"),
        ({"gamma-warmup": -2}, "gamma-warmup"),
        ({"gamma-schedule": "kept"}, "gamma-schedule=kept: gamma follows the kept fraction"),
        ({"gamma-schedule": "lr"}, "gamma-schedule"),
        ({"strategy": "fedavg", "gamma-schedule": "kept", "sparsity-schedule": "lr"}, "not fedavg"),
        ({"val-split": 0.6}, "val-split"),
        ({"device": "tpu"}, "device"),
        ({"strategy": "fedavg", "final-merge": True}, "not fedavg"),
        ({"gradient-lookahead": 1.5}, "gradient-lookahead=1.5: must be in"),
        ({"gradient-lookahead": 0.5, "form": "ef"}, "form=ef keeps none"),
        ({"gradient-lookahead": 0.5, "strategy": "fedavg"}, "not fedavg"),
    ],
)
def test_bad_switch_values_get_one_clear_error(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(**bad)


def test_qgm_stays_finite_with_local_steps_and_a_cosine_schedule_to_zero():
    # before the fix the buffer grew by mu + (1 - mu) H mu per round (H = 4: 1.26) and took gossip / (lr -> 0):
    # every node's model became NaN on the 20-epoch claims schedule
    cfg = _cfg(**{"qgm": True, "local-steps": 4, "lr-schedule": "cosine", "num-rounds": 60, "partition": "skew:0.8"})
    res = run_inprocess(cfg, eval_every=60)
    assert all(torch.isfinite(s.z).all() and torch.isfinite(s.momentum).all() for s in res.states)
    assert max(float(s.momentum.norm()) for s in res.states) < 100
    assert res.history[-1]["acc_consensus"] > 0.5  # chance is 0.1


def test_scsp_is_sparse_push_with_the_final_merge_and_says_so_on_flower():

    cfg = _cfg(strategy="scsp")
    assert cfg.final_merge and not cfg.qgm and cfg.final_gossip_rounds == 0
    assert not _cfg(strategy="scsp", **{"final-merge": False}).final_merge
    preflight(cfg, flower=True)  # the nodes compute the merge on Flower too (tests/test_flower_merge.py)
