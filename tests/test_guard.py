"""A broken or hostile node cannot stop the run, impersonate a peer, or take mass with it (docs/reliability.md).

Strategy level, with real Flower records: every kind of bad train reply is refused whole with its reason, and
arbitrary replies (hypothesis) never raise, never route anything that fails the checks and never change the honest
nodes' mass; a forged sender never reaches an honest node; messages a receiver rejects go home exactly, also when
their sender has used the edge since. (A forged sender at the receiver: test_pushsum.py; a hostile network:
test_router.py; one hostile node among 16 in whole runs: test_reliability.py.)
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from flower_sparsepush.simulations.campaign import flower_task  # Messages are built inside a Flower task
from flower_sparsepush.strategies.routing import RoutingStrategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_sparsepush.core.codec import Message as Msg
from flower_sparsepush.core.codec import decode, encode
from flower_sparsepush.core.compression import Identity, make_compressor
from flower_sparsepush.core.guard import KINDS, ReplyChecks, message_size_limit
from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.core.router import Network
from flower_sparsepush.core.topology import Graph
from flower_sparsepush.core.weights import close
from flower_sparsepush.flower.protocol import pack_frames, pack_groups, unpack_frames

torch.set_num_threads(1)

N, D, H = 5, 40, 4  # five nodes, 40 parameters, node 4 is the one that misbehaves
OUTS = [[1, 2], [2], [3], [0], [0, 2]]  # node 4 sends to 0 and 2; nobody sends to it, so it is handed no mass
RULE = PushSum(make_compressor("topk:0.25+q:4"), 0.5, "ref")
LIMIT = message_size_limit(RULE.compressor, D, torch.float64)


def reply(train_msg, rnd, frames, rejected=(), out=None, metrics=None) -> Message:
    """A train reply as the ClientApp makes it; ``out`` / ``metrics`` override fields (None removes one)."""
    o = {"round": rnd, "frames": pack_frames(frames), "rejected": np.array(rejected, dtype="<u4").tobytes()}
    m = {"train_loss": 0.5, "rejected": len(rejected), "y": 1.0}
    o, m = {**o, **(out or {})}, {**m, **(metrics or {})}
    content = RecordDict(
        {
            "out": ConfigRecord({k: v for k, v in o.items() if v is not None}),
            "metrics": MetricRecord({k: v for k, v in m.items() if v is not None}),
        }
    )
    return Message(content, reply_to=train_msg)


def reencode(data: bytes, **change) -> bytes:
    m = decode(data)
    fields = {"sender": m.sender, "round": m.round, "a": m.a, "y": m.y, "payload": m.payload, "form": m.form}
    return encode(Msg(**(fields | change)))


class Scenario:
    """A routing strategy with its checks on, and the nodes' push-sum states (gossip only, no training)."""

    def __init__(self, outs=OUTS, exclude_after=0, network=None, rule=RULE, ledger=True):
        n = len(outs)
        self.rule = rule
        self.s = RoutingStrategy(
            n,
            checks=ReplyChecks(
                graph=Graph.static(outs),
                dim=D,
                form=rule.form,
                max_message_bytes=message_size_limit(rule.compressor, D, torch.float64),
                exclude_after=exclude_after,
                gamma=rule.gamma if ledger else None,  # the weight ledger (weights.py), as the ServerApp runs it
            ),
            network=network,
        )
        self.s.node_to_part = {100 + p: p for p in range(n)}
        self.s.part_to_node = {p: 100 + p for p in range(n)}
        x0 = torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.states = [rule.init_state(x0[p]) for p in range(n)]
        self.outs = outs
        self.server_round = 0
        self.train: dict[int, Message] = {}
        self.rejections: dict[int, list] = {}

    @property
    def rnd(self) -> int:
        return self.server_round - 1

    def frames(self, p: int, tamper_inbox=None) -> tuple[list[tuple[int, bytes]], list[int]]:
        """What honest node ``p`` does with its train message: bounces, inbox (optionally tampered on the way: a
        hostile network), send. Returns its frames and the positions it rejected."""
        box = self.train[p].content["inbox"]
        for dest, data in unpack_frames(box["bounced"]):
            self.rule.bounce(self.states[p], dest, data)
        inbox = unpack_frames(box["frames"])
        if tamper_inbox:
            inbox = tamper_inbox(inbox)
        rejected = self.rule.receive(self.states[p], inbox)
        self.rejections[p] = rejected
        msgs = self.rule.send(self.states[p], p, self.outs[p], self.rnd)
        return sorted(msgs.items()), [r.index for r in rejected]

    def honest(self, p: int, **kw) -> Message:
        frames, rejected = self.frames(p, **kw)
        return reply(self.train[p], self.rnd, frames, rejected)

    def play(self, bad=None, tamper=None) -> MetricRecord:
        """One round: every contacted node answers honestly, except ``bad[p](scenario, train_msg) -> [replies]``;
        ``tamper[p]`` changes what node p is handed (a hostile network between the relay and p)."""
        bad, tamper = bad or {}, tamper or {}
        self.server_round += 1
        with flower_task():
            msgs = self.s.configure_train(self.server_round, ArrayRecord(), ConfigRecord(), grid=None)
            self.train = {self.s.node_to_part[m.metadata.dst_node_id]: m for m in msgs}
            replies = []
            for p in sorted(self.train):
                if p in bad:
                    replies += bad[p](self, self.train[p])
                else:
                    replies.append(self.honest(p, tamper_inbox=tamper.get(p)))
            return self.s.aggregate_train(self.server_round, replies)[1]

    def held(self, exclude=None) -> list[tuple[int, int, bytes]]:
        """Every message the router holds as (sender, destination, bytes), leaving out those from ``exclude``."""
        r = self.s.router
        out = [(s, dest, d) for dest, box in enumerate(r.mailboxes) for _, s, d in box]
        out += [(s, dest, d) for s, box in enumerate(r.bounced) for dest, d in box]
        return sorted(m for m in out if m[0] != exclude)

    def in_step(self, i: int, j: int) -> bool:
        """Both ends of edge (i -> j) hold the same reference, counting the messages still on their way."""
        ref = self.states[j].refs_in[i].clone()
        for _, s, d in self.s.router.mailboxes[j]:
            if s == i:
                decode(d).payload.add_to_(ref)
        return torch.allclose(self.states[i].refs_out[j], ref, atol=1e-9)

    def honest_mass(self) -> float:
        """Weight held by the honest nodes and by the messages they sent that the router holds."""
        return sum(st.y for p, st in enumerate(self.states) if p != H) + sum(decode(d).y for _, _, d in self.held(H))


