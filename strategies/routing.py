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
their mass back (``PushSum.bounce``) before it absorbs its inbox. The reply is ``out`` (ConfigRecord: ``round``,
``frames``, ``rejected`` = the inbox positions the node refused, uint32 little-endian) and ``metrics``
(MetricRecord: ``train_loss``, ``rejected``, ``y``).

Nothing in a reply is trusted: before anything of it is routed, :func:`read_train_reply` checks the records and
:class:`flower_sparsepush.guard.Guard` the content (round, destinations, sizes, every message's sender, round, form
and model size). A reply that fails is refused whole, recorded with the node and the reason, and the node is a
straggler for that round; messages a receiver refused are bounced to their senders (docs/reliability.md).
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
from flower_sparsepush.guard import BadReply, Guard, Outbox
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


TRAIN_REPLY = {"out": ("round", "frames", "rejected"), "metrics": ("train_loss", "rejected", "y")}


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_train_reply(content: object) -> tuple[Outbox, float]:
    """The outbox and training loss of a train reply; raises :class:`BadReply` (kind ``schema``) unless the reply
    has exactly the records and fields of :data:`TRAIN_REPLY`, with their types."""
    if not isinstance(content, RecordDict):
        raise BadReply("schema", f"the reply content is {type(content).__name__}, not a RecordDict")
    if sorted(content.keys()) != sorted(TRAIN_REPLY):
        raise BadReply("schema", f"records {sorted(content.keys())}, expected {sorted(TRAIN_REPLY)}")
    out, metrics = content["out"], content["metrics"]
    if not isinstance(out, ConfigRecord) or not isinstance(metrics, MetricRecord):
        raise BadReply("schema", "'out' must be a ConfigRecord and 'metrics' a MetricRecord")
    for name, record in (("out", out), ("metrics", metrics)):
        if sorted(record.keys()) != sorted(TRAIN_REPLY[name]):
            raise BadReply(
                "schema", f"'{name}' has fields {sorted(record.keys())}, expected {sorted(TRAIN_REPLY[name])}"
            )
    if not all(_number(metrics[k]) for k in TRAIN_REPLY["metrics"]):
        raise BadReply("schema", "a 'metrics' field is not a number")
    frames, rejected = out["frames"], out["rejected"]
    if not isinstance(frames, bytes) or not isinstance(rejected, bytes) or len(rejected) % 4:
        raise BadReply("schema", "'out.frames' must be bytes and 'out.rejected' bytes of uint32 positions")
    try:
        frames = unpack_frames(frames)
    except ValueError as err:
        raise BadReply("schema", f"'out.frames': {err}") from None
    positions = np.frombuffer(rejected, dtype="<u4").tolist()
    return Outbox(out["round"], frames, positions), float(metrics["train_loss"])


