"""What every push-sum strategy shares: node registration, sampling, traffic counting and the typed report the
ServerApp reads (instead of the strategy's attributes).

- Registration: wait until the run's nodes are connected, then ask each for its partition id (one query message).
  A node that answers badly (an error, no ``info``, an id out of range, an id another node claims too) is left out
  and reported, never stops the run; the run starts when more than half of the partitions have a node
  (:func:`quorum`), the others are absent for the whole run. A node id that appears later (a SuperNode that
  restarted and reconnected) is asked too, and takes over its partition (:meth:`PushSumStrategy.refresh`).
- Sampling: :meth:`PushSumStrategy.sample` is Flower's rule (``int(fraction * n)``, at least ``minimum``), seeded.
- Traffic: ``bits_sent`` / ``bits_received`` per node, 8 x the bytes of every peer-to-peer message.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from flower_sparsepush.flower import protocol


def query_partitions(grid: Grid, node_ids: list[int], timeout: float) -> dict[int, int | str]:
    """Ask each node for its partition id: ``{node_id: partition_id}``, or ``{node_id: reason}`` (a string) for a
    node that answered with an error, without ``info`` or without a whole-number ``partition-id``. Nodes that do not
    answer within ``timeout`` are absent from the result."""
    msgs = [
        Message(
            RecordDict({"q": ConfigRecord({"what": "partition-id"})}), dst_node_id=nid, message_type=MessageType.QUERY
        )
        for nid in node_ids
    ]
    claims: dict[int, int | str] = {}
    for r in grid.send_and_receive(msgs, timeout=timeout):
        nid = r.metadata.src_node_id
        if r.has_error():
            claims[nid] = f"answered the partition query with an error ({r.error.reason})"
            continue
        try:
            p = r.content[protocol.INFO]["partition-id"]
        except (KeyError, TypeError, AttributeError):
            claims[nid] = f"its answer has no {protocol.INFO}.partition-id"
            continue
        ok = isinstance(p, int) and not isinstance(p, bool)
        claims[nid] = p if ok else f"its partition-id {p!r} is not a whole number"
    return claims


def quorum(num_nodes: int) -> int:
    """How many partitions must be held by a node for a run to start: more than half of them. A minority of broken
    or hostile nodes cannot stop a run; a run that lost half of its nodes at the start does not pretend to be the
    run that was asked for."""
    return num_nodes // 2 + 1


@dataclass
class Registration:
    """Who holds which partition, and the nodes left out with the reason (``{"node", "reason"}``)."""

    node_to_part: dict[int, int]
    left_out: list[dict] = field(default_factory=list)

    def missing(self, num_nodes: int) -> list[int]:
        """The partitions no node holds."""
        return sorted(set(range(num_nodes)) - set(self.node_to_part.values()))


def resolve_claims(claims: dict[int, int | str], node_ids: list[int], num_nodes: int) -> Registration:
    """The partitions of the nodes that answered with a valid, uncontested id in ``0..num_nodes-1``. Left out (with
    the reason): nodes that did not answer, answered badly (a string in ``claims``), claimed an id out of range,
    or claimed the same id as another node. Two nodes with one id cannot both be right and the relay cannot tell
    which is, so both are left out: a node that lies about its id loses its own partition and at most one other."""
    left, valid = [], {}
    for nid in node_ids:
        c = claims.get(nid, "did not answer the partition query")
        if isinstance(c, str):
            left.append({"node": nid, "reason": c})
        elif not 0 <= c < num_nodes:
            left.append({"node": nid, "reason": f"claimed partition {c}, outside 0..{num_nodes - 1}"})
        else:
            valid[nid] = c
    holders: dict[int, list[int]] = {}
    for nid, p in valid.items():
        holders.setdefault(p, []).append(nid)
    mapping = {}
    for p, nids in sorted(holders.items()):
        if len(nids) == 1:
            mapping[nids[0]] = p
            continue
        for nid in nids:
            left.append({"node": nid, "reason": f"claimed partition {p}, as node(s) {sorted(set(nids) - {nid})} did"})
    return Registration(mapping, sorted(left, key=lambda e: e["node"]))


def wait_and_register(grid: Grid, num_nodes: int, timeout: float, poll: float = 0.2) -> Registration:
    """Wait until ``num_nodes`` nodes are connected, then ask each for its partition id (:func:`resolve_claims`).
    Nodes left out are logged; the run stops only when fewer than :func:`quorum` partitions are held."""
    end = time.time() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= num_nodes:
            break
        if time.time() > end:
            raise RuntimeError(
                f"only {len(ids)} of {num_nodes} nodes connected after {timeout:.0f} s "
                "(num-nodes must equal the federation's num-supernodes)"
            )
        time.sleep(poll)
    reg = resolve_claims(query_partitions(grid, ids, timeout), ids, num_nodes)
    for e in reg.left_out:
        log(WARNING, "registration: node %s is left out of the run: %s", e["node"], e["reason"])
    if len(reg.node_to_part) < quorum(num_nodes):
        raise RuntimeError(
            f"only {len(reg.node_to_part)} of {num_nodes} partitions have a node (at least {quorum(num_nodes)} "
            f"needed); left out: {reg.left_out}"
        )
    return reg


GRID_POLL_ENV = "SPARSEPUSH_GRID_POLL"  # seconds between reply pulls on the Deployment Engine; default 0.05


class PollingGrid:
    """A Grid whose ``send_and_receive`` pulls replies every ``poll`` seconds. Flower 1.42's HttpGrid (the
    ServerApp's grid on the Deployment Engine) sleeps a fixed 3 s between pulls, which makes every message batch
    take a multiple of 3 s; everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, poll: float) -> None:
        self._grid, self.poll = grid, poll

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies: list = []
        while pending and (end is None or time.time() < end):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self.poll)
        return replies