# --------------------------------------------------------------------------- every kind of bad reply


def _h_frames(sc: Scenario) -> list[tuple[int, bytes]]:
    return sc.frames(H)[0]


def _with(fn):
    """A bad reply of node H built from the frames it would honestly send: ``fn(scenario, train_msg, frames)``."""
    return lambda sc, tm: fn(sc, tm, _h_frames(sc))


BAD = {
    "unknown node": (
        lambda sc, tm: [
            reply(Message(RecordDict(), dst_node_id=999, message_type=MessageType.TRAIN), sc.rnd, _h_frames(sc))
        ],
        "node id 999",
    ),
    "unexpected": (lambda sc, tm: [sc.honest(H), reply(tm, sc.rnd, [])], "not asked for"),
    "schema: missing field": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, f, out={"rejected": None})]), "fields"),
    "schema: extra record": (
        _with(
            lambda sc, tm, f: [
                Message(
                    RecordDict(
                        {
                            "out": reply(tm, sc.rnd, f).content["out"],
                            "metrics": reply(tm, sc.rnd, f).content["metrics"],
                            "x": ArrayRecord({"z": Array(np.zeros(3))}),
                        }
                    ),
                    reply_to=tm,
                )
            ]
        ),
        "records",
    ),
    "schema: frames not bytes": (lambda sc, tm: [reply(tm, sc.rnd, [], out={"frames": "abc"})], "bytes"),
    "schema: truncated frames": (
        _with(lambda sc, tm, f: [reply(tm, sc.rnd, [], out={"frames": pack_frames(f)[:-3]})]),
        "truncated",
    ),
    "schema: metric type": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, f, metrics={"y": [1.0]})]), "number"),
    "schema: rejected position": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, f, rejected=[0])]), "positions"),
    "round: reply": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, f, out={"round": sc.rnd + 1})]), "asked for round"),
    "round: bool": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, f, out={"round": True})]), "asked for round"),
    "round: message": (
        _with(lambda sc, tm, f: [reply(tm, sc.rnd, [(d, reencode(m, round=sc.rnd + 3)) for d, m in f])]),
        "says round",
    ),
    "destinations: wrong node": (
        _with(lambda sc, tm, f: [reply(tm, sc.rnd, [(1, f[0][1]), f[1]])]),
        "out-neighbours",
    ),
    "destinations: one missing": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, f[:1])]), "out-neighbours"),
    # (one message more than its out-degree can exceed the reply's cost cap: test_weights.py)
    "destinations: twice": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, [f[0], (f[0][0], f[1][1])])]), "same node"),
    "destinations: no such node": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, [f[0], (7, f[1][1])])]), "0..4"),
    "size: dense": (
        _with(
            lambda sc, tm, f: [
                reply(
                    tm,
                    sc.rnd,
                    [(d, reencode(m, payload=Identity()(torch.ones(D, dtype=torch.float64)))) for d, m in f],
                )
            ]
        ),
        "at most",
    ),
    "size: huge": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, [(f[0][0], b"SP" * 100_000), f[1]])]), "at most"),
    "message: garbage": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, [(f[0][0], b"\x01" * 30), f[1]])]), "message"),
    "message: truncated": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, [(f[0][0], f[0][1][:-2]), f[1]])]), "length"),
    "message: other form": (
        _with(lambda sc, tm, f: [reply(tm, sc.rnd, [(d, reencode(m, form="ef")) for d, m in f])]),
        "'ef' form",
    ),
    "message: other model size": (
        _with(
            lambda sc, tm, f: [
                reply(
                    tm,
                    sc.rnd,
                    [(d, encode(Msg(H, sc.rnd, 0.5, 0.1, RULE.compressor(torch.ones(D - 8)), "ref"))) for d, _ in f],
                )
            ]
        ),
        "model has 40",
    ),
    "sender": (_with(lambda sc, tm, f: [reply(tm, sc.rnd, [(d, reencode(m, sender=1)) for d, m in f])]), "from node 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_kind_of_bad_reply_is_refused_whole_with_its_reason(case):
    make, phrase = BAD[case]
    kind = case.partition(":")[0]
    assert kind in KINDS
    sc = Scenario()
    sc.play()  # one honest round: mail and edge references exist
    metrics = sc.play(bad={H: make})
    last = sc.s.guard.rejected_replies[-1]
    assert (last["round"], last["kind"]) == (2, kind) and phrase in last["reason"], last
    assert metrics["replies_rejected"] == 1
    if kind != "unexpected":  # (there, the first of its two replies was a good one)
        assert not [m for m in sc.held() if m[0] == H]  # nothing of it was routed
    held, mass = _reference()  # the honest nodes' messages and mass are as if node 4 had not answered at all
    assert sc.held(H) == held and sc.honest_mass() == mass
    if kind not in ("unknown node", "unexpected"):  # a refused reply makes its node a straggler for the round
        assert sc.s.ledger.stragglers[-1]["node"] == H and sc.s.ledger.stragglers[-1]["reason"].startswith(
            f"rejected reply ({kind})"
        )
        assert sc.s.guard.offences == {H: 1}
    sc.play()  # the run goes on, and the node is contacted again
    assert set(sc.train) == set(range(N))


def test_honest_replies_pass_and_nothing_is_refused():
    sc = Scenario()
    for _ in range(4):
        sc.play()
    assert sc.s.guard.rejected_replies == [] and sc.s.ledger.stragglers == []
    assert sum(s.y for s in sc.states) + sc.s.router.in_transit_mass() == pytest.approx(N, abs=1e-12)


def test_no_good_reply_at_all_stops_the_run():
    sc = Scenario()
    garbage = lambda sc, tm: [reply(tm, sc.rnd, [], out={"round": -1})]  # noqa: E731
    with pytest.raises(RuntimeError, match="no node returned a valid train reply"):
        sc.play(bad=dict.fromkeys(range(N), garbage))


# --------------------------------------------------------------------------- arbitrary replies (hypothesis)

CONFIG_VALUE = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.binary(max_size=40),
    st.text(max_size=6),
    st.booleans(),
    st.lists(st.integers(0, 9), min_size=1, max_size=3),
)
METRIC_VALUE = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.lists(st.floats(), min_size=1, max_size=3)
)
MUTATION = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(["round", "frames", "rejected", "zz"]), CONFIG_VALUE),
    st.tuples(st.just("metric"), st.sampled_from(["train_loss", "rejected", "y", "zz"]), METRIC_VALUE),
    st.tuples(st.just("delete"), st.sampled_from(["round", "frames", "rejected", "train_loss", "y"])),
    st.tuples(st.just("dest"), st.integers(0, 1), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("drop-frame"), st.integers(0, 1)),
    st.tuples(st.just("dup-frame"), st.integers(0, 1)),
    st.tuples(st.just("add-frame"), st.integers(0, 6), st.binary(max_size=120)),
    st.tuples(st.just("flip"), st.integers(0, 1), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1), st.integers(0, 10**6)),
    st.tuples(
        st.just("reencode"),
        st.integers(0, 1),
        st.sampled_from(["sender", "round", "form", "y", "a"]),
        st.integers(0, 6),
    ),
    st.tuples(st.just("dense"), st.integers(0, 1)),
    st.tuples(st.just("positions"), st.binary(max_size=12)),
    st.tuples(st.just("record"), st.sampled_from(["out", "metrics", "extra"]), st.sampled_from(["config", "metric"])),
)


