"""Global merges (merge.py, run-config merge-bits and merge-every): the exact merge is the push-sum average with the
mass kept; the quantized merge gives every node the same model within one rounding step per tensor of the exact
average; its bits are those of the encoded messages; periodic merges land where they should, are counted, survive
a resume, and bad values are refused."""

import pytest
import torch

from flower_sparsepush.core.codec import HEADER
from flower_sparsepush.core.merge import correct_bias, correct_drift, merge, merge_bits, merge_mass, merge_traffic
from flower_sparsepush.core.pushsum import NodeState
from flower_sparsepush.run.config import ConfigError, validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.preflight import preflight
from flower_sparsepush.run.schedule import merge_due
from flower_sparsepush.run.setup import get_setup

SEGMENTS = [40, 7, 153]  # three tensors of very different scales below
D = sum(SEGMENTS)


def _states(n=6, seed=0, refs=True):
    g = torch.Generator().manual_seed(seed)
    scale = torch.cat([torch.full((s,), f) for s, f in zip(SEGMENTS, (1.0, 0.01, 30.0))]).double()
    states = []
    for i in range(n):
        y = 0.3 + float(torch.rand(1, generator=g))
        z = torch.randn(D, generator=g, dtype=torch.float64) * scale
        s = NodeState(x=y * z, y=y)
        if refs:
            s.refs_out = {(i + 1) % n: torch.randn(D, generator=g, dtype=torch.float64)}
            s.refs_in = {(i - 1) % n: torch.randn(D, generator=g, dtype=torch.float64)}
        states.append(s)
    return states


def test_exact_merge_is_the_push_sum_average_and_keeps_the_mass():
    states = _states()
    sum_x = sum(s.x for s in states)
    sum_y = sum(s.y for s in states)
    m = merge(states, torch.zeros(D, dtype=torch.float64), 32, SEGMENTS)
    assert torch.allclose(m, sum_x / sum_y, rtol=1e-12, atol=1e-12)
    for s in states:
        assert torch.equal(s.z, states[0].z)
        assert all(torch.equal(r, m) for r in [*s.refs_out.values(), *s.refs_in.values()])  # both ends of each edge
    assert torch.allclose(sum(s.x for s in states), sum_x, rtol=1e-12, atol=1e-9)
    assert sum(s.y for s in states) == pytest.approx(sum_y, abs=1e-12)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_merge_gives_every_node_the_same_model_within_one_step_per_tensor(bits):
    states = _states(seed=bits)
    base = torch.randn(D, dtype=torch.float64)
    exact = sum(s.x for s in states) / sum(s.y for s in states)
    devs = torch.stack([s.x - s.y * base for s in states])  # what each node sends
    sum_y = sum(s.y for s in states)
    m = merge(states, base, bits, SEGMENTS)
    for s in states:
        assert torch.allclose(s.z, m, rtol=1e-12, atol=1e-12)  # the same model everywhere
        assert all(torch.equal(r, m) for r in [*s.refs_out.values(), *s.refs_in.values()])
    assert sum(s.y for s in states) == pytest.approx(sum_y, abs=1e-12)  # the weights are averaged exactly
    # bound: rounding to nearest errs by at most half a level, level = max|v| / L per tensor: first on each node's
    # numerator deviation (summed, then divided by sum y), then on that average, whose max is at most the exact
    # average deviation's max plus the first error
    levels = 2 ** (bits - 1) - 1
    start = 0
    errs = []
    for size in SEGMENTS:
        sl = slice(start, start + size)
        first = 0.5 * float(devs[:, sl].abs().amax(dim=1).sum()) / levels / sum_y
        second = 0.5 * (float((exact[sl] - base[sl]).abs().max()) + first) / levels
        err = float((m[sl] - exact[sl]).abs().max())
        assert err <= (first + second) * (1 + 1e-5), (size, err)
        errs.append(err / float(devs[:, sl].abs().max()))
        start += size
    assert max(errs) > 0  # the rounding is real (this test would pass vacuously on an exact merge otherwise)


def test_quantized_merge_error_shrinks_with_bits_and_numerator_refs_follow_the_form():
    errs = {}
    for bits in (2, 4, 8):
        states = _states(seed=1)
        exact = sum(s.x for s in states) / sum(s.y for s in states)
        m = merge(states, torch.zeros(D, dtype=torch.float64), bits, SEGMENTS)
        errs[bits] = float((m - exact).abs().max())
    assert errs[8] < errs[4] < errs[2]
    states = _states(seed=2)
    ybar = sum(s.y for s in states) / len(states)
    m = merge(states, torch.zeros(D, dtype=torch.float64), 8, SEGMENTS, form="ref-x")
    assert torch.allclose(states[0].refs_out[1], ybar * m)  # ref-x references live in numerator space


