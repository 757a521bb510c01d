"""The in-process reference loop: every node of a run in this process, through the same node round, router and
reply checks as the Flower paths, which are tested against it. Also the in-process FedAvg loop and the command
``python -m flower_sparsepush.run.inprocess key=value ...``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flower_sparsepush.core.guard import BadReply, Guard, Outbox
from flower_sparsepush.core.merge_nodes import bounds
from flower_sparsepush.core.merge_relay import count
from flower_sparsepush.core.pushsum import NodeState
from flower_sparsepush.core.router import Router
from flower_sparsepush.learn.evaluate import consensus_metrics
from flower_sparsepush.run.checkpoint import load_checkpoint, save_checkpoint
from flower_sparsepush.run.config import ConfigError, RunConfig, validate
from flower_sparsepush.run.merging import merge_among, merge_relay, node_take
from flower_sparsepush.run.node_train import init_state, local_sgd, make_node, node_round, train_batched
from flower_sparsepush.run.preflight import preflight
from flower_sparsepush.run.results import Recorder
from flower_sparsepush.run.schedule import merge_due
from flower_sparsepush.run.setup import Setup, get_setup, make_router, reply_checks


def check_and_post(guard: Guard, node: int, rnd: int, messages: dict[int, bytes], taken=((), ())) -> int:
    """Check ``node``'s messages of round ``rnd`` as the ServerApp does and post them to the router; a refused
    outbox is recorded and nothing of it is routed. ``taken`` is the ``(inbox, bounced)`` the node took this round:
    the weight ledger (weights.py) adds it to the node's weight before it checks the shares. A refused outbox is
    lost here (the in-process loop does not resend it), so the ledger then keeps what the rule lets the node keep,
    as the node itself does. Returns the bits routed."""
    frames = sorted(messages.items())
    inbox, bounced = taken
    ledger = guard.weights
    try:
        guard.check(node, rnd, Outbox(rnd, frames), 0)
        y = guard.check_weights(node, [(rnd, frames)], [(rnd, inbox, bounced)])
    except BadReply as err:
        guard.reject(rnd + 1, node, err.kind, str(err))
        if ledger is not None:  # what an honest node keeps after sending its share to each out-neighbour
            d = len(guard.out_neighbours(rnd, node)) if guard.graph is not None else len(frames)
            ledger.commit(node, ledger.kept(rnd, ledger.absorb(ledger.y[node], bounced, inbox), d))
        return 0
    if ledger is not None:
        ledger.commit(node, y)
    guard.router.post(node, rnd, messages)
    return sum(8 * len(d) for d in messages.values())


@dataclass
class InProcessResult:
    states: list[NodeState]
    mailboxes: list[list[bytes]]
    bits_sent: list[int]
    bits_received: list[int]
    history: list[dict[str, float]]
    round_seconds: list[float]
    router: Router | None = None
    start_round: int = 0  # > 0 when the run was resumed from a checkpoint
    guard: Guard | None = None  # the relay's checks: refused outboxes, excluded nodes


def make_engine(setup: Setup):
    """The batched local-SGD engine for ``device`` (batched.BatchedSGD), or None to train node by node: on the CPU
    the per-node path is faster (vmap turns the convolutions into slow grouped ones there)."""
    if setup.cfg.device == "cpu":
        return None
    from flower_sparsepush.learn.batched import BatchedSGD, resolve_device

    dev = resolve_device(setup.cfg.device)
    return BatchedSGD(setup.model, dev) if dev.type != "cpu" else None


class _Loop:
    """The state of one in-process run between rounds: nodes, router, reply checks, counters, the merges' base."""

    def __init__(self, cfg: RunConfig, log) -> None:
        self.cfg, self.log = cfg, log
        self.setup = setup = get_setup(cfg)
        n = setup.n
        self.router = make_router(cfg)
        # the ServerApp's checks, the weight ledger among them: a bad outbox is refused here (and lost: no resend)
        self.guard = Guard(self.router, reply_checks(setup))
        self.states = [init_state(setup) for _ in range(n)]
        self.sent = [0] * n
        self.history: list[dict[str, float]] = []
        self.start = 0
        self.merges = merge_relay(setup)  # the merges' relay side: participants, owners, owed outcomes, checks
        self.engine = make_engine(setup)
        if cfg.resume:
            self.restore()

    def restore(self) -> None:
        restored = load_checkpoint(self.cfg, self.router)
        if restored is None:
            return
        self.start, self.states, self.sent, self.history, base, owner_err, merges = restored
        self.merges.load_state_dict(merges)
        # the ledger follows each node's own weight exactly (check_and_post), so the restored weights are its own
        self.guard.weights.y = [float(st.y) for st in self.states]
        for i, s in enumerate(self.states):  # a checkpoint that kept the merge base and owner errors for all nodes
            s.merge_base = base if s.merge_base is None else s.merge_base
            if owner_err is not None and s.owner_err is None:
                mine = torch.zeros_like(owner_err)
                for k, (a, b) in enumerate(bounds(self.setup.segments)):
                    if k % self.setup.n == i:
                        mine[a:b] = owner_err[a:b]
                s.owner_err = mine
        for row in self.history:
            if self.log:
                self.log(dict(row))

    def train_round(self, t: int) -> list[int]:
        """Round ``t`` of every online node (deliver, absorb, train, send through the checks); returns them."""
        setup, router, states = self.setup, self.router, self.states
        online = [i for i in range(setup.n) if router.network.online(t, i) and i not in router.excluded]
        for i in online:  # merges it missed: handed with its next message, as on Flower
            for outcome in self.merges.take_owed(i):
                count(self.merges.transfers(i, outcome), self.sent, router.delivered_bits)
                node_take(setup, states[i], i, outcome)
        boxes = {i: router.collect(i) for i in online}  # bits_received counted on delivery, as in the Flower path
        if self.engine is None:
            for i in online:
                res = node_round(setup, states[i], i, t, *boxes[i])
                if res.rejected:
                    raise RuntimeError(f"node {i} rejected a message in round {t}: {res.rejected[0]}")
                self.sent[i] += check_and_post(self.guard, i, t, res.messages, boxes[i])
            return online
        nodes = {i: make_node(setup, i, states[i]) for i in online}  # the same round, one batched local SGD call
        for i in online:
            rejected = nodes[i].begin(t, *boxes[i])
            if rejected:
                raise RuntimeError(f"node {i} rejected a message in round {t}: {rejected[0]}")
        train_batched(setup, self.engine, [states[i] for i in online], online, t)
        for i in online:
            self.sent[i] += check_and_post(self.guard, i, t, nodes[i].finish(t), boxes[i])
        return online

    def merge(self, t: int, online: list[int]) -> None:
        """The global merge after round ``t`` among the ``online`` nodes, as the Flower relay runs it: every
        participant takes what is in flight to it and hands in its contribution, the owners average their segments,
        every participant takes the averages; the nodes offline now are owed the outcome (docs/algorithm.md)."""
        setup, states, merges = self.setup, self.states, self.merges
        received = self.router.delivered_bits

        ledger = self.guard.weights

        def absorb(i: int) -> None:
            inbox, bounced = self.router.collect(i)
            make_node(setup, i, states[i]).begin(t + 1, inbox, bounced)
            ledger.commit(i, ledger.absorb(ledger.y[i], bounced, inbox))

        outcome = merge_among(setup, states, online, t, merges, absorb, self.sent, received)
        if outcome.averages is not None:  # every participant now holds their mean weight
            ledger.merged(outcome.participants, merges.mean_weight())
        for i in range(setup.n):
            if i not in online and i not in self.router.excluded:
                merges.owe(i, outcome)
        shared = states[online[0]].merge_base if online else None
        for i in online:  # one tensor for the equal bases (memory of large runs)
            states[i].merge_base = shared

    def evaluate(self, t: int, online: list[int]) -> None:
        cfg, router = self.cfg, self.router
        m = consensus_metrics(self.setup, [s.z for s in self.states], cfg.eval_node_samples, self.engine)
        m.update(
            round=t + 1,
            epoch=round(self.setup.epoch(min(t + 1, cfg.num_rounds)), 4),
            bits_sent_per_node=float(np.mean(self.sent)),
            bits_received_per_node=float(np.mean(router.delivered_bits)),
            messages_dropped=router.dropped,
            nodes_online=len(online),
            y_nodes=float(sum(s.y for s in self.states)),
            y_in_transit=router.in_transit_mass(),
        )
        self.history.append(m)
        if self.log:
            self.log(m)

    def checkpoint(self, done: int) -> None:
        save_checkpoint(self.cfg, done, self.states, self.router, self.sent, self.history, self.merges.state_dict())


