"""The drop-in strategy's gossip options, driven without the simulation engine: gossip_steps (K exchanges per Flower
round, every one counted), gradient_lookahead (the shifted point sent, the change applied to z_i), the sparsity
schedule and presets (applied keys, refused keys, explicit arguments win)."""

from __future__ import annotations

import numpy as np
import pytest
from flower_sparsepush.strategies import DecentralizedFedAvg, dropin_options
from flower_sparsepush.strategies.dropin_options import compressor_of_round, preset_args
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.run.presets import PRESETS

N, DIM = 4, 40


@pytest.fixture
def identity(monkeypatch):
    """Replies are built here as a ClientApp builds them, which needs a task identity."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _drift(node: int, rnd: int) -> np.ndarray:
    """A node's local change in a round: different on every node, so the nodes drift apart."""
    return np.random.default_rng(100 * rnd + node).normal(size=DIM).astype(np.float32) * 0.5


def _drive(strategy: DecentralizedFedAvg, rounds: int, sent: list | None = None) -> None:
    """Flower's round loop without Flower: every node replies the point it was sent plus its drift (a change that
    does not depend on the point, so runs with and without gradient-lookahead move the nodes alike)."""
    init = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})
    strategy.setup(list(range(10, 10 + N)), init)
    strategy.num_rounds_planned = rounds
    for r in range(1, rounds + 1):
        msgs = list(strategy.configure_train(r, init, ConfigRecord({}), None))
        replies = []
        for m in msgs:
            node = strategy.index_of[m.metadata.dst_node_id]
            w = m.content["arrays"]["w"].numpy()
            if sent is not None:
                state = strategy.states[node]
                offset = PushSum.lookahead_offset(state, strategy.gradient_lookahead)
                sent.append((r, w.copy(), state.z.numpy().copy(), None if offset is None else offset.numpy()))
            arrays = ArrayRecord({"w": Array(w + _drift(node, r))})
            metrics = MetricRecord({"num-examples": 1})
            replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=m))
        strategy.aggregate_train(r, replies)


def test_gossip_steps_counts_every_exchange_and_pulls_the_nodes_together(identity):
    one = DecentralizedFedAvg(compressor="topk:0.5", gamma=0.5, gossip_steps=1, gradient_lookahead=0.0)
    three = DecentralizedFedAvg(compressor="topk:0.5", gamma=0.5, gossip_steps=3, gradient_lookahead=0.0)
    _drive(one, 4)
    _drive(three, 4)
    # top-k messages of a fixed size: 3 exchanges per round cost 3 times the bits of one, every one counted
    assert sum(three.peer_bits_sent) == 3 * sum(one.peer_bits_sent) > 0
    assert sum(three.peer_bits_received) > 2 * sum(one.peer_bits_received) > 0
    assert three.consensus(4).consensus_distance < 0.5 * one.consensus(4).consensus_distance
    for s in (one, three):  # no mass lost in the extra exchanges
        assert s.mass()["y_total"] == pytest.approx(N, abs=1e-9)
    assert three.traffic()["peer_bits_sent_per_node"] == sum(three.peer_bits_sent) / N


