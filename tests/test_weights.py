"""The relay's weight ledger (core/weights.py): it follows every node's push-sum weight with the node's own
arithmetic, so an honest node's messages always pass, bit for bit, and any other weight is refused.

Rows of issue 27 it stops, at the strategy level with real Flower records: test_guard.py ("the weight ledger");
through Flower's simulation engine with a hostile ClientApp: test_reliability.py."""

from __future__ import annotations

import random

import pytest
import torch

from flower_sparsepush.core.codec import Message, decode, encode
from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.core.weights import RTOL, WeightError, WeightLedger, carried

D = 30


def _restamp(data: bytes, **change) -> bytes:
    m = decode(data)
    fields = {"sender": m.sender, "round": m.round, "a": m.a, "y": m.y, "payload": m.payload, "form": m.form}
    return encode(Message(**(fields | change)))


def _gossip(seed: int, form: str, gamma):
    """Honest push-sum nodes on random out-neighbours, with drops that bounce, nodes that skip rounds (their mail
    waits), and nodes that run several rounds before the relay hears from them (their outboxes come as resends).
    Yields ``(node, outboxes, batches, state)`` at every point the relay checks a node."""
    rng = random.Random(seed)
    n = 5
    rules = {}
    x0 = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rule0 = PushSum(make_compressor("topk:0.3+q:4"), 0.5, form)
    states = [rule0.init_state(x0[p]) for p in range(n)]
    mail = [[] for _ in range(n)]  # (sender, bytes) waiting
    back = [[] for _ in range(n)]  # (dest, bytes) bounced
    unacked = [[] for _ in range(n)]  # batches since the relay last heard, and the outboxes since
    outboxes = [[] for _ in range(n)]
    for t in range(12):
        g = gamma(t) if callable(gamma) else gamma
        rules[t] = PushSum(make_compressor("topk:0.3+q:4"), g, form)
        for p in range(n):
            if rng.random() < 0.2:
                continue  # offline this round
            inbox, bounced = mail[p], back[p]
            mail[p], back[p] = [], []
            unacked[p].append((t, inbox, bounced))
            for dest, data in bounced:
                rules[t].bounce(states[p], dest, data)
            assert rules[t].receive(states[p], inbox) == []
            outs = rng.sample([q for q in range(n) if q != p], rng.randint(1, 3))
            msgs = rules[t].send(states[p], p, outs, t)
            outboxes[p].append((t, sorted(msgs.items())))
            for dest, data in msgs.items():
                (back[p].append((dest, data)) if rng.random() < 0.2 else mail[dest].append((p, data)))
            if rng.random() < 0.6:  # the relay hears from it now (else: its reply was lost; it resends later)
                yield p, outboxes[p], unacked[p], states[p]
                outboxes[p], unacked[p] = [], []


@pytest.mark.parametrize("form", ["ef", "ref", "ref-x"])
@pytest.mark.parametrize("gamma", [0.5, lambda t: 0.5 * (t + 1) / 4 if t < 4 else 0.5], ids=["fixed", "warm-up"])
def test_the_ledger_follows_honest_nodes_bit_for_bit(form, gamma):
    for seed in range(6):
        ledger = WeightLedger(5, gamma)
        checked = 0
        for p, outboxes, batches, state in _gossip(seed, form, gamma):
            y = ledger.replay(p, outboxes, batches)
            assert y == state.y  # the node's own arithmetic, in its order: equal, not close
            ledger.commit(p, y)
            checked += len(outboxes)
        assert checked > 30


def _one_round(y0: float = 1.0):
    rule = PushSum(make_compressor("topk:0.3"), 0.5, "ref")
    x0 = torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = rule.init_state(x0)
    state.y = y0
    inbox = [(1, rule.send(rule.init_state(x0), 1, [0], 0)[0])]
    rule.receive(state, inbox)
    msgs = sorted(rule.send(state, 0, [2, 3], 0).items())
    return msgs, [(0, inbox, [])], state


@pytest.mark.parametrize("y", [1e308, 1e9, 1e-300, 0.5])
def test_any_other_weight_is_refused(y):
    msgs, batches, _ = _one_round()
    bad = [(d, _restamp(m, y=y)) for d, m in msgs]
    with pytest.raises(WeightError, match="carries y="):
        WeightLedger(4, 0.5).replay(0, [(0, bad)], batches)
    bad_a = [(d, _restamp(m, a=0.9)) for d, m in msgs]
    with pytest.raises(WeightError, match="mixing factor"):
        WeightLedger(4, 0.5).replay(0, [(0, bad_a)], batches)


def test_the_tolerance_is_a_few_ulps():
    msgs, batches, state = _one_round()
    share = carried(msgs[0][1])[1]
    ledger = WeightLedger(4, 0.5)
    near = [(d, _restamp(m, y=share * (1 + 4e-16))) for d, m in msgs]
    assert ledger.replay(0, [(0, near)], batches) == state.y
    far = [(d, _restamp(m, y=share * (1 + 100 * RTOL))) for d, m in msgs]
    with pytest.raises(WeightError):
        ledger.replay(0, [(0, far)], batches)


def test_rejected_messages_are_not_credited():
    """A node that says it rejected the message it was handed is credited nothing of it: honest (it did not absorb
    it) its messages pass; lying (it absorbed it) they carry more than its share and are refused."""
    rule = PushSum(make_compressor("topk:0.3"), 0.5, "ref")
    x0 = torch.zeros(D, dtype=torch.float64)
    inbox = [(1, rule.send(rule.init_state(x0), 1, [0], 0)[0])]
    honest = rule.init_state(x0)  # rejects: absorbs nothing
    msgs = sorted(rule.send(honest, 0, [2], 0).items())
    ledger = WeightLedger(3, 0.5)
    assert ledger.replay(0, [(0, msgs)], [(0, inbox, [])], rejected=[0]) == honest.y
    liar = rule.init_state(x0)
    rule.receive(liar, inbox)
    msgs = sorted(rule.send(liar, 0, [2], 0).items())
    with pytest.raises(WeightError):
        ledger.replay(0, [(0, msgs)], [(0, inbox, [])], rejected=[0])


def test_merges_vouch_and_checkpoints():
    ledger = WeightLedger(4, 0.5)
    ledger.merged([0, 2], 0.75)
    assert ledger.y == [0.75, 1.0, 0.75, 1.0]
    assert ledger.vouch(3, 1, 1.0 + 1e-15, 1.0) == 1.0 + 1e-15 and ledger.corrections == []
    assert ledger.vouch(3, 1, 9.34, 1.0) == 1.0
    assert ledger.corrections == [{"round": 3, "node": 1, "reported": 9.34, "ledger": 1.0}]
    again = WeightLedger(4, 0.5)
    again.load_state_dict(ledger.state_dict())
    assert again.y == ledger.y and again.corrections == ledger.corrections
    with pytest.raises(ValueError, match="the run has 3"):
        WeightLedger(3, 0.5).load_state_dict(ledger.state_dict())
