"""Push-sum invariants: mass conservation, SGP equivalence, exact consensus, safe rejection of bad messages, and
one class per push-sum form."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_sparsepush.core.codec import FORMS, Message, decode, encode
from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.consensus import run_consensus
from flower_sparsepush.core.node import Node
from flower_sparsepush.core.pushsum import (
    RULES,
    DebiasedReferencePushSum,
    ErrorFeedbackPushSum,
    NodeState,
    PushSum,
)
from flower_sparsepush.core.topology import make_graph


def gossip_round(rule: PushSum, states: list[NodeState], out_lists: list[list[int]], rnd: int) -> None:
    """One synchronous round (every node sends, then every node absorbs what was sent to it), through the node
    API with a zero-delay network: the matrix form x <- P x of SGP."""
    nodes = [Node(i, s, lambda t: rule, lambda t, i=i: out_lists[i]) for i, s in enumerate(states)]
    inbox: list[list[tuple[int, bytes]]] = [[] for _ in states]
    for node in nodes:
        for j, data in node.finish(rnd).items():
            inbox[j].append((node.id, data))
    for node, msgs in zip(nodes, inbox):
        assert not node.begin(rnd, msgs)


GRAPHS = ["ring", "exponential", "exponential-multi:2", "random-out:2", "complete", "undirected-ring", "torus"]


def _states(rule, n, d, seed):
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x0, [rule.init_state(x0[i]) for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    graph=st.sampled_from(GRAPHS),
    n=st.integers(4, 12),
    d=st.integers(1, 300),
    selection=st.sampled_from(["none", "topk", "randk"]),
    amount=st.floats(0.001, 0.9),
    bits=st.sampled_from([0, 1, 2, 4, 8]),
    gamma=st.floats(0.01, 1.0),
    form=st.sampled_from(["ref", "ef", "ref-x"]),
    seed=st.integers(0, 1000),
)
def test_mass_is_conserved_for_every_graph_and_compressor(graph, n, d, selection, amount, bits, gamma, form, seed):
    if graph == "torus" and n in (5, 7, 11):
        n += 1
    spec = "none" if selection == "none" else f"{selection}:{amount:.4f}"
    if bits:
        spec = f"q:{bits}" if selection == "none" else f"{spec}+q:{bits}"
    rule = PushSum(make_compressor(spec, seed=seed), gamma, form)
    x0, states = _states(rule, n, d, seed)
    g = make_graph(graph, n, seed)
    for t in range(5):
        gossip_round(rule, states, g.out_neighbours(t), t)
        total = sum(s.x for s in states)
        assert torch.allclose(total, x0.sum(0), rtol=1e-9, atol=1e-9 * float(x0.abs().sum()))
        assert sum(s.y for s in states) == pytest.approx(n, rel=1e-9)
        assert all(s.y > 0 for s in states)


@pytest.mark.parametrize("form", ["ref", "ef", "ref-x"])
@pytest.mark.parametrize("graph", ["exponential", "random-out:3", "ring"])
def test_identity_compression_with_gamma_one_is_sgp(form, graph):
    n, d = 10, 40
    rule = PushSum(make_compressor("none"), 1.0, form)
    x0, states = _states(rule, n, d, 1)
    g = make_graph(graph, n, seed=2)
    x, y = x0.numpy().copy(), np.ones(n)
    for t in range(12):
        gossip_round(rule, states, g.out_neighbours(t), t)
        p = g.mixing_matrix(t).toarray()  # SGP: x <- P x, y <- P y
        x, y = p @ x, p @ y
        got = torch.stack([s.z for s in states]).numpy()
        np.testing.assert_allclose(got, x / y[:, None], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose([s.y for s in states], y, rtol=1e-6)


# Documented round budgets (docs/results.md), d = 200, top-5% (10 entries per message), gamma = 0.05: 16 nodes on the
# exponential graph reach relative error 1e-6 within 1250 rounds (9e-8 measured); 8 nodes on random-out:2 (redrawn
# every round, uneven in-degrees) within 750 rounds (7e-8), with and without 4-bit values. The top-1% budgets
# (7000 / 5000 rounds at gamma 0.02) are measured traces in docs/results.md, not pinned here: they cost 100 s.
@pytest.mark.parametrize(
    "nodes,graph,compressor,rounds",
    [
        (16, "exponential", "topk:0.05", 1250),
        (8, "random-out:2", "topk:0.05", 750),
        (8, "random-out:2", "topk:0.05+q:4", 750),
    ],
)
def test_reference_form_reaches_the_exact_average(nodes, graph, compressor, rounds):
    r = run_consensus(nodes, graph, compressor, gamma=0.05, rounds=rounds, dim=200, seed=0)
    assert r["consensus_error"] < 1e-6
    assert r["mass_error"] < 1e-12 and r["weight_mass_error"] < 1e-12


def test_random_graph_weights_really_differ_so_debiasing_matters():
    rule = PushSum(make_compressor("topk:0.05"), 0.05, "ref")
    _, states = _states(rule, 16, 50, 0)
    g = make_graph("random-out:2", 16, seed=0)
    for t in range(20):
        gossip_round(rule, states, g.out_neighbours(t), t)
    ys = [s.y for s in states]
    assert max(ys) / min(ys) > 1.2


def test_error_feedback_form_stalls_where_the_reference_form_converges():
    """The measurement behind the default: the authors' form keeps a consensus gap (docs/algorithm.md)."""
    common = dict(nodes=16, graph="exponential", compressor="topk:0.05", gamma=0.05, rounds=1500, dim=200, seed=0)
    ef, ref = run_consensus(form="ef", **common), run_consensus(form="ref", **common)
    assert ef["consensus_error"] > 0.1
    assert ref["consensus_error"] < 1e-6
    assert ef["bits_per_node_per_round"] == pytest.approx(ref["bits_per_node_per_round"], rel=0.05)