def run_inprocess(
    cfg: RunConfig, num_rounds: int | None = None, eval_every: int | None = None, log=None
) -> InProcessResult:
    """The reference loop: the same :func:`node_round` for all nodes of a validated config, in this process.

    Each round, in the order of consensus.py: the online nodes (``churn``) collect their mailbox and bounced
    messages from the router, take the bounced mass back, absorb the inbox, train and send; the router decides which
    messages arrive (``drop``, ``link-down``; router.py). Offline nodes do nothing; their mail waits.
    With ``checkpoint-every`` N > 0 the loop writes ``<out-dir>/<run-name>/checkpoint.pt`` every N rounds; with
    ``resume`` it continues from that file (restored metrics rows are passed to ``log`` again).
    """
    if cfg.strategy == "fedavg":
        return run_fedavg_inprocess(cfg, num_rounds, eval_every, log)
    loop = _Loop(cfg, log)
    rounds = cfg.num_rounds + cfg.final_gossip_rounds if num_rounds is None else num_rounds
    secs: list[float] = []
    for t in range(loop.start, rounds):
        t0 = time.perf_counter()
        online = loop.train_round(t)
        if merge_due(cfg, t + 1, rounds):
            loop.merge(t, online)
        secs.append(time.perf_counter() - t0)
        if eval_every and ((t + 1) % eval_every == 0 or t + 1 == rounds):
            loop.evaluate(t, online)
        if cfg.checkpoint_every and (t + 1) % cfg.checkpoint_every == 0:
            loop.checkpoint(t + 1)
    router = loop.router
    mailboxes = [[d for _, _, d in box] for box in router.mailboxes]
    return InProcessResult(
        loop.states,
        mailboxes,
        loop.sent,
        list(router.delivered_bits),
        loop.history,
        secs,
        router,
        loop.start,
        loop.guard,
    )


