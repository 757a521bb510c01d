"""A seeded fault campaign against the relay: honest faults and hostile replies, checked after every round.

The campaign drives the relay's :class:`RoutingStrategy` (strategies/routing.py) with real Flower records but no
Ray: every node is a push-sum state (gossip only, random vectors, ``topk+q``) that answers its train message as the
ClientApp does (bounces, what it was handed again after a lost reply, its inbox, then its messages; it keeps each
outbox until the relay acknowledges it and resends it). A seeded schedule injects in every round

- honest faults: dropped messages and links down for a span of rounds, offline nodes (churn), nodes whose worker
  crashes before it saves its round (no reply; it absorbs what it missed later), and replies lost or late after the
  node did its round (past the round timeout; it resends that outbox with its next reply);
- hostile replies from the designated hostile nodes, one kind of :data:`ATTACKS` per reply: forged weights and
  mixing shares, re-stamped replays, duplicated resends, floods, false rejection claims, forged senders, wrong
  destinations, NaN / inf, oversized frames, malformed records. Underneath, a hostile node runs the honest rule (so
  its own state stays what the ledger says), and what it replies is the honest reply changed by the attack.

After every round it checks (:meth:`Campaign.check`): the push-sum mass (nodes, their unacknowledged outboxes, what
the relay holds) is ``n`` to 1e-9, and every node's own weight agrees with the relay's weight ledger; no honest
node's reply was refused, no honest node is excluded, no honest receiver had to reject a message; every refused
reply is one the campaign injected, charged to its hostile node with an expected kind. A new hostile behaviour is
one entry of :data:`ATTACKS`.

``python -m flower_sparsepush.simulations.campaign --rounds 300 --seed 0 --out results/campaign`` writes
``campaign.json`` and ``campaign.md`` (docs/reliability.md, "Fault campaign").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from flower_sparsepush.strategies.routing import RoutingStrategy
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flower_sparsepush.core.codec import Message as Msg
from flower_sparsepush.core.codec import decode, encode
from flower_sparsepush.core.compression import Identity, make_compressor
from flower_sparsepush.core.guard import ReplyChecks, message_size_limit
from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.core.router import Network
from flower_sparsepush.core.topology import Graph
from flower_sparsepush.flower import protocol
from flower_sparsepush.run.keys import KEYS

TOL = 1e-9
KEEP = 20  # rounds of its own outboxes a hostile node keeps for replays


# --------------------------------------------------------------------------- hostile replies


@dataclass
class Turn:
    """What a node has in hand when it answers a train message: its honest reply's parts and its history."""

    msg: Message  # the train message
    rnd: int
    frames: protocol.Frames  # its honest messages of this round
    resent: list[tuple[int, protocol.Frames]]  # its honest resends
    handed: int  # how many messages it was handed (positions it may claim to reject)
    absorbed: float  # weight it absorbed this round
    sent: dict[int, protocol.Frames]  # its earlier outboxes by round (kept for replays)
    n: int
    outs: list[int]


def _reply(t: Turn, frames=None, resent=None, rejected=(), out=None, metrics=None) -> Message:
    """A train reply as the ClientApp makes it, from the honest parts unless given; ``out`` / ``metrics`` change
    fields (None removes one)."""
    content = protocol.train_reply_content(
        t.rnd, t.frames if frames is None else frames, list(rejected), t.resent if resent is None else resent, 0.5, 1.0
    )
    o = {**dict(content["out"]), **(out or {})}
    m = {**dict(content["metrics"]), **(metrics or {})}
    rec = RecordDict(
        {
            "out": ConfigRecord({k: v for k, v in o.items() if v is not None}),
            "metrics": MetricRecord({k: v for k, v in m.items() if v is not None}),
        }
    )
    return Message(rec, reply_to=t.msg)


def _re(data: bytes, **change) -> bytes:
    m = decode(data)
    fields = {"sender": m.sender, "round": m.round, "a": m.a, "y": m.y, "payload": m.payload, "form": m.form}
    return encode(Msg(**(fields | change)))


def _each(**change) -> Callable[[Turn], list[Message]]:
    """Every message of this round re-encoded with ``change`` (a function of the turn, or a value)."""

    def build(t: Turn) -> list[Message]:
        c = {k: v(t) if callable(v) else v for k, v in change.items()}
        return [_reply(t, frames=[(d, _re(m, **c)) for d, m in t.frames])]

    return build