def _mutated(sc: Scenario, tm: Message, mutations) -> Message:
    frames = _h_frames(sc)
    out = {"round": sc.rnd, "rejected": b""}
    deleted = set()
    metrics = {"train_loss": 0.5, "rejected": 0, "y": 1.0}
    kinds = {"out": "config", "metrics": "metric"}
    for mut in mutations:
        op, *arg = mut
        if op == "field":
            out[arg[0]] = arg[1]
        elif op == "metric":
            metrics[arg[0]] = arg[1]
        elif op == "delete":
            deleted.add(arg[0])
        elif op == "record":
            kinds[arg[0]] = arg[1]
        elif op == "positions":
            out["rejected"] = arg[0]
        elif op == "add-frame":
            frames.append((arg[0], arg[1]))
        elif frames:
            _mutate_frame(frames, op, *arg)
    out.setdefault("frames", pack_frames(frames))
    out = {k: v for k, v in out.items() if k not in deleted}
    metrics = {k: v for k, v in metrics.items() if k not in deleted}
    records = {}
    for name, fields in (("out", out), ("metrics", metrics)):
        numeric = {k: v for k, v in fields.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)}
        if kinds[name] == "metric":
            records[name] = MetricRecord({k: v for k, v in numeric.items() if not isinstance(v, list) or v})
        else:
            records[name] = ConfigRecord(fields)
    if "extra" in kinds:
        records["extra"] = ConfigRecord({"x": 1}) if kinds["extra"] == "config" else MetricRecord({"x": 1})
    return Message(RecordDict(records), reply_to=tm)


