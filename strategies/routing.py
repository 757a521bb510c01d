"""Routing strategies: the ServerApp forwards push-sum messages between nodes and never averages models.

Flower has no node-to-node channel, so a message from node i to node j travels ClientApp(i) -> SuperLink ->
ServerApp -> SuperLink -> ClientApp(j). The strategy keeps a :class:`flower_sparsepush.router.Router` (one mailbox
per node, the network model of router.py: dropped messages bounce to their sender, offline nodes' mail waits); what
a node sends in round t is delivered (packed into that node's single train message: one message per node per round)
in round t+1, or later if the receiver is offline, or bounced back if the link drops it. The bits
counted are the peer-to-peer payloads: 8 x the length of every encoded push-sum message, charged to its sender
when routed and to its receiver when delivered. Flower's own envelopes (protobuf, headers) are not counted.

Wire format between ClientApp and ServerApp (both directions one ``bytes`` entry in a ConfigRecord):
``pack_frames([(peer, bytes), ...])`` = repeated ``<uint32 peer><uint32 length><payload>``; ``peer`` is the
destination partition id on the way out and the sender partition id on the way in. The train message also carries
``inbox.bounced``: the node's own messages that the network bounced, as (destination, bytes) frames; the node takes
their mass back (``PushSum.bounce``) before it absorbs its inbox.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from flower_sparsepush.codec import decode
from flower_sparsepush.router import Network, Router

_FRAME = struct.Struct("<II")


def pack_frames(frames: list[tuple[int, bytes]]) -> bytes:
    """``[(peer, payload)]`` -> one buffer."""
    return b"".join(_FRAME.pack(p, len(d)) + d for p, d in frames)


def unpack_frames(buf: bytes) -> list[tuple[int, bytes]]:
    """Inverse of :func:`pack_frames`; raises ValueError on a truncated buffer."""
    out, pos, mv = [], 0, memoryview(buf)
    while pos < len(buf):
        if pos + _FRAME.size > len(buf):
            raise ValueError("truncated frame header")
        peer, n = _FRAME.unpack_from(buf, pos)
        pos += _FRAME.size
        if pos + n > len(buf):
            raise ValueError("truncated frame payload")
        out.append((peer, bytes(mv[pos : pos + n])))
        pos += n
    return out


def wait_and_register(grid: Grid, num_nodes: int, timeout: float, poll: float = 0.2) -> dict[int, int]:
    """Wait until ``num_nodes`` nodes are connected, then ask each for its partition id: {node_id: partition_id}."""
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
    msgs = [
        Message(
            RecordDict({"q": ConfigRecord({"what": "partition-id"})}), dst_node_id=nid, message_type=MessageType.QUERY
        )
        for nid in ids
    ]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    mapping = {}
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"node {r.metadata.src_node_id} failed the registration query: {r.error.reason}")
        mapping[r.metadata.src_node_id] = int(r.content["info"]["partition-id"])
    parts = sorted(mapping.values())
    if parts != list(range(num_nodes)):
        raise RuntimeError(f"expected partition ids 0..{num_nodes - 1}, nodes reported {parts}")
    return mapping


class _Router(Strategy):
    """Shared mailbox routing of :class:`SGP` and :class:`SparsePush` (see their docstrings)."""

    label = "router"

    def __init__(
        self,
        num_nodes: int,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        eval_every: int = 1,
        register_timeout: float = 120.0,
        sample_seed: int = 0,
        network: Network | None = None,
        bounce: bool = True,
    ) -> None:
        if num_nodes < 2:
            raise ValueError(f"num_nodes must be >= 2, got {num_nodes}")
        for name, v in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        self.num_nodes = num_nodes
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.eval_every = eval_every
        self.register_timeout = register_timeout
        self._rng = random.Random(sample_seed)
        self.node_to_part: dict[int, int] = {}
        self.part_to_node: dict[int, int] = {}
        self.router = Router(num_nodes, network or Network(), bounce=bounce)
        self.bits_sent = [0] * num_nodes
        self.bits_received = [0] * num_nodes
        self.num_rounds = 0
        self.last_eval: dict | None = None
        self.rejected: list[str] = []
        self.messages_rejected = 0
        self.awaiting: dict[int, int] = {}  # partition -> round of the train message it has not answered yet
        self.stragglers: list[dict] = []  # {"round", "node", "reason", "y_inbox"} per reply that never came
        self.last_seen: dict[int, int] = {}  # partition -> last server round it answered a train message
        self.eval_failures: list[dict] = []
        self._pending: dict[int, list[bytes]] = {}  # partition -> messages delivered in its unanswered train message

    # -- helpers ---------------------------------------------------------------------------------------------------

    def register(self, grid: Grid) -> None:
        """First query round: learn node id -> partition id, after waiting for every node to connect."""
        if not self.node_to_part:
            self.node_to_part = wait_and_register(grid, self.num_nodes, self.register_timeout)
            self.part_to_node = {p: nid for nid, p in self.node_to_part.items()}

    def _sample(self, fraction: float) -> list[int]:
        parts = list(range(self.num_nodes))
        if fraction >= 1:
            return parts
        k = max(1, int(round(fraction * self.num_nodes)))
        return sorted(self._rng.sample(parts, k))

    def is_eval_round(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    @property
    def mailboxes(self) -> list[list[tuple[int, int, bytes]]]:
        """Per receiver: (round, sender, data) routed but not delivered yet (the router's mailboxes)."""
        return self.router.mailboxes

    def mailbox_mass(self) -> float:
        """Push-sum weight y carried by messages the router holds (undelivered or bounced)."""
        return float(sum(decode(d).y for d in self.router.in_transit()))

    def nodes_not_returned(self) -> list[int]:
        """Nodes whose last train message of the run was never answered (they did not come back)."""
        return sorted(self.awaiting)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kw):
        self.num_rounds = num_rounds
        self.register(grid)
        return super().start(grid, initial_arrays, num_rounds=num_rounds, **kw)

    def summary(self) -> None:
        log(INFO, "\t├── %s: routes push-sum messages between %d nodes, never averages", self.label, self.num_nodes)
        log(
            INFO,
            "\t├── fraction_train %.2f, fraction_evaluate %.2f, eval every %d rounds",
            self.fraction_train,
            self.fraction_evaluate,
            self.eval_every,
        )

    # -- train: deliver mailboxes, collect outgoing messages --------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled, online node: its mailbox ("frames") and its bounced messages ("bounced").

        Nodes offline in this round (``churn``) get nothing; their mail waits in the router. A straggler (a node
        that did not answer its previous train message) is contacted again in its next online round.
        """
        self.register(grid)
        rnd = server_round - 1  # the core counts rounds from 0
        out = []
        for p in self._sample(self.fraction_train):
            if not self.router.network.online(rnd, p):
                continue
            box = sorted(self.router.mailboxes[p], key=lambda m: (m[0], m[1]))
            inbox, bounced = self.router.collect(p)
            self.bits_received[p] += sum(8 * len(d) for d in inbox)
            cfg = ConfigRecord(dict(config))
            cfg["round"] = rnd
            content = RecordDict(
                {
                    "config": cfg,
                    "inbox": ConfigRecord(
                        {"frames": pack_frames([(s, d) for _, s, d in box]), "bounced": pack_frames(bounced)}
                    ),
                }
            )
            self.awaiting[p] = server_round
            self._pending[p] = inbox + [d for _, d in bounced]  # decoded only if the node never answers
            out.append(Message(content, dst_node_id=self.part_to_node[p], message_type=MessageType.TRAIN))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Post each reply's messages to the router (which drops / bounces / queues them); record stragglers.

        A train message with no reply (error, or no answer within the round timeout) is a straggler round. The
        server cannot know whether the node absorbed its inbox and debited what it meant to send (the node's
        ``context.state`` may hold either), so that mass is lost to the run: it is reported (``stragglers`` in the
        metrics, ``straggler_events`` and ``mass`` in summary.json), never silently repaired.
        """
        losses = []
        answered = set()
        for r in replies:
            sender = self.node_to_part.get(r.metadata.src_node_id)
            if r.has_error():
                if sender is not None:
                    self._straggler(server_round, sender, f"error: {r.error.reason}")
                    answered.add(sender)
                continue
            out = r.content["out"]
            rnd = int(out["round"])
            msgs = dict(unpack_frames(out["frames"]))
            for dest in msgs:
                if not 0 <= dest < self.num_nodes:
                    raise RuntimeError(f"node {sender} addressed a message to unknown node {dest}")
            self.router.post(sender, rnd, msgs)  # counted as sent when it reaches the router, dropped or not
            self.bits_sent[sender] += sum(8 * len(d) for d in msgs.values())
            answered.add(sender)
            self.awaiting.pop(sender, None)
            self._pending.pop(sender, None)
            self.last_seen[sender] = server_round
            losses.append(float(r.content["metrics"]["train_loss"]))
            nrej = int(r.content["metrics"]["rejected"])
            if nrej:
                self.messages_rejected += nrej
                self.rejected.append(f"round {server_round}: node {sender} rejected {nrej} message(s)")
        for p, rnd in list(self.awaiting.items()):
            if rnd == server_round and p not in answered:
                self._straggler(server_round, p, "no reply within the round timeout")
        expected = sum(1 for rnd in self.awaiting.values() if rnd == server_round) + len(losses)
        if expected and not losses:
            # nobody answered: a broken ClientApp, not stragglers; stop rather than run on with nothing
            raise RuntimeError(
                f"round {server_round}: no node returned its train reply; first: {self.stragglers[-1]['reason']}"
            )
        return None, MetricRecord(
            {
                "train_loss": float(np.mean(losses)) if losses else 0.0,
                "bits_sent_per_node": float(np.mean(self.bits_sent)),
                "stragglers": float(len(self.stragglers)),
            }
        )

    def _straggler(self, server_round: int, p: int, reason: str) -> None:
        y_in = float(sum(decode(d).y for d in self._pending.pop(p, [])))
        self.stragglers.append({"round": server_round, "node": p, "reason": reason, "y_inbox": y_in})
        log(
            WARNING,
            "round %d: node %d did not return its train reply (%s); the mass it held in flight is lost "
            "to the run (docs/reliability.md)",
            server_round,
            p,
            reason,
        )

    # -- evaluate: every node reports its de-biased model and accuracy ----------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            return []
        cfg = ConfigRecord(dict(config))
        cfg["round"] = server_round - 1
        return [
            Message(RecordDict({"config": cfg}), dst_node_id=self.part_to_node[p], message_type=MessageType.EVALUATE)
            for p in self._sample(self.fraction_evaluate)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        zs, accs, ys, parts = [], [], [], []
        for r in replies:
            if r.has_error():  # a node that does not report is left out of this evaluation (and recorded)
                self.eval_failures.append(
                    {
                        "round": server_round,
                        "node": self.node_to_part.get(r.metadata.src_node_id),
                        "reason": r.error.reason,
                    }
                )
                log(
                    WARNING,
                    "round %d: evaluation failed on node %s: %s",
                    server_round,
                    self.node_to_part.get(r.metadata.src_node_id),
                    r.error.reason,
                )
                continue
            parts.append(self.node_to_part[r.metadata.src_node_id])
            zs.append(r.content["model"]["z"].numpy().astype(np.float64))
            accs.append(float(r.content["metrics"]["acc"]))
            ys.append(float(r.content["metrics"]["y"]))
        if not zs:
            return None
        order = np.argsort(parts)
        zs = [zs[i] for i in order]
        zbar = np.mean(zs, axis=0)
        dist = float(np.mean([np.sum((z - zbar) ** 2) for z in zs]))
        self.last_eval = {
            "round": server_round,
            "zbar": zbar.astype(np.float32),
            "z_nodes": {parts[i]: zs[j].astype(np.float32) for j, i in enumerate(order)},
            "acc_node_mean": float(np.mean(accs)),
            "acc_node_min": float(np.min(accs)),
            "consensus_distance": dist,
            "y_nodes": float(np.sum(ys)),
            "y_mailboxes": self.mailbox_mass(),
            "num_evaluated": len(zs),
        }
        return MetricRecord({k: v for k, v in self.last_eval.items() if isinstance(v, float)})


class SGP(_Router):
    """Stochastic Gradient Push (Assran et al. 2019) routed through the ServerApp: uncompressed push-sum.

    The strategy never averages: in round t it delivers to each node the messages sent to it in round t-1 (one
    train message per node, the whole inbox packed inside), collects each node's outgoing messages and keeps them
    in per-node mailboxes. Each node knows its out-neighbours from the run config (graph, seed), so the server
    needs no topology.

    Parameters
    ----------
    num_nodes : int
        Number of nodes (virtual clients). The strategy waits until this many are connected and learns
        node id -> partition id with one query round before round 1.
    fraction_train : float (default: 1.0)
        Fraction of nodes that take part in a round, in (0, 1]. Nodes left out keep their mailbox (delivered when
        they next take part) and do not send; mass is conserved either way. With 1.0 the run is the synchronous
        algorithm and equals the in-process loop.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes that report their de-biased model and accuracy on an evaluation round, in (0, 1].
    eval_every : int (default: 1)
        Evaluate on rounds that are a multiple of this, and on the last round.
    register_timeout : float (default: 120.0)
        Seconds to wait for all nodes to connect and answer the registration query.
    sample_seed : int (default: 0)
        Seed of node sampling when a fraction is below 1.
    network : flower_sparsepush.router.Network | None (default: None, a perfect network)
        Lossy links and churn (drop, link_down, down_span, churn, seed): which messages drop and which nodes are
        offline are pure functions of (seed, round, sender, receiver), the same as in the in-process loop.
        Offline nodes get no train message in that round; their mail waits.
    bounce : bool (default: True)
        A dropped message is returned to its sender in its next train message, which takes its mass back.
        With False it is lost (the unprotected form: the push-sum weights drift).
    """

    label = "SGP"


class SparsePush(_Router):
    """Sparse-Push (Aketi et al. 2021) routed through the ServerApp: compressed (sparse, quantized) push-sum.

    Same routing as :class:`SGP`; the compression, consensus step size and push-sum form are applied by the
    ClientApp (run config keys compressor, gamma, form). The parameters are those of :class:`SGP`.
    """

    label = "Sparse-Push"


class SCSP(_Router):
    """Skew-Compensated Sparse-Push routed through the ServerApp (docs/algorithm.md has what SCSP is here).

    The routing is that of :class:`SparsePush`; the ingredients run in the ClientApp and are switched by run-config
    keys: quasi-global momentum (``qgm``) and a final phase of ``final-gossip-rounds`` gossip-only rounds after
    ``num-rounds`` training rounds, with the same compressed messages (their bits are counted like all others).
    Pass the total number of rounds (training plus final gossip) to :meth:`start`.
    """

    label = "SCSP"


class CountingFedAvg(FedAvg):
    """Flower's own FedAvg, counting communication the same way as the routers: dense model bytes each way.

    Each sampled node receives the global model (8 x its array bytes, counted as received) and sends its trained
    model back (8 x the reply's array bytes, counted as sent). The constructor takes ``num_nodes`` plus FedAvg's
    own arguments; ``fraction_evaluate`` is forced to 0 (the ServerApp evaluates the global model centrally).
    """

    def __init__(self, num_nodes: int, **kwargs) -> None:
        kwargs.setdefault("min_available_nodes", num_nodes)
        kwargs.setdefault("min_train_nodes", 2)
        kwargs["fraction_evaluate"] = 0.0
        super().__init__(**kwargs)
        self.num_nodes = num_nodes
        self.bits_sent = [0] * num_nodes
        self.bits_received = [0] * num_nodes
        self.node_to_part: dict[int, int] = {}
        self.register_timeout = 120.0

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kw):
        self.node_to_part = wait_and_register(grid, self.num_nodes, self.register_timeout)
        return super().start(grid, initial_arrays, num_rounds=num_rounds, **kw)

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        size = 8 * sum(a.numpy().nbytes for a in arrays.values())
        for m in msgs:
            self.bits_received[self.node_to_part[m.metadata.dst_node_id]] += size
        return msgs

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for r in replies:
            if not r.has_error():
                size = 8 * sum(a.numpy().nbytes for a in r.content["arrays"].values())
                self.bits_sent[self.node_to_part[r.metadata.src_node_id]] += size
            else:
                log(WARNING, "FedAvg round %s: a node failed: %s", server_round, r.error.reason)
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []
