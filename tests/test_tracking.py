"""Update tracking (run-config ``update-tracking``, core/tracking.py): the rule, its effect on label-skewed nodes
(closer together, better node models, mass untouched), its refusals, and its state surviving a round trip."""

from __future__ import annotations

import pytest
import torch

from flower_sparsepush.core.node import state_from_flat, state_to_flat
from flower_sparsepush.core.pushsum import NodeState
from flower_sparsepush.core.tracking import RHO, corrected, observe
from flower_sparsepush.run.config import ConfigError, validate
from flower_sparsepush.run.inprocess import run_inprocess


def _state() -> NodeState:
    s = NodeState(x=torch.tensor([2.0, 0.0, 4.0]), y=2.0)  # z = (1, 0, 2)
    s.refs_in = {3: torch.tensor([3.0, 0.0, 0.0]), 1: torch.tensor([1.0, 4.0, 0.0])}
    return s


def test_the_rule_moves_the_node_by_mu_times_its_neighbours_move_less_its_own():
    s, mu, k = _state(), 0.5, 1 - RHO
    observe(s, mu)  # first look: where the copies are, no move yet
    assert s.track_v is None and s.track_keys.tolist() == [1, 3]
    z0 = s.z
    z1 = z0 + torch.tensor([0.1, 0.0, -0.2])
    assert torch.equal(corrected(s, mu, z0, z1), z1)  # no neighbourhood move read yet: SGD's step as it is
    assert torch.allclose(s.track_s, k * torch.tensor([0.1, 0.0, -0.2]))
    # gossip refreshes copy 3 and brings a new sender 7, whose copy moved from nothing and is not read
    s.refs_in[3] = s.refs_in[3] + torch.tensor([0.4, 0.2, 0.0])
    s.refs_in[7] = torch.tensor([9.0, 9.0, 9.0])
    observe(s, mu)
    v = k * torch.tensor([0.2, 0.1, 0.0])  # copies 1 and 3 moved (0.4, 0.2, 0) together: (0.2, 0.1, 0) each
    assert torch.allclose(s.track_v, v) and s.track_keys.tolist() == [1, 3, 7]
    z2 = z1 + torch.tensor([0.0, 0.3, 0.0])
    own = RHO * k * torch.tensor([0.1, 0.0, -0.2]) + k * torch.tensor([0.0, 0.3, 0.0])
    assert torch.allclose(corrected(s, mu, z1, z2), z2 + mu * (v - own))
    off = _state()
    observe(off, 0.0)
    assert off.track_keys is None and torch.equal(corrected(off, 0.0, z0, z1), z1) and off.track_s is None


def test_the_tracked_state_survives_the_round_trip():
    s = _state()
    observe(s, 0.8)
    corrected(s, 0.8, s.z, s.z + 1)
    back = state_from_flat(state_to_flat(s))
    for name in ("track_keys", "track_sum", "track_s"):
        assert torch.equal(getattr(back, name), getattr(s, name)), name


SKEW = {"dataset": "synthetic", "model": "mlp", "num-nodes": 8, "graph": "exponential", "num-rounds": 60,
        "compressor": "topk:0.02+q:4", "gamma": 0.1, "lr": 0.05, "partition": "classes:2", "local-steps": 4}  # fmt: skip


def test_tracking_keeps_label_skewed_nodes_closer():
    # 8 nodes with 2 classes each on 4-bit top-2% gossip: each node's data pull it away from the others every round;
    # the tracked correction moves it with its neighbours instead, so the nodes end closer and each node's own model
    # is better (tracking_synthetic.md: distance 5.06 -> 2.68, node-mean accuracy 0.28 -> 0.35)
    plain = run_inprocess(validate(SKEW), eval_every=20)
    tracked = run_inprocess(validate(SKEW | {"update-tracking": 0.8}), eval_every=20)
    last = [res.history[-1] for res in (plain, tracked)]
    assert last[1]["consensus_distance"] < 0.6 * last[0]["consensus_distance"]
    assert last[1]["acc_node_mean"] > last[0]["acc_node_mean"] + 0.03
    # the correction moves models, never push-sum weight: the same weights everywhere as without it
    assert [s.y for s in tracked.states] == [s.y for s in plain.states]
    assert all(s.track_v is not None for s in tracked.states) and all(s.track_v is None for s in plain.states)


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"update-tracking": 0.5, "form": "ef"}, "update-tracking=0.5: it reads the de-biased copies"),
        ({"update-tracking": 0.5, "strategy": "fedavg"}, "update-tracking=0.5: this belongs to the gossip"),
        (
            {"update-tracking": 0.5, "merge-every": 4, "drift-correction": "displacement"},
            "update-tracking=0.5: it and drift-correction=displacement",
        ),
        ({"update-tracking": 1.0}, "update-tracking"),
    ],
)
def test_refused_where_it_cannot_act(keys, says):
    with pytest.raises(ConfigError, match=says) as err:
        validate({"dataset": "synthetic", "model": "mlp"} | keys)
    assert "\n" not in str(err.value)
