"""Random hostile outboxes in the in-process loop, whose relay keeps the weight ledger (run/inprocess.py).

One node of eight (on a graph whose weights differ from node to node, with dropped messages and churn) replaces its
honest outbox in each round by a hostile one drawn by hypothesis: a forged weight or mixing factor, a forged sender,
a wrong round, a wrong destination, a missing message, an uncompressed payload, huge or NaN values, a
replay of an earlier round re-stamped, flipped or cut bytes, or its honest outbox. Whatever it sends:

- the run finishes; every refused outbox is the hostile node's, and every forged weight, factor, sender, round,
  destination, size and bound is refused;
- the ledger holds every node's own weight (honest or not: the hostile node's state is honest, only its messages
  are not), so no reply created or destroyed mass: the nodes' weights, the mass in flight and what the refused
  outboxes carried (lost in-process: there is no resend) add up to the number of nodes, to 1e-9;
- when every outbox it sent was refused, the honest nodes end bit for bit where they end when it is silent
  (offline throughout): models, weights and edge references.

The same over arbitrary replies at the Flower relay: tests/test_guard.py; fixed attacks through Flower's simulation
engine: tests/test_reliability.py and tests/test_bounds.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_sparsepush.core.codec import Message, decode, encode
from flower_sparsepush.core.compression import Compressed, Identity
from flower_sparsepush.core.node import RoundOut
from flower_sparsepush.core.router import Network
from flower_sparsepush.run import inprocess, setup
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import node_round

torch.set_num_threads(1)

HOSTILE = 4  # offline in round 3 (churn), so it once takes two rounds of mail at once
ROUNDS = 5
RUN = {
    "dataset": "synthetic", "model": "mlp", "num-nodes": 8, "graph": "random-out:2", "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4", "gamma": 0.5, "num-rounds": ROUNDS, "local-steps": 1, "batch-size": 16, "lr": 0.1,
    "seed": 0, "eval-every": ROUNDS, "eval-node-samples": 0, "value-bound": 1e4, "drop": 0.2, "churn": 0.25,
}  # fmt: skip

# attacks the relay must refuse, and attacks it may let through (the message is then a lie within the checks: a
# flipped value byte, a cut that still decodes, an old payload whose weight is this round's share)
MUST = ["y-huge", "y-tiny", "y-ulp", "a", "sender", "round", "dest", "drop-one", "dense", "huge", "nan"]
MAY = ["honest", "replay", "flip", "truncate"]


def _reencode(data: bytes, **change) -> bytes:
    m = decode(data)
    fields = {"sender": m.sender, "round": m.round, "a": m.a, "y": m.y, "payload": m.payload, "form": m.form}
    return encode(Message(**(fields | change)))


def _values(data: bytes, value: float) -> bytes:
    """``data`` with its quantization scale set to ``value`` (every kept value becomes +-value)."""
    c = decode(data).payload
    return _reencode(data, payload=Compressed(c.dim, c.indices, codes=c.codes, scale=value, bits=c.bits))


def attack(kind: str, frames: list, rnd: int, earlier: dict, pick: int) -> list:
    """Node HOSTILE's outbox of round ``rnd`` when it makes ``frames`` honestly; ``earlier``: its honest outboxes
    of the rounds before; ``pick``: which message an attack on one message changes."""
    if not frames:
        return frames
    i = pick % len(frames)
    d, m = frames[i]
    one = {
        "y-huge": lambda: _reencode(m, y=1e308),
        "y-tiny": lambda: _reencode(m, y=1e-300),
        "y-ulp": lambda: _reencode(m, y=decode(m).y * (1 + 1e-9)),
        "a": lambda: _reencode(m, a=0.9),
        "sender": lambda: _reencode(m, sender=(HOSTILE + 1) % RUN["num-nodes"]),
        "round": lambda: _reencode(m, round=rnd + 1),
        "dense": lambda: _reencode(m, payload=Identity()(torch.ones(decode(m).payload.dim))),
        "huge": lambda: _values(m, 1e30),
        "nan": lambda: _values(m, math.nan),
        "flip": lambda: m[:-1] + bytes([m[-1] ^ (1 + pick % 255)]),
        "truncate": lambda: m[: len(m) - 1 - pick % 4],
    }
    out = list(frames)
    if kind in one:
        out[i] = (d, one[kind]())
    elif kind == "dest":
        out[i] = ((d + 1 + pick % 3) % RUN["num-nodes"], m)
    elif kind == "drop-one":
        out.pop(i)
    elif kind == "replay" and earlier:
        old = earlier[sorted(earlier)[pick % len(earlier)]]
        out = [(dd, _reencode(mm, round=rnd)) for dd, mm in old]
    return out


class Silent(Network):
    def online(self, rnd: int, node: int) -> bool:
        return node != HOSTILE and super().online(rnd, node)


_SILENT: list = []


def silent_states():
    if not _SILENT:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(setup, "network_of", lambda cfg: Silent(drop=cfg.drop, churn=cfg.churn, seed=cfg.seed))
            _SILENT.append(run_inprocess(validate(RUN)).states)
    return _SILENT[0]


def hostile_run(plan: list[tuple[str, int]]):
    """The run with node HOSTILE sending ``plan[t]``'s attack in round t. Returns the result, the rounds it ran and
    the weight its honest outbox of each round carried."""
    honest_out: dict[int, list] = {}
    ran: dict[int, str] = {}

    def hostile_round(setup_, state, node, rnd, inbox, bounced=()):
        res = node_round(setup_, state, node, rnd, inbox, bounced)
        if node != HOSTILE:
            return res
        frames = sorted(res.messages.items())
        kind, pick = plan[rnd]
        out = attack(kind, frames, rnd, dict(honest_out), pick)
        honest_out[rnd] = frames
        ran[rnd] = kind
        return RoundOut(dict(out), res.loss, res.rejected)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inprocess, "node_round", hostile_round)
        res = run_inprocess(validate(RUN))
    carried = {r: sum(decode(m).y for _, m in f) for r, f in honest_out.items()}
    return res, ran, carried


@settings(max_examples=60, deadline=None, derandomize=True)
@given(plan=st.lists(st.tuples(st.sampled_from(MUST + MAY), st.integers(0, 2**16)), min_size=ROUNDS, max_size=ROUNDS))
def test_random_hostile_outboxes_are_refused_at_the_attacker_and_mass_is_exact(plan):
    res, ran, carried = hostile_run(plan)
    g = res.guard
    refused = {r["round"] - 1 for r in g.rejected_replies}
    assert {r["node"] for r in g.rejected_replies} <= {HOSTILE}
    assert len(refused) == len(g.rejected_replies)  # one refusal per refused outbox
    for rnd, kind in ran.items():
        if kind in MUST:
            assert rnd in refused, (rnd, kind, g.rejected_replies)
        if kind == "honest":
            assert rnd not in refused
    # the ledger holds every node's own weight; with what the refused outboxes carried, no mass is made or lost
    for i, s in enumerate(res.states):
        assert s.y == pytest.approx(g.weights.y[i], rel=1e-12), i
    lost = sum(carried[r] for r in refused)
    assert sum(s.y for s in res.states) + res.router.in_transit_mass() + lost == pytest.approx(8.0, abs=1e-9)
    assert all(torch.isfinite(s.x).all() for s in res.states)
    if set(ran.values()) <= set(MUST):  # nothing it sent reached anyone
        for i, (a, b) in enumerate(zip(res.states, silent_states())):
            if i == HOSTILE:
                continue
            assert torch.equal(a.x, b.x) and a.y == b.y and a.refs_in.keys() == b.refs_in.keys(), i
            assert all(torch.equal(a.refs_in[k], b.refs_in[k]) for k in a.refs_in)


def test_the_graph_makes_weights_differ_so_a_replay_can_be_told_apart():
    """The property test above is run where weights are not all equal (a regular graph keeps every y equal, and a
    re-stamped old message would carry this round's share by construction)."""
    res, _, _ = hostile_run([("honest", 0)] * ROUNDS)
    ys = [s.y for s in res.states]
    assert res.guard.rejected_replies == [] and max(ys) - min(ys) > 1e-3
    replay, ran, _ = hostile_run([("honest", 0), ("honest", 0), ("replay", 0), ("replay", 1), ("replay", 0)])
    assert {r["round"] - 1 for r in replay.guard.rejected_replies} == {t for t, k in ran.items() if k == "replay"}
    assert np.isfinite([s.y for s in replay.states]).all()
