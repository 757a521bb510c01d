"""Lossy links and offline nodes: bounced messages keep the mass exact; lost ones do not. A hostile network
(deliveries cut short or relabelled): every rejected message goes home."""

import numpy as np
import pytest
import torch

from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.consensus import run_consensus
from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.core.topology import make_graph

# Documented budget (docs/algorithm.md): 8 nodes, d = 100, top-5%, gamma 0.05, drop 0.3: 2500 rounds reach 1e-6.
LOSSY = dict(nodes=8, compressor="topk:0.05", gamma=0.05, rounds=2500, dim=100, seed=1, drop=0.3)


@pytest.mark.parametrize("graph", ["exponential", "random-out:2"])
def test_bounced_messages_keep_mass_exact_and_consensus_is_reached(graph):
    r = run_consensus(graph=graph, **LOSSY)
    assert r["messages_dropped"] > 0.25 * 2500 * 8
    assert r["mass_error"] < 1e-9 and r["weight_mass_error"] < 1e-9
    assert r["consensus_error"] < 1e-6


@pytest.mark.parametrize("graph", ["exponential", "random-out:2"])
def test_unprotected_push_sum_drifts_under_the_same_loss(graph):
    r = run_consensus(graph=graph, **(LOSSY | {"rounds": 300, "bounce": False}))
    assert r["mass_error"] > 0.1 and r["weight_mass_error"] > 0.1
    assert r["consensus_error"] > 1e-2


def test_offline_nodes_and_down_links_keep_the_mass():
    r = run_consensus(graph="random-out:2", churn=0.25, **(LOSSY | {"rounds": 300, "drop": 0.1}) | {"link_down": 0.2})
    assert r["mass_error"] < 1e-9 and r["weight_mass_error"] < 1e-9


@pytest.mark.parametrize("form", ["ref", "ref-x", "ef"])
def test_bounce_undoes_the_send_exactly(form):
    rule = PushSum(make_compressor("topk:0.2+q:4"), 0.5, form)
    s = rule.init_state(torch.randn(50, dtype=torch.float64))
    x_before, y_before = s.x.clone(), s.y
    refs_before = {k: v.clone() for k, v in s.refs_out.items()}
    msgs = rule.send(s, 0, [1, 2], 0)
    for dest, data in msgs.items():
        rule.bounce(s, dest, data)
    assert torch.allclose(s.x, x_before, atol=1e-12) and s.y == pytest.approx(y_before, rel=1e-15)
    for k, v in s.refs_out.items():
        assert torch.allclose(v, refs_before.get(k, torch.zeros_like(v)), atol=1e-7)


def test_router_holds_messages_for_offline_nodes_in_order():
    net = Network(churn=0.5, seed=0)
    router = Router(3, net)
    router.post(0, 0, {2: b"a"})
    router.post(1, 0, {2: b"b"})
    router.post(0, 1, {2: b"c"})
    inbox, bounced = router.collect(2)
    assert inbox == [(0, b"a"), (1, b"b"), (0, b"c")] and bounced == []
    assert router.delivered_bits[2] == 24


def test_network_is_a_pure_function_of_the_seed():
    a, b = Network(drop=0.3, churn=0.2, seed=5), Network(drop=0.3, churn=0.2, seed=5)
    pattern = [(a.delivers(t, 0, 1), a.online(t, 3)) for t in range(200)]
    assert pattern == [(b.delivers(t, 0, 1), b.online(t, 3)) for t in range(200)]
    assert 0.6 < sum(d for d, _ in pattern) / 200 < 0.8


@pytest.mark.parametrize("kwargs", [{"drop": 1.0}, {"churn": -0.1}, {"link_down": "x"}, {"down_span": 0}])
def test_bad_network_settings(kwargs):
    with pytest.raises(ValueError, match="must be"):
        Network(**kwargs)


def test_a_hostile_network_costs_no_mass_and_consensus_stays_exact():
    """Gossip only, 8 nodes, 10 % of deliveries cut short or relabelled on the way to the receiver: every rejected
    message bounces home, the sums of x and y stay exact and the nodes still reach the exact average."""
    n, d, rounds = 8, 30, 500
    rule = PushSum(make_compressor("topk:0.3"), 0.4, "ref")
    g = make_graph("torus", n, 0)  # every edge carries a message every round: rejections come late
    router = Router(n)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    states = [rule.init_state(x0[i]) for i in range(n)]
    rng = np.random.default_rng(0)
    rejected = 0
    for t in range(rounds + 4):
        reports = []
        for i in range(n):
            inbox, bounced = router.collect(i)
            for dest, data in bounced:
                rule.bounce(states[i], dest, data)
            handed = inbox
            if t < rounds:  # the network relabels 5 % and cuts short 5 % of the deliveries
                u = rng.random(len(inbox))
                handed = [
                    ((s + 1) % n, d) if v < 0.05 else (s, d[:-1]) if v < 0.1 else (s, d) for (s, d), v in zip(inbox, u)
                ]
            refused = rule.receive(states[i], handed)
            rejected += len(refused)
            reports.append((i, inbox, [r.index for r in refused]))
        for i in range(n):
            router.post(i, t, rule.send(states[i], i, g.out_neighbours(t)[i] if t < rounds else [], t))
        for i, inbox, positions in reports:  # as the ServerApp does: after every node's messages are posted
            router.bounce_rejected(i, inbox, positions)
    assert rejected > 0.08 * rounds * n and not router.in_transit()
    assert sum(s.y for s in states) == pytest.approx(n, abs=1e-9)
    assert torch.allclose(sum(s.x for s in states), x0.sum(0), atol=1e-9)
    err = max(float((s.z - x0.mean(0)).norm() / x0.mean(0).norm()) for s in states)
    assert err < 1e-6


def test_a_later_message_on_an_edge_whose_earlier_one_bounces_bounces_too():
    """A relay that posts two outboxes of a node at once (a resent one and a newer one, after a lost reply): when
    the network drops the older message of an edge, the newer one on that edge bounces too, newest first, and the
    sender's undoing them leaves both ends of the edge where they were (its reference, numerator and weight)."""

    class DropsRoundZero(Network):
        def delivers(self, rnd, sender, dest):
            return rnd != 0

    rule = PushSum(make_compressor("topk:0.5"), 0.5, "ref")
    x0 = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sender = rule.init_state(x0)
    m0 = rule.send(sender, 0, [1], 0)
    m1 = rule.send(sender, 0, [1], 1)
    r = Router(2, DropsRoundZero())
    r.post(0, 0, m0)
    r.post(0, 1, m1)
    assert r.mailboxes[1] == [] and r.dropped == 1
    inbox, bounced = r.collect(0)
    assert bounced == [(1, m1[1]), (1, m0[1])]  # newest first
    for dest, data in bounced:
        rule.bounce(sender, dest, data)
    assert sender.y == pytest.approx(1.0, abs=1e-15)
    assert torch.allclose(sender.x, x0, atol=1e-12) and float(sender.refs_out[1].abs().max()) <= 1e-12