def train_inprocess(raw_cfg: dict[str, Any] | RunConfig, echo=print) -> dict[str, Any]:
    """Validate, check, run the in-process loop and write the run's results folder (as the ServerApp does)."""
    cfg = validate(raw_cfg)
    preflight(cfg)
    rec = Recorder(cfg, echo=echo)
    res = run_inprocess(cfg, eval_every=cfg.eval_every, log=rec.log)
    if cfg.save_nodes:  # every node's own de-biased model, as the ServerApp writes it
        np.savez(rec.dir / "nodes.npz", **{f"z{i}": s.z.detach().cpu().numpy() for i, s in enumerate(res.states)})
    y_transit = res.router.in_transit_mass() if res.router is not None else 0.0
    return rec.finish(
        {
            "engine": "inprocess",
            "resumed_from_round": res.start_round,
            "bits_sent_per_node": float(np.mean(res.bits_sent)),
            "bits_received_per_node": float(np.mean(res.bits_received)),
            "bits_sent_by_node": list(map(int, res.bits_sent)),
            "bits_received_by_node": list(map(int, res.bits_received)),
            "num_params": int(res.states[0].x.numel()),
            "mass": {"y_nodes": float(sum(s.y for s in res.states)), "y_in_transit": y_transit, "n": cfg.num_nodes},
            "messages_dropped": res.router.dropped if res.router is not None else 0,
        }
    )


def run_fedavg_inprocess(
    cfg: RunConfig, num_rounds: int | None = None, eval_every: int | None = None, log=None
) -> InProcessResult:
    """FedAvg on the same local training code: every round all nodes start from the global model, take
    ``local-steps`` steps (keeping their own momentum buffers, as the ClientApp does) and the server averages the
    results weighted by shard size. Bits: the dense float32 model each way per node per round, as CountingFedAvg."""
    setup = get_setup(cfg)
    n = setup.n
    rounds = cfg.num_rounds if num_rounds is None else num_rounds
    sizes = torch.tensor([len(y) for _, y in setup.shards], dtype=torch.float64)
    weights = (sizes / sizes.sum()).tolist()
    w = setup.x0.clone()
    moms: list[torch.Tensor | None] = [None] * n
    dense_bits = 32 * w.numel()
    sent, recv = [0] * n, [0] * n
    history, secs = [], []
    for t in range(rounds):
        t0 = time.perf_counter()
        acc = torch.zeros_like(w, dtype=torch.float64)
        for i in range(n):
            z_new, moms[i], _ = local_sgd(setup, w, moms[i], i, t)
            acc.add_(z_new.to(torch.float64), alpha=weights[i])
            sent[i] += dense_bits
            recv[i] += dense_bits
        w = acc.to(torch.float32)
        secs.append(time.perf_counter() - t0)
        if eval_every and ((t + 1) % eval_every == 0 or t + 1 == rounds):
            m = consensus_metrics(setup, [w], 0)  # one global model: node mean = min = consensus
            m.update(
                round=t + 1,
                epoch=round(setup.epoch(t + 1), 4),
                bits_sent_per_node=float(np.mean(sent)),
                bits_received_per_node=float(np.mean(recv)),
            )
            history.append(m)
            if log:
                log(m)
    states = [NodeState(x=w.clone(), y=1.0) for _ in range(n)]
    return InProcessResult(states, [[] for _ in range(n)], sent, recv, history, secs)


def main(argv: list[str] | None = None) -> int:
    """``python -m flower_sparsepush.run.inprocess key=value ...``: one in-process run with results, checkpoints, resume."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in args):
        from flower_sparsepush.run.keyhelp import keys_text

        print(
            "usage: python -m flower_sparsepush.run.inprocess [key=value ...] [--resume]\n\n"
            "One run of the in-process loop (the reference the Flower path is tested against). Results, checkpoints\n"
            "and status.json (rounds done, elapsed, ETA) go to <out-dir>/<run-name>/. Keys not given keep the\n"
            "default shown; bad keys or values stop the run with one line (docs/config.md).\n\n"
            f"run-config keys (key=default  meaning):\n{keys_text()}"
        )
        return 0
    raw = {}
    for a in args:
        k, eq, v = a.lstrip("-").partition("=")
        if not eq:
            if k == "resume":  # --resume alone
                raw["resume"] = True
                continue
            print(f"error: expected key=value, got {a!r} (see --help for the keys)", file=sys.stderr)
            return 2
        raw[k] = v
    try:
        summary = train_inprocess(validate(raw, explicit=True))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {summary['run_name']}  final acc {summary['final'].get('acc_consensus')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