def polling_grid(grid: Grid) -> Grid:
    """``grid`` with a short reply poll where Flower's is slow (HttpGrid); the in-memory grid of a simulation as is."""
    if type(grid).__name__ != "HttpGrid" or isinstance(grid, PollingGrid):
        return grid
    return PollingGrid(grid, float(os.environ.get(GRID_POLL_ENV, "0.05")))  # type: ignore[return-value]


@dataclass
class EvalReport:
    """The nodes' reports of one evaluation round."""

    round: int
    zbar: Any  # np.ndarray, the consensus model mean_i z_i (a measurement; no node is sent it)
    z_nodes: dict[int, Any]
    y_by_node: dict[int, float]
    acc_node_mean: float
    acc_node_min: float
    consensus_distance: float
    y_nodes: float  # weight held by the nodes
    y_pending: float  # weight in outboxes the nodes keep until the relay acknowledges them
    y_mailboxes: float  # weight in messages the relay holds (undelivered, bounced, handed but not absorbed)
    num_evaluated: int
    val_acc_node_mean: float = float("nan")  # on the validation split (NaN: none held out)
    val_acc_node_min: float = float("nan")


def eval_report(
    server_round: int,
    z_by_node: dict[int, Any],
    y_by_node: dict[int, float],
    acc_by_node: dict[int, float],
    y_pending: float,
    y_mailboxes: float,
    val_acc_by_node: dict[int, float] | None = None,
) -> EvalReport:
    """The consensus measurements of one evaluation round from every reporting node's de-biased model, weight and
    accuracy (NaN where the node reports none): the routing and the drop-in strategies both build theirs here."""
    import numpy as np

    parts = sorted(z_by_node)
    zs = np.stack([np.asarray(z_by_node[p], dtype=np.float64) for p in parts])
    zbar = zs.mean(0)
    accs = [acc_by_node.get(p, float("nan")) for p in parts]
    val_accs = [(val_acc_by_node or {}).get(p, float("nan")) for p in parts]
    return EvalReport(
        round=server_round,
        zbar=zbar.astype(np.float32),
        z_nodes={p: zs[k].astype(np.float32) for k, p in enumerate(parts)},
        y_by_node={p: float(y_by_node[p]) for p in parts},
        acc_node_mean=float(np.mean(accs)),
        acc_node_min=float(np.min(accs)),
        consensus_distance=float(np.mean(((zs - zbar) ** 2).sum(1))),
        y_nodes=float(sum(y_by_node[p] for p in parts)),
        y_pending=float(y_pending),
        y_mailboxes=float(y_mailboxes),
        num_evaluated=len(parts),
        val_acc_node_mean=float(np.mean(val_accs)),
        val_acc_node_min=float(np.min(val_accs)),
    )