def test_numerator_references_lag_where_weights_keep_changing():
    """Why the references live in de-biased space: on a redrawn random graph, x-space references lag."""
    common = dict(nodes=8, graph="random-out:2", compressor="topk:0.05", gamma=0.05, rounds=750, dim=200, seed=0)
    ref_x, ref = run_consensus(form="ref-x", **common), run_consensus(form="ref", **common)  # 0.059 and 6.7e-8
    assert ref_x["consensus_error"] > 1e-2
    assert ref["consensus_error"] < 1e-5


def test_sender_debits_exactly_what_it_sends():
    rule = PushSum(make_compressor("topk:0.1+q:4"), 0.3, "ref")
    _, (a, b, c) = _states(rule, 3, 30, 4)
    before = a.x.clone(), a.y
    msgs = rule.send(a, 0, [1, 2], rnd=0)
    for j, node in ((1, b), (2, c)):
        x_b, y_b = node.x.clone(), node.y
        assert rule.receive(node, [(0, msgs[j])]) == []
        before = (before[0] - (node.x - x_b), before[1] - (node.y - y_b))
    assert torch.allclose(before[0], a.x, atol=1e-12) and before[1] == pytest.approx(a.y)


def test_rejected_messages_never_change_the_state():
    rule = PushSum(make_compressor("topk:0.1"), 0.5, "ref")
    _, (a, b) = _states(rule, 2, 30, 5)
    good = rule.send(a, 0, [1], 0)[1]
    snapshot = (b.x.clone(), b.y, dict(b.refs_in))
    bad = [good[:-3], b"SP" + b"\0" * 60, good[:2] + bytes([7]) + good[3:]]
    ef_msg = PushSum(make_compressor("topk:0.1"), 0.5, "ef").send(
        rule.init_state(torch.zeros(30, dtype=torch.float64)), 5, [1], 0
    )[1]
    wrong_dim = PushSum(make_compressor("topk:0.1"), 0.5, "ref").send(
        rule.init_state(torch.ones(31, dtype=torch.float64)), 6, [1], 0
    )[1]
    batch = [(10 + k, m) for k, m in enumerate(bad)] + [(5, ef_msg), (6, wrong_dim)]  # one sender each
    reasons = [r.reason for r in rule.receive(b, batch)]
    assert len(reasons) == 5 and any("'ef' form" in r for r in reasons) and any("model has 30" in r for r in reasons)
    assert not any("follows" in r for r in reasons)
    assert torch.equal(b.x, snapshot[0]) and b.y == snapshot[1] and b.refs_in == snapshot[2]
    assert rule.receive(b, [(0, good)]) == [] and not torch.equal(b.x, snapshot[0])