def _mutate_frame(frames: list, op: str, *arg) -> None:
    i = arg[0] % len(frames)
    dest, data = frames[i]
    with contextlib.suppress(ValueError):  # a message cut or flipped before may not decode any more
        if op == "dest":
            frames[i] = (arg[1], data)
        elif op == "drop-frame":
            frames.pop(i)
        elif op == "dup-frame":
            frames.append(frames[i])
        elif op == "flip" and data:
            pos = arg[1] % len(data)
            frames[i] = (dest, data[:pos] + bytes([data[pos] ^ arg[2]]) + data[pos + 1 :])
        elif op == "truncate":
            frames[i] = (dest, data[: arg[1] % (len(data) + 1)])
        elif op == "dense":
            frames[i] = (dest, reencode(data, payload=Identity()(torch.randn(D, dtype=torch.float64))))
        elif op == "reencode":
            new = {
                "sender": arg[2],
                "round": arg[2],
                "form": ["ef", "ref", "ref-x"][arg[2] % 3],
                "y": decode(data).y * (1 + arg[2] * 1e-9),  # from a billionth more weight to none at all
                "a": (arg[2] + 1) / 8,
            }[arg[1]]
            frames[i] = (dest, reencode(data, **{arg[1]: new}))


_REFERENCE: dict = {}