def _first(make: Callable[[Turn, int, bytes], tuple[int, bytes]]) -> Callable[[Turn], list[Message]]:
    """The first message of this round replaced by ``make(turn, dest, data) -> (dest, data)``."""
    return lambda t: [_reply(t, frames=[make(t, *t.frames[0]), *t.frames[1:]])]


def _replayable(t: Turn) -> int | None:
    """An earlier round whose messages carry another weight than this round's (a re-stamped copy is refused)."""
    y = decode(t.frames[0][1]).y
    for k in sorted(t.sent, reverse=True):
        if k < t.rnd and t.sent[k] and [d for d, _ in t.sent[k]] == [d for d, _ in t.frames]:
            if decode(t.sent[k][0][1]).y != y:
                return k
    return None


def _stranger(t: Turn) -> int:
    return next(j for j in range(t.n) if j not in t.outs and j != decode(t.frames[0][1]).sender)


@dataclass(frozen=True)
class Attack:
    """A hostile reply: the kinds of refusal it must draw (guard.KINDS), how it is built from the honest turn, and
    when it can be made (None: always)."""

    kinds: tuple[str, ...]
    build: Callable[[Turn], list[Message]]
    ready: Callable[[Turn], bool] | None = None


VALUE_BOUND = KEYS["value-bound"].default  # the run's value bound at its default (core/bounds.py)

ATTACKS: dict[str, Attack] = {
    "forged y=1e308": Attack(("weight",), _each(y=1e308)),
    "forged y=1e9": Attack(("weight",), _each(y=1e9)),
    "forged y=1e-300": Attack(("weight",), _each(y=1e-300)),
    "wrong mixing share a=0.9": Attack(("weight",), _each(a=0.9)),
    "re-stamped replay": Attack(
        ("weight",),
        lambda t: [_reply(t, frames=[(d, _re(m, round=t.rnd)) for d, m in t.sent[_replayable(t)]])],
        lambda t: _replayable(t) is not None,
    ),
    "resent group twice": Attack(
        ("size", "round"), lambda t: [_reply(t, resent=t.resent + t.resent)], lambda t: bool(t.resent)
    ),
    "flood of empty resent groups": Attack(("size",), lambda t: [_reply(t, out={"resent": b"\x00" * 1_000_000})]),
    "false rejection claims": Attack(
        ("weight",), lambda t: [_reply(t, rejected=range(t.handed))], lambda t: t.handed > 0 and t.absorbed > 0
    ),
    "forged sender": Attack(("sender",), _each(sender=lambda t: _stranger(t))),
    "wrong destination": Attack(("destinations",), _first(lambda t, d, m: (_stranger(t), m))),
    "NaN quantization scale": Attack(
        ("message",), _each(payload=lambda t: replace(decode(t.frames[0][1]).payload, scale=float("nan")))
    ),
    "y=inf": Attack(("message",), _each(y=float("inf"))),
    # finite but huge values (the run's value bound, core/bounds.py): once the receivers' models overflowed
    "huge values 1e30": Attack(
        ("bound",), _each(payload=lambda t: replace(decode(t.frames[0][1]).payload, scale=1e30))
    ),
    "huge values 3e38": Attack(
        ("bound",), _each(payload=lambda t: replace(decode(t.frames[0][1]).payload, scale=3e38))
    ),
    "oversized frame": Attack(("size",), _first(lambda t, d, m: (d, b"SP" * 50_000))),
    "dense payload": Attack(
        ("size",), _each(payload=lambda t: Identity()(torch.ones(decode(t.frames[0][1]).payload.dim)))
    ),
    "garbage message": Attack(("message",), _first(lambda t, d, m: (d, b"\x01" * 30))),
    "wrong round": Attack(("round",), _each(round=lambda t: t.rnd + 3)),
    "malformed record": Attack(("schema",), lambda t: [_reply(t, out={"frames": "abc"})]),
    "missing field": Attack(("schema",), lambda t: [_reply(t, out={"rejected": None})]),
    "second reply": Attack(("unexpected",), lambda t: [_reply(t), _reply(t, frames=[])]),
}


# --------------------------------------------------------------------------- the campaign