def test_merge_feedback_keeps_the_mass_and_delays_a_small_change_instead_of_losing_it():
    # 4 nodes, one tensor: coordinate 0 moves by 1 per merge interval (it sets the scale: one 4-bit level is 1/7),
    # coordinate 1 by 0.01, far below half a level, so plain rounding drops it at every merge
    n, merges, small = 4, 100, 0.01
    step = torch.tensor([1.0, small], dtype=torch.float64)
    ends = {}
    for feedback in (False, True):
        states = [NodeState(x=torch.zeros(2, dtype=torch.float64), y=1.0) for _ in range(n)]
        base = torch.zeros(2, dtype=torch.float64)
        owner_err = torch.zeros(2, dtype=torch.float64) if feedback else None
        for _ in range(merges):
            for s in states:
                s.x = s.x + s.y * step  # every node's model moves by `step` between two merges
            kept = merge_mass(states, owner_err)
            base = merge(states, base, 4, [2], owner_err=owner_err)
            if feedback:
                assert torch.allclose(merge_mass(states, owner_err), kept, rtol=0, atol=1e-9)
        ends[feedback] = base
    assert ends[False][1] == 0.0  # every 0.01 was rounded away: after 100 merges the coordinate never moved
    level = 1.0 / 7  # one rounding step of the nodes' messages, then one of the owner's: at most their sum behind
    assert abs(float(ends[True][1]) - merges * small) <= 2 * level
    assert float(ends[True][0]) == pytest.approx(merges * 1.0, abs=2 * level)