def _reference() -> tuple[list, float]:
    """What the router holds from honest nodes after round 2 when node 4 does not answer at all."""
    if not _REFERENCE:
        sc = Scenario()
        sc.play()
        sc.play(bad={H: lambda sc, tm: []})
        _REFERENCE["held"], _REFERENCE["mass"] = sc.held(H), sc.honest_mass()
        honest = Scenario()
        honest.play()
        honest.play()
        _REFERENCE["h_weights"] = {(decode(d).a, decode(d).y) for s, _, d in honest.held() if s == H}.pop()
    return _REFERENCE["held"], _REFERENCE["mass"]


@settings(max_examples=150, deadline=None)
@given(
    mutations=st.lists(MUTATION, max_size=4),
    copies=st.integers(1, 2),
    unknown=st.booleans(),
    error=st.booleans(),
)
def test_arbitrary_replies_never_raise_nor_change_honest_mass(mutations, copies, unknown, error):
    from flwr.app import Error

    def adversary(sc, tm):
        out = [_mutated(sc, tm, mutations) for _ in range(copies)]
        if error:
            out.insert(0, Message(Error(0, "boom"), reply_to=tm))
        if unknown:
            out.append(reply(Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN), sc.rnd, []))
        return out

    sc = Scenario()
    sc.play()
    sc.play(bad={H: adversary})  # never raises
    held, mass = _reference()
    assert sc.held(H) == held  # the honest nodes' messages are exactly where they would be without node 4
    assert sc.honest_mass() == mass
    routed = [m for m in sc.held() if m[0] == H]
    for _, _, data in routed:  # what was routed from node 4 passed every check an honest receiver makes
        msg = decode(data, expected_dim=D)
        assert (msg.sender, msg.round, msg.form) == (H, 1, "ref") and len(data) <= LIMIT
        a0, y0 = _REFERENCE["h_weights"]  # and carries its share, to the ledger's few-ulp tolerance (weights.py)
        rtol = sc.s.guard.weights.rtol
        assert close(msg.a, a0, rtol) and close(msg.y, y0, rtol), (msg.a, msg.y, a0, y0)
    assert sorted(dest for _, dest, _ in routed) in ([], OUTS[H])
    records = [r for r in sc.s.guard.rejected_replies if r["round"] == 2]
    assert all(r["kind"] in KINDS and r["reason"] for r in records)
    refused = [r for r in records if r["node"] == H and r["kind"] not in ("unexpected",)]
    if routed:
        assert not refused and not error
    elif not error:
        assert len(refused) == 1 and sc.s.ledger.stragglers[-1]["node"] == H  # refused with a reason, a straggler
    sc.play()  # the run goes on


# --------------------------------------------------------------------------- forged senders


def test_forged_sender_never_reaches_an_honest_node_through_the_relay():
    """Node 4 forges node 3's id on its messages to nodes 0 and 2: refused at the relay, so no honest node ever
    sees them, the references of node 4's edges stay where they were, and node 3's edge to node 0 stays in step."""
    sc = Scenario()
    sc.play()
    forge = _with(lambda sc, tm, f: [reply(tm, sc.rnd, [(d, reencode(m, sender=3)) for d, m in f])])
    sc.play(bad={H: forge})
    assert sc.s.guard.rejected_replies[-1]["kind"] == "sender"
    refs = {p: sc.states[p].refs_in[H].clone() for p in (0, 2)}
    for _ in range(3):
        sc.play(bad={H: forge})
        assert not any(sc.rejections.values())  # no honest node ever had to reject anything
    assert all(torch.equal(sc.states[p].refs_in[H], refs[p]) for p in (0, 2))
    for i in range(N - 1):
        for j in OUTS[i]:
            assert sc.in_step(i, j), (i, j)