@dataclass
class Report:
    """What a push-sum strategy tells the ServerApp about its run so far."""

    bits_sent: list[int]
    bits_received: list[int]
    last_eval: EvalReport | None = None
    messages_dropped: int = 0
    messages_rejected: int = 0
    rejected_messages: list[str] = field(default_factory=list)
    rejected_replies: list = field(default_factory=list)
    replies_rejected_by_node: dict = field(default_factory=dict)
    messages_rejected_by_sender: dict = field(default_factory=dict)
    messages_bounced_after_rejection: int = 0
    excluded_nodes: list = field(default_factory=list)
    straggler_events: list = field(default_factory=list)
    nodes_not_returned: list = field(default_factory=list)
    eval_failures: list = field(default_factory=list)
    messages_resent: int = 0
    weight_corrections: list = field(default_factory=list)  # reported weights the relay's weight ledger overruled
    reconnected_nodes: list = field(default_factory=list)
    mailbox_messages: int = 0
    mailbox_bits: int = 0
    registration_left_out: list = field(default_factory=list)  # {"node", "reason"} (base.resolve_claims)
    missing_partitions: list = field(default_factory=list)  # partitions no node held at registration


class PushSumStrategy(Strategy):
    """Registration, sampling and traffic counters of the push-sum strategies (routing.py, dropin.py)."""

    def __init__(self, num_nodes: int, sample_seed: int = 0, register_timeout: float = 120.0) -> None:
        self.num_nodes = num_nodes
        self.register_timeout = register_timeout
        self._rng = random.Random(sample_seed)
        self.node_to_part: dict[int, int] = {}
        self.part_to_node: dict[int, int] = {}
        self.bits_sent = [0] * num_nodes
        self.bits_received = [0] * num_nodes
        self.reconnected: list[dict] = []  # {"partition", "old", "new"} per SuperNode that came back
        self.left_out: list[dict] = []  # {"node", "reason"}: nodes left out at registration (never asked again)
        self.missing_partitions: list[int] = []  # partitions no node holds: excluded from the start

    def start(self, grid: Grid, *args, **kwargs):
        return super().start(polling_grid(grid), *args, **kwargs)

    def register(self, grid: Grid) -> None:
        """First query round: learn node id -> partition id, after waiting for every node to connect."""
        if not self.node_to_part:
            reg = wait_and_register(grid, self.num_nodes, self.register_timeout)
            self.node_to_part, self.left_out = reg.node_to_part, reg.left_out
            self.part_to_node = {p: nid for nid, p in self.node_to_part.items()}
            self.missing_partitions = reg.missing(self.num_nodes)
            for p in self.missing_partitions:
                self.leave_out(p)

    def leave_out(self, partition: int) -> None:
        """A partition no node holds at registration: the strategy treats it as absent for the whole run."""

    def refresh(self, grid: Grid, server_round: int) -> None:
        """Register node ids that connected since: a restarted SuperNode takes over its partition."""
        refused = {e["node"] for e in self.left_out}
        new = [nid for nid in grid.get_node_ids() if nid not in self.node_to_part and nid not in refused]
        if not new:
            return
        # a node that connected but cannot answer yet (or died again) is asked again at the next round
        for nid, p in query_partitions(grid, sorted(new), self.register_timeout).items():
            if isinstance(p, str):
                log(WARNING, "node %s did not register: %s", nid, p)
                continue
            if not 0 <= p < self.num_nodes or p in self.missing_partitions:
                continue
            old = self.part_to_node.get(p)
            self.node_to_part.pop(old, None)
            self.node_to_part[nid] = p
            self.part_to_node[p] = nid
            self.reconnected.append({"round": server_round, "partition": p, "old": old, "new": nid})

    def sample(self, fraction: float, minimum: int = 1) -> list[int]:
        """Flower's rule: ``int(fraction * n)`` partitions (at least ``minimum``), seeded; all when fraction is 1."""
        parts = list(range(self.num_nodes))
        if fraction >= 1:
            return parts
        k = min(self.num_nodes, max(minimum, int(fraction * self.num_nodes)))
        return sorted(self._rng.sample(parts, k))

    def report(self) -> Report:
        raise NotImplementedError