@dataclass
class Config:
    nodes: int = 10
    hostile: tuple[int, ...] = (3, 7)
    dim: int = 64
    compressor: str = "topk:0.25+q:4"
    gamma: float = 0.5
    drop: float = 0.1
    link_down: float = 0.05
    down_span: int = 5
    churn: float = 0.1
    crash: float = 0.04  # a node's worker dies before it saves its round: no reply
    lost: float = 0.06  # a node did its round, its reply is lost or comes after the round timeout
    attack: float = 0.6  # a hostile node's reply is an attack
    seed: int = 0
    ledger: bool = True  # the relay keeps the weight ledger (False: only to show that the checks catch its absence)

    def quiet(self) -> Config:
        """The same run with no fault at all (the reference)."""
        return replace(self, drop=0.0, link_down=0.0, churn=0.0, crash=0.0, lost=0.0, attack=0.0)


def graph_of(n: int, seed: int) -> list[list[int]]:
    """A ring plus up to two seeded extra out-neighbours per node: strongly connected, irregular (so the push-sum
    weights move, and an old message's weight differs from a new one's)."""
    rng = np.random.default_rng([seed, 17])
    outs = []
    for i in range(n):
        extra = [int(j) for j in rng.choice(n, size=3, replace=False) if j not in (i, (i + 1) % n)]
        outs.append(sorted({(i + 1) % n, *extra[: int(rng.integers(0, 3))]}))
    return outs


