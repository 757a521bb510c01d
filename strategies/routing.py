"""Routing strategies: the ServerApp forwards push-sum messages between nodes and never averages models.

Flower has no node-to-node channel, so a message from node i to node j travels ClientApp(i) -> SuperLink ->
ServerApp -> SuperLink -> ClientApp(j). The strategy keeps a :class:`flower_sparsepush.core.router.Router` (one mailbox
per node, the network model of router.py: dropped messages bounce to their sender, offline nodes' mail waits); what
a node sends in round t is delivered (packed into that node's single train message: one message per node per round)
in round t+1, or later if the receiver is offline, or bounced back if the link drops it. The bits
counted are the peer-to-peer payloads: 8 x the length of every encoded push-sum message, charged to its sender
when routed and to its receiver when delivered. Flower's own envelopes (protobuf, headers) are not counted.

What travels between the ServerApp and the ClientApp (records, frames, rounds) is defined in
flower_sparsepush/flower/protocol.py. A node keeps each outbox until the relay acknowledges it, and frames handed to a
node whose reply never came are handed again (``redo``), so a lost reply loses no mass: the node resends its
outbox with its next reply and absorbs only what it had not absorbed.

Nothing in a reply is trusted: before anything of it is routed, :func:`read_train_reply` checks the records and
:class:`flower_sparsepush.core.guard.Guard` the content (round, destinations, sizes, every message's sender, round, form
and model size). A reply that fails is refused whole, recorded with the node and the reason, and the node is a
straggler for that round; messages a receiver refused are bounced to their senders (docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from flower_sparsepush.core.codec import decode
from flower_sparsepush.core.guard import BadReply, Guard, Outbox
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.flower import protocol

from .base import EvalReport, PushSumStrategy, Report, eval_report, wait_and_register


def _weight(frames: protocol.Frames) -> float:
    return float(sum(decode(d).y for _, d in frames))


class _Router(PushSumStrategy):
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
        token: str = "run",
        checkpoint_every: int = 0,
    ) -> None:
        if num_nodes < 2:
            raise ValueError(f"num_nodes must be >= 2, got {num_nodes}")
        for name, v in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        super().__init__(num_nodes, sample_seed, register_timeout)
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.eval_every = eval_every
        self.router = Router(num_nodes, network or Network(), bounce=bounce)
        self.guard = Guard(self.router, graph, dim, form, max_message_bytes, exclude_after)
        self.token = token  # names the nodes' store folder for this run (store.py); kept by a resumed run
        self.checkpoint_every = checkpoint_every  # nodes keep a copy of their state every this many rounds
        self.round_offset = 0  # rounds done before this Flower run started (a resumed run)
        self.num_rounds = 0
        self.last_eval: EvalReport | None = None
        self.rejected: list[str] = []
        self.messages_rejected = 0
        self.messages_resent = 0
        self.awaiting: dict[int, int] = {}  # partition -> round of the train message it has not answered yet
        self.stragglers: list[dict] = []  # {"round", "node", "reason", "y_inbox", "y_held"} per reply that never came
        self.last_seen: dict[int, int] = {}  # partition -> last server round it answered a train message
        self.eval_failures: list[dict] = []
        self.acked = [-1] * num_nodes  # last round whose outbox of the node was routed
        # per node: (round first handed, inbox, bounced) handed to it since its last good reply
        self.unacked: list[list[tuple[int, protocol.Frames, protocol.Frames]]] = [[] for _ in range(num_nodes)]
        self.restore_round = -1  # a resumed run: the checkpoint round nodes go back to, until they answered once
        self.to_restore: set[int] = set()
        # partition -> every (sender, bytes) handed in its last train message (earlier rounds' first)
        self._handed: dict[int, protocol.Frames] = {}

    # -- helpers ---------------------------------------------------------------------------------------------------

    def core(self, server_round: int) -> int:
        """The core round of a Flower server round (a resumed run continues the count)."""
        return protocol.core_round(server_round) + self.round_offset

    def is_eval_round(self, server_round: int) -> bool:
        done = server_round + self.round_offset
        return done % self.eval_every == 0 or server_round == self.num_rounds

    @property
    def mailboxes(self) -> list[list[tuple[int, int, bytes]]]:
        """Per receiver: (round, sender, data) routed but not delivered yet (the router's mailboxes)."""
        return self.router.mailboxes

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

    def _restore_for(self, p: int) -> int:
        return self.restore_round if p in self.to_restore else -1

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The relay's side of a checkpoint (plain types); the nodes keep theirs (store.py snapshots)."""
        return {
            "token": self.token,
            "router": self.router.state_dict(),
            "bits_sent": list(self.bits_sent),
            "bits_received": list(self.bits_received),
            "acked": list(self.acked),
            "unacked": [[(r, list(i), list(b)) for r, i, b in u] for u in self.unacked],
            "stragglers": list(self.stragglers),
            "messages_rejected": self.messages_rejected,
            "messages_resent": self.messages_resent,
            "rejected": list(self.rejected),
            "sample_rng": self._rng.getstate(),
        }

    def load_state_dict(self, d: dict[str, Any], done: int) -> None:
        """Continue after ``done`` rounds from a checkpoint: every node first goes back to its copy of that round."""
        self.token = d["token"]
        self.router.load_state_dict(d["router"])
        self.bits_sent, self.bits_received = list(d["bits_sent"]), list(d["bits_received"])
        self.acked = list(d["acked"])
        self.unacked = [[(r, [tuple(f) for f in i], [tuple(f) for f in b]) for r, i, b in u] for u in d["unacked"]]
        self.stragglers = list(d["stragglers"])
        self.messages_rejected, self.messages_resent = d["messages_rejected"], d["messages_resent"]
        self.rejected = list(d["rejected"])
        self._rng.setstate(_rng_state(d["sample_rng"]))
        self.round_offset = done
        self.restore_round = done
        self.to_restore = set(range(self.num_nodes))

    # -- train: deliver mailboxes, collect outgoing messages --------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled, online node: its mailbox, its bounced messages, and what it was handed
        since its last good reply (``redo``).

        Nodes offline in this round (``churn``) get nothing; their mail waits in the router. A straggler (a node
        that did not answer its previous train message) is contacted again in its next online round. Excluded
        nodes (repeat offenders, ``exclude_after``) are never contacted again.
        """
        self.register(grid)
        if grid is not None:
            self.refresh(grid, server_round)
        rnd = self.core(server_round)
        snapshot = bool(self.checkpoint_every) and (rnd + 1) % self.checkpoint_every == 0
        out = []
        for p in self.sample(self.fraction_train):
            if not self.router.network.online(rnd, p) or self.guard.is_excluded(p):
                continue
            inbox, bounced = self.router.collect(p)
            self.bits_received[p] += sum(8 * len(d) for _, d in inbox)
            earlier = self.unacked[p]
            order = protocol.TrainOrder(
                round=rnd,
                inbox=inbox,
                bounced=bounced,
                redo=[(r, i) for r, i, _ in earlier if i],
                redo_bounced=[(r, b) for r, _, b in earlier if b],
                token=self.token,
                acked=self.acked[p],
                restore=self._restore_for(p),
                snapshot=snapshot,
            )
            self._handed[p] = [f for _, frames in order.redo for f in frames] + inbox
            earlier.append((rnd, inbox, bounced))
            self.awaiting[p] = server_round
            content = protocol.train_content(order, dict(config))
            out.append(Message(content, dst_node_id=self.part_to_node[p], message_type=MessageType.TRAIN))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, post the messages of the good ones to the router (which drops / bounces / queues them),
        bounce what receivers rejected, and record refused replies and stragglers.

        A reply is refused whole when its records, round, destinations, sizes or any message's sender, round, form
        or model size are wrong (:func:`protocol.read_train_reply`, :meth:`Guard.check`, also for every resent
        earlier outbox): nothing of it is routed, it is recorded (``rejected_replies``), and the node is a
        straggler for the round. A train message with no reply (error, or no answer within the round timeout) is
        a straggler round too. A straggler's mass is held, not lost: what it was handed is handed again, and it
        resends the outboxes the relay has not acknowledged. Only a node that never comes back takes its mass out
        of the run (``nodes_not_returned``). The run stops only when no node returned a good reply.
        """
        rnd = self.core(server_round)
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
                reply = protocol.read_train_reply(r.content)
                resent = [(k, f) for k, f in reply.resent if self.acked[sender] < k < rnd]
                for k, frames in resent:
                    self.guard.check(sender, k, Outbox(k, frames, []), 0)
                handed = self._handed.get(sender, [])
                self.guard.check(sender, rnd, Outbox(reply.round, reply.frames, reply.rejected), len(handed))
            except BadReply as err:
                self._refuse(server_round, sender, err)
                continue
            for k, frames in sorted(resent) + [(rnd, reply.frames)]:
                msgs = dict(frames)
                self.router.post(sender, k, msgs)  # counted as sent when it reaches the router, dropped or not
                self.bits_sent[sender] += sum(8 * len(d) for d in msgs.values())
                self.messages_resent += len(msgs) if k < rnd else 0
            self.acked[sender] = rnd
            self.unacked[sender] = []
            self.to_restore.discard(sender)
            losses.append(reply.loss)
            if reply.rejected:
                reports.append((sender, reply.rejected))  # needs what it was handed: kept until then
            else:
                self._handed.pop(sender, None)
        # after every reply is posted, so that a rejected message's later ones on the same edge are all held
        for receiver, pos in reports:
            self._receiver_rejected(server_round, receiver, pos)
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
            self.unacked[p] = []  # its mass leaves the run with it
            log(
                WARNING,
                "round %d: node %d excluded after %d refused replies: nothing is routed to or from it any more; "
                "the mass it holds leaves the run (docs/reliability.md)",
                server_round,
                p,
                self.guard.exclude_after,
            )

    def _receiver_rejected(self, server_round: int, receiver: int, positions: list[int]) -> None:
        box = self._handed.pop(receiver, [])
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
        self._handed.pop(p, None)
        batches = self.unacked[p]
        y_held = float(sum(_weight(i) + _weight(b) for _, i, b in batches))  # everything not acknowledged
        y_inbox = _weight(batches[-1][1]) + _weight(batches[-1][2]) if batches else 0.0  # handed this round
        self.stragglers.append(
            {"round": server_round, "node": p, "reason": reason, "y_inbox": y_inbox, "y_held": y_held}
        )
        log(
            WARNING,
            "round %d: node %d did not return a valid train reply (%s); what it was handed is handed again, and "
            "it resends its outbox when it answers (docs/reliability.md)",
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
        rnd = self.core(server_round)
        return [
            Message(
                protocol.eval_content(rnd, self.token, self._restore_for(p), self.acked[p], dict(config)),
                dst_node_id=self.part_to_node[p],
                message_type=MessageType.EVALUATE,
            )
            for p in self.sample(self.fraction_evaluate)
            if not self.guard.is_excluded(p)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Consensus measurements from the nodes' reports. A node whose report is an error or malformed (or that is
        unknown, or reports twice) is left out of this evaluation and recorded in ``eval_failures``."""
        reps: dict[int, protocol.EvalReply] = {}
        for r in replies:
            p = self.node_to_part.get(r.metadata.src_node_id)
            try:
                if r.has_error():
                    raise BadReply("error", r.error.reason)
                if p is None or p in reps:
                    raise BadReply("unexpected", f"a report from node id {r.metadata.src_node_id} it was not asked for")
                reps[p] = protocol.read_eval_reply(r.content, self.guard.dim)
            except BadReply as err:
                self.eval_failures.append({"round": server_round, "node": p, "reason": str(err)})
                log(WARNING, "round %d: evaluation failed on node %s: %s", server_round, p, err)
                continue
        if not reps:
            return None
        parts = sorted(reps)
        # handed but not absorbed: the batches of rounds the node had not finished when it reported
        y_unabsorbed = sum(_weight(i) + _weight(b) for p in parts for r, i, b in self.unacked[p] if r > reps[p].done)
        self.last_eval = eval_report(
            server_round,
            {p: reps[p].z for p in parts},
            {p: reps[p].y for p in parts},
            {p: reps[p].acc for p in parts},
            y_pending=sum(reps[p].y_pending for p in parts),
            y_mailboxes=self.router.in_transit_mass() + float(y_unabsorbed),
        )
        ev = self.last_eval
        keys = ("acc_node_mean", "acc_node_min", "consensus_distance", "y_nodes", "y_pending", "y_mailboxes")
        return MetricRecord({k: float(getattr(ev, k)) for k in keys})

    def report(self) -> Report:
        g = self.guard
        return Report(
            bits_sent=list(self.bits_sent),
            bits_received=list(self.bits_received),
            last_eval=self.last_eval,
            messages_dropped=self.router.dropped,
            messages_rejected=self.messages_rejected,
            rejected_messages=list(self.rejected),
            rejected_replies=list(g.rejected_replies),
            replies_rejected_by_node={str(k): v for k, v in sorted(g.offences.items())},
            messages_rejected_by_sender={str(k): v for k, v in sorted(g.rejected_by_sender.items())},
            messages_bounced_after_rejection=g.bounced_rejected,
            excluded_nodes=list(g.excluded),
            straggler_events=list(self.stragglers),
            nodes_not_returned=self.nodes_not_returned(),
            eval_failures=list(self.eval_failures),
            messages_resent=self.messages_resent,
            reconnected_nodes=list(self.reconnected),
            mailbox_messages=sum(len(b) for b in self.mailboxes),
            mailbox_bits=sum(8 * len(d) for b in self.mailboxes for _, _, d in b),
        )


def _rng_state(state) -> tuple:
    """random.Random.getstate() after a trip through plain lists (a checkpoint)."""
    return (state[0], tuple(state[1]), state[2])


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
    network : flower_sparsepush.core.router.Network | None (default: None, a perfect network)
        Lossy links and churn (drop, link_down, down_span, churn, seed): which messages drop and which nodes are
        offline are pure functions of (seed, round, sender, receiver), the same as in the in-process loop.
        Offline nodes get no train message in that round; their mail waits.
    bounce : bool (default: True)
        A dropped message is returned to its sender in its next train message, which takes its mass back.
        With False it is lost (the unprotected form: the push-sum weights drift).
    graph : flower_sparsepush.core.topology.Graph | None (default: None)
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
    skipped. Every reply is checked before anything of it is routed (``flower_sparsepush.core.guard``).
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

    def report(self) -> Report:
        """The traffic counters, in the report the ServerApp reads from every strategy (no push-sum fields)."""
        return Report(bits_sent=list(self.bits_sent), bits_received=list(self.bits_received))