# --------------------------------------------------------------------------- rejected messages go home


class _OfflineOnce(Network):
    """Node 2 is offline in round 1 only, so in round 2 it is handed two messages from each in-neighbour."""

    def online(self, rnd: int, node: int) -> bool:
        return not (node == 2 and rnd == 1)


def test_messages_a_receiver_rejects_go_home_exactly():
    """A hostile network truncates node 0's first message to node 2 on the way from the relay. Node 2 rejects it
    and the later one from node 0 (same edge); the relay bounces both, and node 0's message of the next round on
    that edge, newest first; node 0 undoes all three. The weight is exact and both ends of every edge keep the
    same reference, so the next messages on the edge are credited exactly."""
    outs = [[1, 2], [2], [3], [0]]
    sc = Scenario(outs=outs, network=_OfflineOnce())
    sc.play()
    sc.play()  # node 2 offline: node 0 and node 1 have two messages each waiting for it
    first_from_0 = lambda inbox: [(s, d[:-1]) if k == 0 else (s, d) for k, (s, d) in enumerate(inbox)]  # noqa: E731
    sc.play(tamper={2: first_from_0})
    assert [(r.index, r.sender) for r in sc.rejections[2]] == [(0, 0), (2, 0)]  # inbox: 0, 1, 0, 1 (round order)
    assert sc.s.guard.bounced_rejected == 3 and sc.s.guard.rejected_by_sender == {0: 2}
    assert [decode(d).round for dest, d in sc.s.router.bounced[0]] == [2, 1, 0]
    total = sum(s.y for s in sc.states) + sc.s.router.in_transit_mass()
    assert total == pytest.approx(4, abs=1e-12)
    for _ in range(3):
        sc.play()
    assert sum(s.y for s in sc.states) + sc.s.router.in_transit_mass() == pytest.approx(4, abs=1e-12)
    for i, outs_i in enumerate(outs):
        for j in outs_i:
            assert sc.in_step(i, j), (i, j)


# --------------------------------------------------------------------------- the weight ledger (weights.py)


def _weights(y=None, a=None, keep=None):
    """Node H's honest frames with every message's weight (or mixing factor) replaced; the honest frames go to
    ``keep`` (what the node keeps and resends)."""
    change = {k: v for k, v in (("y", y), ("a", a)) if v is not None}

    def bad(sc, tm, f):
        if keep is not None:
            keep[sc.rnd] = f
        return [reply(tm, sc.rnd, [(d, reencode(m, **change)) for d, m in f])]

    return _with(bad)


def total_mass(sc: Scenario) -> float:
    """Every node's weight (node H by the ledger: it may hold more than it can ever send) plus what the relay
    holds: the router's mail and bounces, and what it handed H and holds until H acknowledges it."""
    w = sc.s.guard.weights
    held = sum(decode(d).y for _, i, b in sc.s.ledger.unacked[H] for _, d in [*i, *b])
    honest = sum(st.y for p, st in enumerate(sc.states) if p != H)
    return honest + w.y[H] + held + sc.s.router.in_transit_mass()


WEIGHT_ATTACKS = {"y=1e308": {"y": 1e308}, "y=1e9": {"y": 1e9}, "y=1e-300": {"y": 1e-300}, "a=0.9": {"a": 0.9}}


@pytest.mark.parametrize("attack", list(WEIGHT_ATTACKS))
def test_a_message_whose_weight_is_not_its_share_is_refused_at_its_sender(attack):
    """Weights that create (1e308, 1e9) or destroy (1e-300) mass, or a mixing factor other than the rule's: refused
    whole at the relay, charged to node H; the honest nodes are exactly where they are when H is silent, and the
    mass is exact."""
    sc = Scenario()
    sc.play()
    kept: dict = {}
    sc.play(bad={H: _weights(**WEIGHT_ATTACKS[attack], keep=kept)})
    last = sc.s.guard.rejected_replies[-1]
    assert (last["node"], last["kind"]) == (H, "weight") and sc.s.guard.offences == {H: 1}
    held, mass = _reference()
    assert sc.held(H) == held and sc.honest_mass() == mass
    assert total_mass(sc) == pytest.approx(N, abs=1e-9)
    # the run goes on: H (now honest) resends its outbox of the refused round, as a node does, and it passes
    resend = _with(lambda sc, tm, f: [reply(tm, sc.rnd, f, out={"resent": pack_groups(sorted(kept.items()))})])
    sc.play(bad={H: resend})
    sc.play()
    assert sc.s.guard.offences == {H: 1} and total_mass(sc) == pytest.approx(N, abs=1e-9)