def read_eval_reply(content: object, dim: int | None) -> tuple[np.ndarray, float, float]:
    """(z, accuracy, y) of an evaluate reply; raises :class:`BadReply` unless it has the ``model.z`` array
    (finite, one entry per model parameter) and the ``metrics`` ``acc`` (in [0, 1]) and ``y`` (finite)."""
    try:
        model, metrics = content["model"], content["metrics"]
        z, acc, y = model["z"].numpy(), metrics["acc"], metrics["y"]
    except (KeyError, TypeError, ValueError, AttributeError, OSError, EOFError) as err:
        raise BadReply(
            "schema", f"evaluate reply without a readable model.z, metrics.acc and metrics.y: {err!r}"
        ) from None
    if not (isinstance(z, np.ndarray) and z.ndim == 1 and z.dtype.kind == "f" and np.isfinite(z).all()):
        raise BadReply("schema", "model.z is not a finite 1-D float array")
    if dim is not None and len(z) != dim:
        raise BadReply("schema", f"model.z has {len(z)} entries, the model has {dim}")
    if not (_number(acc) and 0 <= acc <= 1 and _number(y) and np.isfinite(y)):
        raise BadReply("schema", f"metrics acc={acc!r} (must be in [0, 1]) or y={y!r} (must be finite)")
    return z.astype(np.float64), float(acc), float(y)


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
        graph=None,
        dim: int | None = None,
        form: str | None = None,
        max_message_bytes: int | None = None,
        exclude_after: int = 0,
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
        self.guard = Guard(self.router, graph, dim, form, max_message_bytes, exclude_after)
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
        # partition -> (sender, bytes) delivered and (destination, bytes) bounced in its last train message
        self._handed: dict[int, tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]] = {}

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
        that did not answer its previous train message) is contacted again in its next online round. Excluded
        nodes (repeat offenders, ``exclude_after``) are never contacted again.
        """
        self.register(grid)
        rnd = server_round - 1  # the core counts rounds from 0
        out = []
        for p in self._sample(self.fraction_train):
            if not self.router.network.online(rnd, p) or self.guard.is_excluded(p):
                continue
            inbox, bounced = self.router.collect(p)
            self.bits_received[p] += sum(8 * len(d) for _, d in inbox)
            cfg = ConfigRecord(dict(config))
            cfg["round"] = rnd
            content = RecordDict(
                {
                    "config": cfg,
                    "inbox": ConfigRecord({"frames": pack_frames(inbox), "bounced": pack_frames(bounced)}),
                }
            )
            self.awaiting[p] = server_round
            self._handed[p] = (inbox, bounced)  # to bounce what it rejects, and to report what a straggler held
            out.append(Message(content, dst_node_id=self.part_to_node[p], message_type=MessageType.TRAIN))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, post the messages of the good ones to the router (which drops / bounces / queues them),
        bounce what receivers rejected, and record refused replies and stragglers.

        A reply is refused whole when its records, round, destinations, sizes or any message's sender, round, form
        or model size are wrong (:func:`read_train_reply`, :meth:`Guard.check`): nothing of it is routed, it is
        recorded (``rejected_replies``), and the node is a straggler for the round. A train message with no reply
        (error, or no answer within the round timeout) is a straggler round too. The server cannot know whether a
        straggler absorbed its inbox and debited what it meant to send (its ``context.state`` may hold either), so
        that mass is lost to the run: it is reported (``stragglers`` in the metrics, ``straggler_events`` and
        ``mass`` in summary.json), never silently repaired. The run stops only when no node returned a good reply.
        """
        rnd = server_round - 1
        losses = []
        answered: set[int] = set()
        reports: list[tuple[int, list[int]]] = []
        for r in replies:
            src = r.metadata.src_node_id
            sender = self.node_to_part.get(src)
            if sender is None:
                self._refuse(
                    server_round, None, BadReply("unknown node", f"a reply from node id {src}, not in this run")
                )
                continue
            if sender in answered or self.awaiting.get(sender) != server_round:
                self.guard.reject(server_round, sender, "unexpected", "a reply it was not asked for", offence=False)
                continue
            answered.add(sender)
            if r.has_error():
                self._straggler(server_round, sender, f"error: {r.error.reason}")
                continue
            self.awaiting.pop(sender, None)
            self.last_seen[sender] = server_round
            try:
                outbox, loss = read_train_reply(r.content)
                self.guard.check(sender, rnd, outbox, len(self._handed.get(sender, ([], []))[0]))
            except BadReply as err:
                self._refuse(server_round, sender, err)
                continue
            msgs = dict(outbox.frames)
            self.router.post(sender, rnd, msgs)  # counted as sent when it reaches the router, dropped or not
            self.bits_sent[sender] += sum(8 * len(d) for d in msgs.values())
            losses.append(loss)
            if outbox.rejected:
                reports.append((sender, outbox.rejected))  # needs what it was handed: kept until then
            else:
                self._handed.pop(sender, None)
        # after every reply is posted, so that a rejected message's later ones on the same edge are all held
        for receiver, positions in reports:
            self._receiver_rejected(server_round, receiver, positions)
        for p, asked in list(self.awaiting.items()):
            if asked == server_round and p not in answered:
                self._straggler(server_round, p, "no reply within the round timeout")
        expected = sum(1 for asked in self.awaiting.values() if asked == server_round) + len(answered)
        if expected and not losses:
            # nobody returned a good reply: a broken ClientApp, not stragglers; stop rather than run on with nothing
            first = self.stragglers[-1]["reason"] if self.stragglers else "no reply"
            raise RuntimeError(f"round {server_round}: no node returned a valid train reply; last: {first}")
        return None, MetricRecord(
            {
                "train_loss": float(np.mean(losses)) if losses else 0.0,
                "bits_sent_per_node": float(np.mean(self.bits_sent)),
                "stragglers": float(len(self.stragglers)),
                "replies_rejected": float(len(self.guard.rejected_replies)),
            }
        )

    def _refuse(self, server_round: int, p: int | None, err: BadReply) -> None:
        """A reply that failed the checks: recorded, the node is a straggler, a repeat offender may be excluded."""
        log(WARNING, "round %d: refused the reply of node %s (%s): %s", server_round, p, err.kind, err)
        excluded = self.guard.reject(server_round, p, err.kind, str(err))
        if p is None:
            return
        self._straggler(server_round, p, f"rejected reply ({err.kind}): {err}")
        if excluded:
            self.awaiting.pop(p, None)
            log(
                WARNING,
                "round %d: node %d excluded after %d refused replies: nothing is routed to or from it any more; "
                "the mass it holds leaves the run (docs/reliability.md)",
                server_round,
                p,
                self.guard.exclude_after,
            )

    def _receiver_rejected(self, server_round: int, receiver: int, positions: list[int]) -> None:
        box, _ = self._handed.pop(receiver, ([], []))
        nrej = len(positions)
        self.messages_rejected += nrej
        self.rejected.append(f"round {server_round}: node {receiver} rejected {nrej} message(s)")
        bounced = self.guard.receiver_rejected(receiver, box, positions)
        senders = sorted({box[i][0] for i in positions})
        log(
            WARNING,
            "round %d: node %d rejected %d message(s) from node(s) %s; %d bounced back to their senders",
            server_round,
            receiver,
            nrej,
            senders,
            bounced,
        )
        for s in senders:
            if self.guard.rejected_by_sender[s] >= 3:
                log(
                    WARNING,
                    "node %d: %d of its messages were rejected by receivers",
                    s,
                    self.guard.rejected_by_sender[s],
                )

    def _straggler(self, server_round: int, p: int, reason: str) -> None:
        box, bounced = self._handed.pop(p, ([], []))
        y_in = float(sum(decode(d).y for _, d in box) + sum(decode(d).y for _, d in bounced))
        self.stragglers.append({"round": server_round, "node": p, "reason": reason, "y_inbox": y_in})
        log(
            WARNING,
            "round %d: node %d did not return a valid train reply (%s); the mass it held in flight is lost "
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
            if not self.guard.is_excluded(p)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Consensus measurements from the nodes' reports. A node whose report is an error or malformed (or that is
        unknown, or reports twice) is left out of this evaluation and recorded in ``eval_failures``."""
        zs, accs, ys, parts = [], [], [], []
        for r in replies:
            p = self.node_to_part.get(r.metadata.src_node_id)
            try:
                if r.has_error():
                    raise BadReply("error", r.error.reason)
                if p is None or p in parts:
                    raise BadReply("unexpected", f"a report from node id {r.metadata.src_node_id} it was not asked for")
                z, acc, y = read_eval_reply(r.content, self.guard.dim)
            except BadReply as err:
                self.eval_failures.append({"round": server_round, "node": p, "reason": str(err)})
                log(WARNING, "round %d: evaluation failed on node %s: %s", server_round, p, err)
                continue
            parts.append(p)
            zs.append(z)
            accs.append(acc)
            ys.append(y)
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
            "y_by_node": {parts[i]: ys[i] for i in order},
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
    graph : flower_sparsepush.topology.Graph | None (default: None)
        The run's graph: a reply must address exactly the sender's out-neighbours of its round.
    dim : int | None (default: None)
        Model parameters: every message, and every evaluation report, must be of this size.
    form : str | None (default: None)
        The push-sum form every message must be of (``pushsum.FORMS``).
    max_message_bytes : int | None (default: None)
        The longest message the run's compressor makes (``guard.message_size_limit``); longer ones are refused.
    exclude_after : int (default: 0)
        Stop routing to and from a node after this many refused replies (0: never). Its mass leaves the run.

    The ServerApp passes graph, dim, form and max_message_bytes from the run config; a check whose value is None is
    skipped. Every reply is checked before anything of it is routed (``flower_sparsepush.guard``).
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