def test_local_update_moves_x_by_y_times_the_change_of_z():
    s = NodeState(x=torch.tensor([2.0, 4.0], dtype=torch.float64), y=2.0)
    PushSum.local_update(s, torch.tensor([1.5, 2.5], dtype=torch.float64))
    assert torch.equal(s.x, torch.tensor([3.0, 5.0], dtype=torch.float64)) and torch.equal(
        s.z, torch.tensor([1.5, 2.5], dtype=torch.float64)
    )


@pytest.mark.parametrize("kwargs,msg", [({"gamma": 0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"form": "x"}, "form")])
def test_bad_rule_settings(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        PushSum(**kwargs)


def test_the_form_name_picks_one_class_per_form():
    assert tuple(RULES) == FORMS
    for form, cls in RULES.items():
        rule = PushSum(make_compressor("topk:0.1"), 0.5, form)
        assert type(rule) is cls and rule.form == form and rule.gamma == 0.5
        assert type(cls(make_compressor("topk:0.1"), 0.5)) is cls  # a subclass built directly is the same rule
        x = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert decode(rule.send(rule.init_state(x), 0, [1], 0)[1]).form == form
    assert type(PushSum()) is DebiasedReferencePushSum  # the default form
    with pytest.raises(ValueError, match="'ef' form, got form='ref'"):
        ErrorFeedbackPushSum(form="ref")


def _reencode(data: bytes, **change) -> bytes:
    m = decode(data)
    fields = {"sender": m.sender, "round": m.round, "a": m.a, "y": m.y, "payload": m.payload, "form": m.form}
    return encode(Message(**(fields | change)))


def test_forged_sender_is_rejected_and_leaves_edge_references_alone():
    rule = PushSum(make_compressor("topk:0.2"), 0.5, "ref")
    x0 = torch.randn(3, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b, c = (rule.init_state(x0[i]) for i in range(3))
    # a and b both send to c once, so c holds a reference for each edge
    assert rule.receive(c, [(0, rule.send(a, 0, [2], 0)[2]), (1, rule.send(b, 1, [2], 0)[2])]) == []
    refs = {k: v.clone() for k, v in c.refs_in.items()}
    x, y = c.x.clone(), c.y
    # node 1 writes node 0's id into its message: the relay delivers it as from node 1, the receiver refuses it
    forged = _reencode(rule.send(b, 1, [2], 1)[2], sender=0)
    (rej,) = rule.receive(c, [(1, forged)])
    assert (rej.index, rej.sender) == (0, 1) and "from node 0 but came from node 1" in rej.reason
    assert torch.equal(c.x, x) and c.y == y and c.refs_in.keys() == refs.keys()
    assert all(torch.equal(c.refs_in[k], refs[k]) for k in refs)


def test_lookahead_offset_does_not_depend_on_the_order_the_copies_are_held_in():
    """A node state read back from a file (the Flower node store) lists its in-neighbour copies in another order than
    the in-process loop built them; the offset must be bitwise the same, or the two paths drift apart by an ulp a
    round. Random float32 copies: a float mean over them in another order differs in some entries."""
    gen = torch.Generator().manual_seed(0)
    copies = {j: torch.randn(20_000, generator=gen) * 10 ** float(j % 3) for j in (7, 2, 5, 4)}
    z = torch.randn(20_000, generator=gen, dtype=torch.float64)
    held = NodeState(x=z.clone(), y=1.0)
    held.refs_in = dict(copies)
    reread = NodeState(x=z.clone(), y=1.0)
    reread.refs_in = {j: copies[j] for j in sorted(copies, reverse=True)}
    stacked = torch.stack(list(copies.values())).mean(0)
    restacked = torch.stack(list(reread.refs_in.values())).mean(0)
    assert not torch.equal(stacked, restacked)  # the order does change a float mean: the test can fail
    assert torch.equal(PushSum.lookahead_offset(held, 0.5), PushSum.lookahead_offset(reread, 0.5))