def test_a_re_stamped_old_message_is_refused():
    """Node H keeps its messages of round 0 and sends them again in round 2 with the round rewritten: node H's
    weight has changed since (it sent a third of it twice), so the weight is not the share of round 2."""
    sc = Scenario()
    old: list = []
    sc.play(bad={H: lambda sc, tm: [reply(tm, sc.rnd, old.extend(_h_frames(sc)) or old)]})
    sc.play()
    restamp = lambda sc, tm: [reply(tm, sc.rnd, [(d, reencode(m, round=sc.rnd)) for d, m in old])]  # noqa: E731
    sc.frames(H)  # (it does its round, and keeps it to itself)
    sc.play(bad={H: restamp})
    last = sc.s.guard.rejected_replies[-1]
    assert (last["node"], last["kind"], last["round"]) == (H, "weight", 3) and "carries y=" in last["reason"]
    assert sc.s.guard.offences == {H: 1}


def _lost_then(resend):
    """Node H does round 1 but its reply is lost; in round 2 it replies with ``resend(frames of round 1)`` as its
    resent outboxes. Returns the scenario after round 2."""
    sc = Scenario()
    sc.play()
    kept = {}
    sc.play(bad={H: lambda sc, tm: kept.setdefault(1, _h_frames(sc)) and []})
    resent = pack_groups(resend(kept[1]))
    sc.play(bad={H: _with(lambda sc, tm, f: [reply(tm, sc.rnd, f, out={"resent": resent})])})
    return sc


def test_a_resent_outbox_is_routed_once_and_checked_like_a_fresh_one():
    sc = _lost_then(lambda f: [(1, f)])  # honest: resent once
    assert sc.s.guard.rejected_replies == [] and sc.s.messages_resent == 2
    assert total_mass(sc) == pytest.approx(N, abs=1e-9)
    for case, groups, kind in (
        ("twice", lambda f: [(1, f), (1, f)], "size"),  # more than an honest reply can hold: refused unread
        ("twice, once empty", lambda f: [(1, []), (1, f)], "round"),
        ("a routed round", lambda f: [(0, []), (1, f)], "round"),
        ("a round it never ran", lambda f: [(1, f), (2, [])], "round"),
        ("more weight", lambda f: [(1, [(d, reencode(m, y=decode(m).y * 2)) for d, m in f])], "weight"),
    ):
        sc = _lost_then(groups)
        last = sc.s.guard.rejected_replies[-1]
        assert (last["node"], last["kind"]) == (H, kind), (case, last)
        assert sc.s.guard.offences == {H: 1} and sc.s.messages_resent == 0, case
        assert not [m for m in sc.held() if m[0] == H], case  # nothing of it was routed
        assert total_mass(sc) == pytest.approx(N, abs=1e-9), case


def test_50_mb_of_empty_resent_groups_are_refused_unread():
    """A reply far longer than an honest one can be (one message per out-neighbour of at most the compressor's
    longest, per round it may carry) is refused before anything of it is unpacked."""
    import time

    sc = Scenario()
    sc.play()
    junk = b"\x00" * 50_000_000  # 6.25 million empty resent groups
    t0 = time.perf_counter()
    sc.play(bad={H: _with(lambda sc, tm, f: [reply(tm, sc.rnd, f, out={"resent": junk})])})
    elapsed = time.perf_counter() - t0
    last = sc.s.guard.rejected_replies[-1]
    assert (last["node"], last["kind"]) == (H, "size") and "50000" in last["reason"] and "at most" in last["reason"]
    assert elapsed < 2.0, elapsed  # unpacking them took about 9 s
    held, mass = _reference()
    assert sc.held(H) == held and sc.honest_mass() == mass