def test_gradient_lookahead_sends_the_shifted_point_and_applies_the_change_to_z(identity):
    on = DecentralizedFedAvg(compressor="topk:0.5+q:4", gamma=0.3, gradient_lookahead=0.5, gossip_steps=2)
    off = DecentralizedFedAvg(compressor="topk:0.5+q:4", gamma=0.3, gradient_lookahead=0.0, gossip_steps=2)
    sent: list = []
    _drive(on, 4, sent)
    _drive(off, 4)
    for r, w, z, offset in sent:
        if r == 1:  # no copies of the neighbours yet: no shift
            assert offset is None and np.array_equal(w, z)
        else:  # sent z_i + 0.5 (mean of its copies - z_i)
            assert np.abs(offset).max() > 1e-3
            np.testing.assert_allclose(w, z + offset, atol=1e-6)
    # the reply's change from the shifted point is applied to z_i: with changes that do not depend on where they
    # are taken, the run equals the run without lookahead
    for a, b in zip(on.node_vectors(), off.node_vectors()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert on.peer_bits_sent == off.peer_bits_sent


def test_sparsity_schedule_follows_the_clientapps_lr_shape():
    assert compressor_of_round("topk:0.1+q:4", "constant", "cosine", 10, 3) == "topk:0.1+q:4"
    first = compressor_of_round("topk:0.1+q:4", "lr", "cosine", 10, 0)
    last = compressor_of_round("topk:0.1+q:4", "lr", "cosine", 10, 9)
    frac = lambda spec: float(spec.split("+")[0].split(":")[1])  # noqa: E731
    assert frac(first) > 0.1 > frac(last) and first.endswith("+q:4")
    assert compressor_of_round("topk:0.1", "lr", "constant", 10, 4) == "topk:0.1"
    s = DecentralizedFedAvg(compressor="topk:0.1+q:4", sparsity_schedule="lr", lr_schedule="cosine", gossip_steps=2)
    s.setup([1, 2], ArrayRecord({"w": Array(np.zeros(50, np.float32))}))
    s.num_rounds_planned = 10
    # both exchanges of round t use round t's fraction
    spec = [s._rule(0)(g).compressor.spec for g in range(20)]
    assert spec[0] == spec[1] == first and spec[18] == spec[19] == last


def test_presets_apply_their_gossip_keys_refuse_the_others_and_explicit_arguments_win(monkeypatch):
    s = DecentralizedFedAvg(preset="sgp")
    assert (s.compressor, s.gamma) == ("none", 1.0)
    s = DecentralizedFedAvg(preset="sgp", gamma=0.5)
    assert (s.compressor, s.gamma) == ("none", 0.5)
    # the goal presets, merges included; paper's 50 final gossip-only rounds have no drop-in counterpart
    s = DecentralizedFedAvg(preset="sp-466x")
    assert s.merge_opts == {"final_merge": True, "merge_every": 0, "merge_bits": 32, "merge_feedback": False}
    assert DecentralizedFedAvg(preset="sp-1000x").merge_opts["merge_bits"] == 8
    s = DecentralizedFedAvg(preset="scsp-400x")
    assert (s.compressor, s.gamma, s.merge_opts["merge_bits"]) == ("topk:0.0042+q:4", 0.05, 8)
    tracked = type(PRESETS["scsp-400x"])(
        "r", "scsp", "", dict(PRESETS["scsp-400x"].switches, **{"update-tracking": 0.5})
    )
    monkeypatch.setitem(dropin_options.PRESETS, "scsp-400x-tracked", tracked)
    with pytest.raises(ValueError, match="update-tracking=0.5 \\(it corrects the gradients"):
        DecentralizedFedAvg(preset="scsp-400x-tracked")
    with pytest.raises(ValueError, match="logit-adjust=1.0 \\(it changes the loss"):
        DecentralizedFedAvg(preset="scsp-400x-adj")
    with pytest.raises(ValueError, match="final-gossip-rounds=50") as err:
        DecentralizedFedAvg(preset="paper")
    assert str(err.value).count("\n") == 0 and "paper" in str(err.value)
    with pytest.raises(ValueError, match="preset must be one of"):
        DecentralizedFedAvg(preset="nope")
    # every gossip and merge switch of sp-466x lands on its argument
    args = preset_args("sp-466x")
    assert args == {
        "graph": "exponential",
        "compressor": "topk:0.012+q:4",
        "gamma": 0.1,
        "gradient_lookahead": 0.5,
        "sparsity_schedule": "lr",
        "lr_schedule": "cosine",
        "final_merge": True,
    }
    no_merge = dict(PRESETS["sp-466x"].switches, **{"final-merge": False})
    monkeypatch.setitem(dropin_options.PRESETS, "sp-466x-nomerge", type(PRESETS["sp-466x"])("r", None, "", no_merge))
    assert preset_args("sp-466x-nomerge")["final_merge"] is False
    s = DecentralizedFedAvg(preset="sp-466x-nomerge", compressor="topk:0.05+q:4")
    assert (s.compressor, s.gamma, s.gradient_lookahead, s.sparsity_schedule) == ("topk:0.05+q:4", 0.1, 0.5, "lr")
    # keys the preset leaves unset are the run config's defaults (as the native mode runs it), not the drop-in's
    s = DecentralizedFedAvg(preset="sgp")
    assert (s.gossip_steps, s.gradient_lookahead, s.form) == (1, 0.0, "ref")
    assert DecentralizedFedAvg(preset="sgp", gossip_steps=3).gossip_steps == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gradient_lookahead": -0.1}, "gradient_lookahead"),
        ({"gradient_lookahead": 1.5}, "gradient_lookahead"),
        ({"gradient_lookahead": 0.5, "form": "ef"}, "form='ref'"),
        ({"gossip_steps": 0}, "gossip_steps"),
        ({"gossip_steps": 2.5}, "gossip_steps"),
        ({"sparsity_schedule": "cosine"}, "sparsity_schedule"),
        ({"sparsity_schedule": "lr", "compressor": "q:4"}, "top-k"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"preset": 3}, "preset"),
        ({"merge_feedback": True, "final_merge": True}, "merge_feedback=true: an exact merge"),
        ({"merge_bits": 9, "final_merge": True}, "merge_bits"),
        ({"merge_every": -1}, "merge_every"),
    ],
)
def test_bad_gossip_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecentralizedFedAvg(**kwargs)