@contextlib.contextmanager
def flower_task():
    """Flower builds Messages only inside a task, whose identity Flower sets (the routing does not depend on it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _y(frames: protocol.Frames) -> float:
    return sum(decode(d).y for _, d in frames)


@dataclass
class Node:
    """A node as the ClientApp keeps it: push-sum state, the last round it finished, unacknowledged outboxes."""

    state: object
    done: int = -1
    pending: dict[int, protocol.Frames] = field(default_factory=dict)
    sent: dict[int, protocol.Frames] = field(default_factory=dict)


class Campaign:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        n = cfg.nodes
        self.outs = graph_of(n, cfg.seed)
        self.rule = PushSum(make_compressor(cfg.compressor), cfg.gamma, "ref")
        net = Network(drop=cfg.drop, link_down=cfg.link_down, down_span=cfg.down_span, churn=cfg.churn, seed=cfg.seed)
        self.s = RoutingStrategy(
            n,
            checks=ReplyChecks(
                graph=Graph.static(self.outs),
                dim=cfg.dim,
                form=self.rule.form,
                max_message_bytes=message_size_limit(self.rule.compressor, cfg.dim, torch.float64),
                gamma=cfg.gamma if cfg.ledger else None,
                value_bound=VALUE_BOUND,
            ),
            network=net,
        )
        self.s.node_to_part = {100 + p: p for p in range(n)}
        self.s.part_to_node = {p: 100 + p for p in range(n)}
        x0 = torch.randn(n, cfg.dim, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)
        self.average = x0.mean(0)
        self.nodes = [Node(self.rule.init_state(x0[p])) for p in range(n)]
        self.server_round = 0
        self.faults: Counter = Counter()  # injected, by kind
        self.refused: Counter = Counter()  # replies refused, by kind
        self.max_mass_error = 0.0
        self.honest_rejections = 0

    # -- a node's turn -------------------------------------------------------------------------------------------

    def turn(self, p: int, msg: Message) -> Turn:
        """Node ``p`` does its round as the ClientApp does (node_handlers.py) and keeps it; returns its turn."""
        node, order = self.nodes[p], protocol.read_train(msg.content)
        node.pending = {r: f for r, f in node.pending.items() if r > order.acked}
        handed = [(r, f) for r, frames in [*order.redo, (order.round, order.inbox)] for f in frames]
        keep = [i for i, (r, _) in enumerate(handed) if r > node.done]
        bounced = [
            f for r, frames in [*order.redo_bounced, (order.round, order.bounced)] if r > node.done for f in frames
        ]
        for dest, data in bounced:
            self.rule.bounce(node.state, dest, data)
        y0 = node.state.y
        rejected = self.rule.receive(node.state, [handed[i][1] for i in keep])
        self.honest_rejections += len(rejected)
        absorbed = node.state.y - y0
        resent = sorted(node.pending.items())
        frames = sorted(self.rule.send(node.state, p, self.outs[p], order.round).items())
        t = Turn(msg, order.round, frames, resent, len(handed), absorbed, dict(node.sent), self.cfg.nodes, self.outs[p])
        node.done, node.pending[order.round], node.sent[order.round] = order.round, frames, frames
        node.sent.pop(order.round - KEEP, None)  # (a replay of the last KEEP rounds is enough)
        return t

    def pick(self, rng: np.random.Generator, t: Turn) -> str | None:
        """The attack for this reply: one of the ready ones injected least often so far (seeded tie-break)."""
        ready = [a for a, at in ATTACKS.items() if at.ready is None or at.ready(t)]
        least = min(self.faults[a] for a in ready)
        return str(rng.choice([a for a in ready if self.faults[a] == least]))

    # -- a round -------------------------------------------------------------------------------------------------

    def play(self) -> None:
        cfg = self.cfg
        self.server_round += 1
        rnd = self.server_round - 1
        rng = np.random.default_rng([cfg.seed, rnd, 5])
        dropped0, refused0 = self.s.router.dropped, len(self.s.guard.rejected_replies)
        with flower_task():
            msgs = self.s.configure_train(self.server_round, ArrayRecord(), ConfigRecord(), grid=None)
            train = {self.s.node_to_part[m.metadata.dst_node_id]: m for m in msgs}
            self.faults["node offline (churn)"] += cfg.nodes - len(train)
            replies, attacks, silent = [], {}, set()
            for p in sorted(train):
                u = rng.random()
                if u < cfg.crash:  # the worker dies before it saves: nothing of the round happened
                    self.faults["worker crash"] += 1
                    silent.add(p)
                    continue
                t = self.turn(p, train[p])
                if u < cfg.crash + cfg.lost:
                    self.faults["reply lost or late"] += 1
                    silent.add(p)
                elif p in cfg.hostile and rng.random() < cfg.attack:
                    a = self.pick(rng, t)
                    self.faults[a] += 1
                    attacks[p] = a
                    replies += ATTACKS[a].build(t)
                else:
                    replies.append(_reply(t))
            if len(silent) + len(attacks) == len(train):  # (the relay stops a round with no good reply at all)
                raise RuntimeError(f"round {rnd}: the schedule left no good reply")
            self.s.aggregate_train(self.server_round, replies)
        self.faults["message dropped (drop, link down)"] += self.s.router.dropped - dropped0
        self.check(rnd, attacks, silent, self.s.guard.rejected_replies[refused0:])

    # -- the checks after every round ----------------------------------------------------------------------------

    def mass(self) -> tuple[float, float]:
        """(total mass from the nodes' side, largest disagreement between a node and the relay's weight ledger).

        A node holds its ``y``, its unacknowledged outboxes and what it was handed and has not absorbed; by the
        relay it holds the ledger's weight at its last good reply plus everything handed since."""
        s, w = self.s, self.s.guard.weights
        total, gap = s.router.in_transit_mass(), 0.0
        for p, node in enumerate(self.nodes):
            batches = s.ledger.unacked[p]
            unabsorbed = sum(_y(i) + _y(b) for r, i, b in batches if r > node.done)
            mine = node.state.y + sum(_y(f) for r, f in node.pending.items() if r > s.ledger.acked[p]) + unabsorbed
            total += mine
            if w is not None:
                gap = max(gap, abs(mine - w.y[p] - sum(_y(i) + _y(b) for _, i, b in batches)))
        return total, gap

    def check(self, rnd: int, attacks: dict[int, str], silent: set[int], refusals: list[dict]) -> None:
        n, g = self.cfg.nodes, self.s.guard
        total, gap = self.mass()
        err = max(abs(total - n), gap)
        self.max_mass_error = max(self.max_mass_error, err)
        assert err <= TOL, f"round {rnd}: mass {total!r} of {n}, node vs ledger {gap!r}"
        assert self.honest_rejections == 0 and self.s.messages_rejected == 0, f"round {rnd}: a receiver rejected"
        got = {}
        for r in refusals:
            assert r["node"] in attacks, f"round {rnd}: an honest or quiet node refused: {r}"
            assert r["kind"] in ATTACKS[attacks[r["node"]]].kinds, f"round {rnd}: {attacks[r['node']]} drew {r}"
            got[r["node"]] = r["kind"]
            self.refused[r["kind"]] += 1
        assert set(got) == set(attacks), f"round {rnd}: attacks {attacks} not all refused: {refusals}"
        assert {e["node"] for e in g.excluded} <= set(self.cfg.hostile)
        late = {e["node"]: e["reason"] for e in self.s.ledger.stragglers if e["round"] == self.server_round}
        expected = {p: "no reply" for p in silent} | {
            p: "rejected reply" for p, a in attacks.items() if a != "second reply"
        }
        assert set(late) == set(expected) and all(late[p].startswith(expected[p]) for p in late), (rnd, late, expected)

    # -- figures ------------------------------------------------------------------------------------------------

    def consensus_error(self) -> float:
        """Largest relative distance of an honest node's de-biased model from the average of all initial vectors."""
        honest = [p for p in range(self.cfg.nodes) if p not in self.cfg.hostile]
        z = [self.nodes[p].state.x / self.nodes[p].state.y for p in honest]
        return float(max(torch.linalg.norm(v - self.average) for v in z) / torch.linalg.norm(self.average))