def test_merge_feedback_mass_holds_with_unequal_weights_and_random_changes():
    states = _states(seed=3)
    base = torch.zeros(D, dtype=torch.float64)
    owner_err = torch.zeros(D, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        for s in states:
            s.x = s.x + s.y * torch.randn(D, generator=g, dtype=torch.float64)
        kept = merge_mass(states, owner_err)
        base = merge(states, base, 3, SEGMENTS, owner_err=owner_err)
        assert torch.allclose(merge_mass(states, owner_err), kept, rtol=1e-12, atol=1e-9)
        assert all(torch.equal(s.z, states[0].z) for s in states)
    assert all(s.merge_err is not None and s.merge_err.abs().max() > 0 for s in states)  # feedback was used


def test_one_bit_merges_with_feedback_keep_the_mass_and_reach_the_exact_average():
    # nodes that stop moving: a 1-bit merge (sign x mean magnitude per tensor) is far from the average at first, but
    # with feedback each later merge sends what the earlier ones missed, so the shared model closes in on it
    states = _states(seed=7)
    exact = sum(s.x for s in states) / sum(s.y for s in states)
    base = torch.zeros(D, dtype=torch.float64)
    owner_err = torch.zeros(D, dtype=torch.float64)
    errors = []
    for _ in range(200):
        kept = merge_mass(states, owner_err)
        base = merge(states, base, 1, SEGMENTS, owner_err=owner_err)
        assert torch.allclose(merge_mass(states, owner_err), kept, rtol=1e-12, atol=1e-9)
        assert all(torch.equal(s.z, states[0].z) for s in states)
        errors.append(float((base - exact).norm() / exact.norm()))
    assert errors[0] > 0.3  # one sign merge alone is a poor average
    assert errors[0] > errors[9] > errors[49] > errors[-1]  # nothing was lost: it arrives later (slowly: 1 bit)
    assert errors[-1] < 0.01


def test_merge_bits_are_two_encoded_messages_and_shrink_with_the_bits():
    exact = merge_bits(D)
    assert exact == 2 * 8 * (HEADER.size + 4 * D)  # float32 values, one header
    for bits in (8, 4, 2, 1):
        per_tensor = sum(HEADER.size + 4 + -(-size * bits // 8) for size in SEGMENTS)  # header, scale, packed codes
        assert merge_bits(D, bits, SEGMENTS) == 2 * 8 * per_tensor
    big = [100_000, 1_000]
    assert merge_bits(sum(big), 8, big) < merge_bits(sum(big)) / 3.9  # a quarter, up to the headers


def test_bad_merge_values_are_refused():
    with pytest.raises(ValueError, match="merge bits"):
        merge(_states(), torch.zeros(D, dtype=torch.float64), 16, SEGMENTS)
    with pytest.raises(ValueError, match="segments cover"):
        merge(_states(), torch.zeros(D, dtype=torch.float64), 8, [D - 1])
    states = _states()
    before = [s.x.clone() for s in states]
    with pytest.raises(ValueError, match="owner_err must be float64"):
        merge(states, torch.zeros(D, dtype=torch.float64), 8, SEGMENTS, owner_err=torch.zeros(D))  # float32
    assert all(torch.equal(s.x, b) and s.merge_err is None for s, b in zip(states, before))  # nothing touched


def _cfg(**kw):
    base = {"dataset": "synthetic", "model": "mlp", "num-nodes": 8, "graph": "exponential", "num-rounds": 20,
            "compressor": "topk:0.02+q:4", "gamma": 0.2, "lr": 0.1}  # fmt: skip
    return validate(base | kw)


def test_merge_rounds():
    cfg = _cfg(**{"merge-every": 6, "final-gossip-rounds": 4, "final-merge": True})
    assert [t for t in range(1, 25) if merge_due(cfg, t, 24)] == [6, 12, 18, 24]  # none in the gossip-only phase
    assert [t for t in range(1, 21) if merge_due(_cfg(**{"merge-every": 5}), t, 20)] == [5, 10, 15, 20]
    assert [t for t in range(1, 21) if merge_due(_cfg(**{"final-merge": True}), t, 20)] == [20]


@pytest.mark.parametrize("bits", [32, 8])
def test_periodic_merges_put_every_node_on_one_model_and_count_their_bits(bits):
    plain = run_inprocess(_cfg(), eval_every=5)
    cfg = _cfg(**{"merge-every": 5, "merge-bits": bits})
    merged = run_inprocess(cfg, eval_every=1)
    setup = get_setup(cfg)
    rows = {r["round"]: r for r in merged.history}
    for t in (5, 10, 15, 20):
        assert rows[t]["consensus_distance"] == pytest.approx(0.0, abs=1e-12)
        assert rows[t]["acc_node_min"] == rows[t]["acc_consensus"]
    assert rows[7]["consensus_distance"] > 0  # the nodes move apart again between merges
    assert rows[20]["y_nodes"] + rows[20]["y_in_transit"] == pytest.approx(8.0, abs=1e-9)
    one = merge_traffic(8, bits, setup.segments)  # all nodes together, one merge
    assert one == pytest.approx(7 / 8 * 8 * merge_bits(setup.x0.numel(), bits, setup.segments), rel=0.01)
    assert sum(merged.bits_sent) == sum(merged.bits_received)  # every merge message is delivered
    gossip_only = sum(merged.bits_sent) - 4 * one
    # the same gossip kept fraction; the messages differ in content after a merge, so their sizes differ a little
    assert abs(gossip_only - sum(plain.bits_sent)) < 0.05 * sum(plain.bits_sent)


@pytest.mark.parametrize("feedback", [False, True])
def test_resume_after_periodic_quantized_merges_equals_an_uninterrupted_run(tmp_path, feedback):
    common = {"merge-every": 3, "merge-bits": 6, "final-merge": True, "out-dir": str(tmp_path), "num-rounds": 10}
    common["merge-feedback"] = feedback  # the checkpoint then holds the nodes' and the owners' feedback too
    a = run_inprocess(_cfg(**common | {"run-name": "a"}), eval_every=1)
    cfg = _cfg(**common | {"run-name": "b", "checkpoint-every": 4})

    class Crash(Exception):
        pass

    def crash_at_7(row):
        if row["round"] == 7:
            raise Crash

    with pytest.raises(Crash):
        run_inprocess(cfg, eval_every=1, log=crash_at_7)
    b = run_inprocess(cfg.replace(resume=True), eval_every=1)
    assert b.start_round == 4
    assert b.history == a.history and b.bits_sent == a.bits_sent
    for s, t in zip(a.states, b.states):
        assert torch.equal(s.x, t.x) and s.y == t.y
        assert (s.merge_err is not None) == feedback
        if feedback:
            assert torch.equal(s.merge_err, t.merge_err)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"merge-bits": 16, "final-merge": True}, "merge-bits=16: use 32"),
        ({"merge-bits": 0, "final-merge": True}, "merge-bits=0: must be in"),
        ({"merge-bits": 1, "final-merge": True}, "needs merge-feedback=true"),
        ({"merge-bits": 8}, "no merge to quantize"),
        ({"merge-every": 5, "strategy": "fedavg"}, "not fedavg"),
        ({"merge-every": -1}, "merge-every"),
        ({"merge-feedback": True, "final-merge": True}, "merge-feedback=true: an exact merge"),
        (
            {"drift-correction": "displacement", "final-merge": True},
            "drift-correction=displacement: the drift is measured at periodic",
        ),
    ],
)
def test_bad_merge_config_is_refused_with_what_to_do(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**kw)