def test_claiming_to_reject_what_it_absorbed_creates_no_mass():
    """Node H (now with node 0 sending to it) absorbs everything it is handed and claims it rejected all of it:
    the ledger credits it nothing of what it says it rejected, so its messages carry more than its share and the
    reply is refused (charged to H); nothing goes home twice, the mass stays exact, and no honest node is refused."""
    outs = [[1, 4], [2], [3], [0], [0, 2]]
    sc = Scenario(outs=outs)
    sc.play()

    def liar(sc, tm):
        frames, _ = sc.frames(H)
        n = len(unpack_frames(tm.content["inbox"]["frames"]))
        assert n > 0
        return [reply(tm, sc.rnd, frames, rejected=list(range(n)))]

    for _ in range(3):
        sc.play(bad={H: liar})
    refused = sc.s.guard.rejected_replies
    assert [(r["node"], r["kind"]) for r in refused] == [(H, "weight")] * 3
    assert sc.s.guard.bounced_rejected == 0 and sc.s.messages_rejected == 0
    assert total_mass(sc) == pytest.approx(N, abs=1e-9)


def test_only_the_attacker_is_excluded():
    sc = Scenario(exclude_after=2)
    sc.play()
    for _ in range(4):
        sc.play(bad={H: _weights(y=1e9)})
    assert sc.s.guard.excluded == [{"round": 3, "node": H, "replies_rejected": 2}]
    assert {r["node"] for r in sc.s.guard.rejected_replies} == {H}
    assert sc.s.ledger.stragglers and {e["node"] for e in sc.s.ledger.stragglers} == {H}


def test_the_weight_ledger_is_kept_in_checkpoints(tmp_path):
    """The relay's checkpoint (torch.save, loadable with weights_only) holds the ledger, so a resumed run checks the
    nodes against the weights they hold (a Flower run resumed through it: test_flower_state.py); a checkpoint
    without one is refused rather than resumed with every weight back at 1."""
    sc = Scenario()
    for _ in range(3):
        sc.play()
    torch.save(sc.s.state_dict(), tmp_path / "ck.pt")
    d = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert d["weights"]["y"] == [st.y for st in sc.states] and len(set(d["weights"]["y"])) > 1
    resumed = Scenario()
    resumed.s.load_state_dict(d, done=3)
    assert resumed.s.guard.weights.y == sc.s.guard.weights.y
    with pytest.raises(ValueError, match="no weight ledger"):
        Scenario().s.load_state_dict({k: v for k, v in d.items() if k != "weights"}, done=3)


def test_a_reported_weight_the_ledger_disagrees_with_is_overruled_and_counted():
    """Evaluation: node H reports y = 9.34 (and some pending weight): the relay accounts for it at the ledger's
    weight, records the correction, and the reported mass is exact; the honest reports stand as they are."""
    from flower_sparsepush.flower.protocol import eval_reply_content

    sc = Scenario()
    for _ in range(3):
        sc.play()
    with flower_task():
        asks = sc.s.configure_evaluate(sc.server_round, ArrayRecord(), ConfigRecord(), grid=None)
        replies = []
        for m in asks:
            p = sc.s.node_to_part[m.metadata.dst_node_id]
            y, pending = (9.34, 0.5) if p == H else (sc.states[p].y, 0.0)
            z = sc.states[p].z.numpy().astype(np.float32)
            replies.append(Message(eval_reply_content(z, 0.5, 1.0, y, pending, sc.rnd), reply_to=m))
        sc.s.aggregate_evaluate(sc.server_round, replies)
    ev, w = sc.s.last_eval, sc.s.guard.weights
    assert w.corrections == [{"round": 3, "node": H, "reported": 9.34 + 0.5, "ledger": sc.states[H].y}]
    assert ev.y_by_node == {p: st.y for p, st in enumerate(sc.states)}
    assert ev.y_nodes + ev.y_pending + ev.y_mailboxes == pytest.approx(N, abs=1e-12)
    assert sc.s.report().weight_corrections == w.corrections