def run(cfg: Config, rounds: int, reference: bool = True) -> dict:
    """The campaign for ``rounds`` rounds (every round checked), and its figures; with ``reference``, the same run
    without faults for comparison."""
    t0 = time.perf_counter()
    c = Campaign(cfg)
    for _ in range(rounds):
        c.play()
    out = {
        "rounds": rounds,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
        "graph": c.outs,
        "faults_injected": dict(sorted(c.faults.items())),
        "honest_faults": sum(v for k, v in c.faults.items() if k not in ATTACKS),
        "hostile_replies": sum(c.faults[k] for k in ATTACKS),
        "replies_refused_by_kind": dict(sorted(c.refused.items())),
        "replies_refused": sum(c.refused.values()),
        "refused_by_node": {str(k): v for k, v in sorted(c.s.guard.offences.items())},
        "honest_nodes_refused": sum(v for k, v in c.s.guard.offences.items() if k not in cfg.hostile),
        "honest_receiver_rejections": c.honest_rejections,
        "nodes_excluded": [e["node"] for e in c.s.guard.excluded],
        "max_mass_error": c.max_mass_error,
        "consensus_error": c.consensus_error(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out["injected"] = out["honest_faults"] + out["hostile_replies"]
    if reference:
        q = Campaign(cfg.quiet())
        for _ in range(rounds):
            q.play()
        out["consensus_error_fault_free"] = q.consensus_error()
    return out


def markdown(r: dict, command: str) -> str:
    lines = [
        f"# Fault campaign: {r['rounds']} rounds, {r['config']['nodes']} nodes, hostile {r['config']['hostile']}",
        "",
        f"Command: `{command}`",
        "",
        f"{r['injected']} faults injected ({r['honest_faults']} honest, {r['hostile_replies']} hostile replies); "
        f"{r['replies_refused']} replies refused, all charged to the hostile nodes; honest nodes refused: 0; "
        f"excluded: {r['nodes_excluded'] or 'none'}; max mass error {r['max_mass_error']:.1e} (checked every round).",
        "",
        "| fault | injected | refused as |",
        "|---|---|---|",
    ]
    faults = r["faults_injected"]
    for k in [*(k for k in faults if k not in ATTACKS), *(k for k in ATTACKS if k in faults)]:
        lines.append(f"| {k} | {faults[k]} | {' or '.join(ATTACKS[k].kinds) if k in ATTACKS else '(honest: never)'} |")
    lines += ["", "| kind refused | replies |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["replies_refused_by_kind"].items()]
    lines += [
        "",
        f"Consensus error of the honest nodes (relative, to the average of all initial vectors): "
        f"{r['consensus_error']:.2e}",
    ]
    if "consensus_error_fault_free" in r:
        lines[-1] += f"; the same run without faults: {r['consensus_error_fault_free']:.2e}"
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--out", default="results/campaign")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = run(Config(nodes=a.nodes, seed=a.seed), a.rounds)
    command = f"python -m flower_sparsepush.simulations.campaign --rounds {a.rounds} --seed {a.seed} --nodes {a.nodes}"
    command += f" --out {a.out}"
    r["command"] = command
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "campaign.json").write_text(json.dumps(r, indent=1) + "\n")
    (out / "campaign.md").write_text(markdown(r, command))
    print(markdown(r, command))


if __name__ == "__main__":
    main()