def test_merges_pass_the_flower_preflight(tmp_path):
    for kw in ({"merge-every": 5}, {"final-merge": True, "merge-bits": 4, "merge-feedback": True}):
        preflight(_cfg(**kw | {"out-dir": str(tmp_path)}), flower=True)  # the nodes merge (test_flower_merge.py)


def test_drift_correction_rule_accumulates_and_sums_to_zero_over_an_exact_merge():
    states = [NodeState(x=torch.tensor([1.0, 2.0]) * k, y=1.0) for k in (1, 2, 3)]
    before = [s.z.clone() for s in states]
    m = merge(states, torch.zeros(2), 32, [2])
    assert torch.allclose(m, torch.tensor([2.0, 4.0]))
    correct_drift(states, before, m, lr_steps=0.5, momentum=0.9)
    # (1 - mu) (merged - before) / sum of the step sizes: node 1 lagged by (1, 2), so its gradients get 0.2 * (1, 2)
    assert torch.allclose(states[0].drift, torch.tensor([0.2, 0.4]))
    assert torch.allclose(sum(s.drift for s in states), torch.zeros(2), atol=1e-7)
    correct_drift(states, [m + 1.0] * 3, m, lr_steps=1.0, momentum=0.0)  # a second merge adds to it
    assert torch.allclose(states[0].drift, torch.tensor([-0.8, -0.6]))
    with pytest.raises(ValueError, match="sum to > 0"):
        correct_drift(states, before, m, lr_steps=0.0, momentum=0.0)


def test_gradient_bias_rule_is_own_mean_gradient_minus_the_nodes_mean_from_the_merges():
    states = [NodeState(x=torch.zeros(2), y=1.0) for _ in range(2)]
    states[0].grad_sum = torch.tensor([1.0, 0.0])
    states[1].grad_sum = torch.tensor([0.0, 3.0])
    prev, merged = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 3.0])
    correct_bias(states, prev, merged, lr_steps=2.0, momentum=0.5)
    mean_grad = torch.tensor([1.0, -2.0]) * 0.5 / 2.0  # (prev - merged) (1 - mu) / lr_steps
    assert torch.allclose(states[0].drift, torch.tensor([0.5, 0.0]) - mean_grad)
    assert torch.allclose(states[1].drift, torch.tensor([0.0, 1.5]) - mean_grad)
    assert all(torch.equal(s.grad_sum, torch.zeros(2)) for s in states)  # the next period sums afresh


@pytest.mark.parametrize("mode", ["displacement", "gradient"])
def test_drift_correction_keeps_label_skewed_nodes_closer_between_merges(mode):
    # 8 nodes with 2 classes each: between merges each node runs towards its own classes; the correction measured
    # at the merges cancels that pull, so just before the third merge the nodes are much closer together
    skew = {"partition": "classes:2", "merge-every": 20, "merge-bits": 8, "final-merge": True, "local-steps": 4,
            "num-rounds": 60, "gamma": 0.1, "lr": 0.05}  # fmt: skip
    plain = run_inprocess(_cfg(**skew), eval_every=5)
    corrected = run_inprocess(_cfg(**skew | {"drift-correction": mode}), eval_every=5)
    before_third = [next(r for r in res.history if r["round"] == 55) for res in (plain, corrected)]
    assert before_third[1]["consensus_distance"] < 0.5 * before_third[0]["consensus_distance"]
    assert before_third[1]["acc_node_mean"] > before_third[0]["acc_node_mean"] + 0.1
    assert corrected.history[-1]["acc_consensus"] >= plain.history[-1]["acc_consensus"]
    assert corrected.history[-1]["y_nodes"] == pytest.approx(8.0, abs=1e-9)  # the correction moves no mass
    assert all(s.drift is not None for s in corrected.states) and all(s.drift is None for s in plain.states)
