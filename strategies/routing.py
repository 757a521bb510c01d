"""The routing strategy: the ServerApp forwards push-sum messages between nodes and never averages models.

Flower has no node-to-node channel, so a message from node i to node j travels ClientApp(i) -> SuperLink ->
ServerApp -> SuperLink -> ClientApp(j). The strategy keeps a :class:`flower_sparsepush.core.router.Router` (one mailbox
per node, the network model of router.py: dropped messages bounce to their sender, offline nodes' mail waits); what
a node sends in round t is delivered (packed into that node's single train message: one message per node per round)
in round t+1, or later if the receiver is offline, or bounced back if the link drops it. The bits
counted are the peer-to-peer payloads: 8 x the length of every encoded push-sum message, charged to its sender
when routed and to its receiver when delivered. Flower's own envelopes (protobuf, headers) are not counted.

What travels between the ServerApp and the ClientApp (records, frames, rounds) is defined in
flower_sparsepush/flower/protocol.py. A node keeps each outbox until the relay acknowledges it, and the relay keeps
what it handed a node until the node acknowledges it (:class:`flower_sparsepush.core.ledger.DeliveryLedger`), so a
lost reply loses no mass: the node is handed again what it may not have absorbed, and resends its outboxes.

Global merges (run-config ``final-merge``, ``merge-every``) are computed by the nodes in three more rounds of
relayed messages after the training round they follow (merge_steps.py); metrics rows stay per training round.

Nothing in a reply is trusted: before anything of it is routed, :func:`protocol.read_train_reply` checks the records
and :class:`flower_sparsepush.core.guard.Guard` the content (round, destinations, sizes, every message's sender,
round, form and model size). A reply that fails is refused whole, recorded with the node and the reason, and the
node is a straggler for that round; messages a receiver refused are bounced to their senders (docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_sparsepush.core.guard import BadReply, Guard, Outbox, ReplyChecks
from flower_sparsepush.core.ledger import DeliveryLedger
from flower_sparsepush.core.merge_relay import MergeRelay
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.core.weights import taken
from flower_sparsepush.flower import protocol

from .base import EvalReport, PushSumStrategy, Report, eval_report
from .merge_steps import MergeSteps

# run-config ``strategy`` -> the algorithm's name (RoutingStrategy's docstring says what each is)
ALGORITHMS = {"sgp": "SGP", "sparse-push": "Sparse-Push", "scsp": "SCSP"}


class RoutingStrategy(MergeSteps, PushSumStrategy):
    """Routes the push-sum messages of SGP, Sparse-Push or SCSP between the nodes; never averages.

    In round t it delivers to each node the messages sent to it in round t-1 (one train message per node, the whole
    inbox packed inside), collects each node's outgoing messages and keeps them in per-node mailboxes. Each node
    knows its out-neighbours from the run config (graph, seed), so the routing needs no topology; the algorithm runs
    in the ClientApp, so the routing is the same for all three.

    Parameters
    ----------
    num_nodes : int
        Number of nodes (virtual clients). The strategy waits until this many are connected and learns
        node id -> partition id with one query round before round 1.
    algorithm : str (default: "sparse-push")
        The algorithm the nodes run, as run-config ``strategy`` names it (:data:`ALGORITHMS`):

        - ``"sgp"``: Stochastic Gradient Push (Assran et al. 2019), uncompressed push-sum with gamma 1.
        - ``"sparse-push"``: Sparse-Push (Aketi et al. 2021), compressed (sparse, quantized) push-sum; the
          compressor, consensus step size and push-sum form are the run config's (compressor, gamma, form).
        - ``"scsp"``: Skew-Compensated Sparse-Push as this project defines it (docs/algorithm.md): Sparse-Push plus
          one exact global merge at the end (run-config ``final-merge``, on unless set; ``merges``).
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
    checks : flower_sparsepush.core.guard.ReplyChecks | None (default: None, no checks but the reply's form)
        What every reply is checked against before anything of it is routed: the graph (a reply addresses exactly
        the sender's out-neighbours), model size and push-sum form, the longest message the compressor makes, and
        ``exclude_after`` (stop routing to and from a node after this many refused replies; its mass leaves).
    token : str (default: "run")
        Names the nodes' store folder for this run (store.py); a resumed run keeps it.
    checkpoint_every : int (default: 0)
        Nodes keep a copy of their state every this many rounds (0: never).
    merges : flower_sparsepush.core.merge_relay.MergeRelay | None (default: None, no merges)
        The relay's side of global merges computed by the nodes (merge_steps.py); ``merge_after`` are the core
        rounds a merge follows. Each merge takes three Flower rounds after its training round; :meth:`plan_rounds`
        gives the number of Flower rounds to pass to :meth:`start`.

    The ServerApp builds ``checks`` from the run config (``run.setup.reply_checks``).
    """

    def __init__(
        self,
        num_nodes: int,
        algorithm: str = "sparse-push",
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        eval_every: int = 1,
        register_timeout: float = 120.0,
        sample_seed: int = 0,
        network: Network | None = None,
        bounce: bool = True,
        checks: ReplyChecks | None = None,
        token: str = "run",
        checkpoint_every: int = 0,
        merges: MergeRelay | None = None,
        merge_after: Iterable[int] = (),
    ) -> None:
        if num_nodes < 2:
            raise ValueError(f"num_nodes must be >= 2, got {num_nodes}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
        for name, v in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        super().__init__(num_nodes, sample_seed, register_timeout)
        self.algorithm = algorithm
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.eval_every = eval_every
        self.router = Router(num_nodes, network or Network(), bounce=bounce)
        self.guard = Guard(self.router, checks)
        self.ledger = DeliveryLedger(num_nodes)
        self.token = token
        self.checkpoint_every = checkpoint_every
        self.round_offset = 0  # rounds done before this Flower run started (a resumed run)
        self.num_rounds = 0
        self.last_eval: EvalReport | None = None
        self.rejected: list[str] = []
        self.messages_rejected = 0
        self.messages_resent = 0
        self.eval_failures: list[dict] = []
        self.restore_round = -1  # a resumed run: the checkpoint round nodes go back to, until they answered once
        self.to_restore: set[int] = set()
        self.merges = merges
        self.merge_after = set(merge_after)
        if self.merge_after and merges is None:
            raise ValueError("merge_after needs merges (the MergeRelay of the run)")
        self.plan: list[tuple[str, int]] = []  # (step, core round) of each Flower round: "train" or a merge phase
        self._merge_orders: dict = {}
        self._outcome = None
        self._owed_handed: dict[int, int] = {}

    # -- helpers ---------------------------------------------------------------------------------------------------

    def plan_rounds(self, first: int, last: int) -> int:
        """Plan the Flower rounds of core rounds ``first .. last - 1`` (each training round, then the three phases
        of a merge that follows it); returns how many there are."""
        self.plan = []
        for t in range(first, last):
            self.plan.append(("train", t))
            if t in self.merge_after:
                self.plan += [("give", t), ("reduce", t), ("take", t)]
        return len(self.plan)

    def step(self, server_round: int) -> tuple[str, int]:
        """(``train`` or a merge phase, core round) of a Flower server round (a resumed run continues the count)."""
        if self.plan and 1 <= server_round <= len(self.plan):
            return self.plan[server_round - 1]
        return "train", protocol.core_round(server_round) + self.round_offset

    def core(self, server_round: int) -> int:
        """The core round of a Flower server round."""
        return self.step(server_round)[1]

    def round_done(self, server_round: int) -> int | None:
        """The core rounds done once ``server_round`` is: None when a merge phase follows it or it is one."""
        kind, t = self.step(server_round)
        if kind in ("give", "reduce") or (kind == "train" and t in self.merge_after):
            return None
        return t + 1

    def is_eval_round(self, server_round: int) -> bool:
        done = self.round_done(server_round)
        return done is not None and (done % self.eval_every == 0 or server_round == self.num_rounds)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kw):
        self.num_rounds = num_rounds
        self.register(grid)
        return super().start(grid, initial_arrays, num_rounds=num_rounds, **kw)

    def summary(self) -> None:
        name = ALGORITHMS[self.algorithm]
        log(INFO, "\t├── %s: routes push-sum messages between %d nodes, never averages", name, self.num_nodes)
        fractions = (self.fraction_train, self.fraction_evaluate, self.eval_every)
        log(INFO, "\t├── fraction_train %.2f, fraction_evaluate %.2f, eval every %d rounds", *fractions)

    def leave_out(self, partition: int) -> None:
        """A partition no node holds at registration is absent for the whole run, as an excluded node: every
        message to it bounces back to its sender at once; its initial weight is not in the run."""
        self.router.exclude(partition)
        self.ledger.exclude(partition)

    def _restore_for(self, p: int) -> int:
        return self.restore_round if p in self.to_restore else -1

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The relay's side of a checkpoint (plain types); the nodes keep theirs (store.py snapshots)."""
        ledger = self.ledger.state_dict()
        return {
            "token": self.token,
            "router": self.router.state_dict(),
            "bits_sent": list(self.bits_sent),
            "bits_received": list(self.bits_received),
            "acked": ledger["acked"],
            "unacked": ledger["unacked"],
            "stragglers": ledger["stragglers"],
            "messages_rejected": self.messages_rejected,
            "messages_resent": self.messages_resent,
            "rejected": list(self.rejected),
            "sample_rng": self._rng.getstate(),
            "merges": self.merges.state_dict() if self.merges is not None else {},
            "weights": self.guard.weights.state_dict() if self.guard.weights is not None else {},
        }

    def load_state_dict(self, d: dict[str, Any], done: int) -> None:
        """Continue after ``done`` rounds from a checkpoint: every node first goes back to its copy of that round."""
        self.token = d["token"]
        self.router.load_state_dict(d["router"])
        self.bits_sent, self.bits_received = list(d["bits_sent"]), list(d["bits_received"])
        self.ledger.load_state_dict(d)
        self.messages_rejected, self.messages_resent = d["messages_rejected"], d["messages_resent"]
        self.rejected = list(d["rejected"])
        self._rng.setstate(_rng_state(d["sample_rng"]))
        if self.merges is not None:
            self.merges.load_state_dict(d.get("merges", {}))
        if self.guard.weights is not None:
            if not d.get("weights"):
                raise ValueError(
                    "the checkpoint has no weight ledger (written by an older version): start the run anew"
                )
            self.guard.weights.load_state_dict(d["weights"])
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
        kind, rnd = self.step(server_round)
        if kind != "train":
            return self.configure_merge(kind, rnd, server_round, dict(config))
        snapshot = bool(self.checkpoint_every) and (rnd + 1) % self.checkpoint_every == 0
        snapshot = snapshot and rnd not in self.merge_after  # then the merge's take phase keeps the copy
        return [
            self._train_message(server_round, rnd, p, snapshot, dict(config))
            for p in self.sample(self.fraction_train)
            if self.router.network.online(rnd, p) and not self.guard.is_excluded(p)
        ]

    def _train_message(self, server_round: int, rnd: int, p: int, snapshot: bool, config: dict) -> Message:
        inbox, bounced = self.router.collect(p)
        self.bits_received[p] += sum(8 * len(d) for _, d in inbox)
        redo, redo_bounced = self.ledger.hand(p, server_round, rnd, inbox, bounced)
        order = protocol.TrainOrder(
            round=rnd,
            inbox=inbox,
            bounced=bounced,
            redo=redo,
            redo_bounced=redo_bounced,
            token=self.token,
            acked=self.ledger.acked[p],
            restore=self._restore_for(p),
            snapshot=snapshot,
            merges=self._owed(p) if self.merges is not None else [],
        )
        return Message(
            protocol.train_content(order, config), dst_node_id=self.part_to_node[p], message_type=MessageType.TRAIN
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, post the messages of the good ones to the router (which drops / bounces / queues them),
        bounce what receivers rejected, and record refused replies and stragglers.

        A reply is refused whole when anything of it fails the checks (:func:`protocol.read_train_reply`,
        :meth:`Guard.check`, also for every resent earlier outbox): nothing of it is routed, it is recorded
        (``rejected_replies``), and the node is a straggler for the round, like one that sent an error or no reply
        within the round timeout. The run stops only when no node returned a good reply.
        """
        kind, rnd = self.step(server_round)
        if kind != "train":
            return None, self.aggregate_merge(kind, rnd, server_round, replies)
        losses: list[float] = []
        reports: list[tuple[int, list[int]]] = []
        for r in replies:
            got = self._take_reply(server_round, rnd, r)
            if got is not None:
                sender, reply = got
                losses.append(reply.loss)
                if reply.rejected:
                    reports.append((sender, reply.rejected))
        # after every reply is posted, so that a rejected message's later ones on the same edge are all held
        for receiver, positions in reports:
            self._receiver_rejected(server_round, receiver, positions)
        self._close_round(server_round, losses)
        return None, MetricRecord(
            {
                "train_loss": float(np.mean(losses)) if losses else 0.0,
                "bits_sent_per_node": float(np.mean(self.bits_sent)),
                "stragglers": float(len(self.ledger.stragglers)),
                "replies_rejected": float(len(self.guard.rejected_replies)),
            }
        )

    def _take_reply(self, server_round: int, rnd: int, r: Message) -> tuple[int, protocol.TrainReply] | None:
        """Check one reply and route its messages: (its node, the reply), or None when it is not a good reply (the
        reason is recorded)."""
        src = r.metadata.src_node_id
        sender = self.node_to_part.get(src)
        if sender is None:
            self._refuse(server_round, None, BadReply("unknown node", f"a reply from node id {src}, not in this run"))
            return None
        if not self.ledger.answer(sender, server_round, error=r.has_error()):
            self.guard.reject(server_round, sender, "unexpected", "a reply it was not asked for", offence=False)
            return None
        if r.has_error():
            self._straggler(server_round, sender, f"error: {r.error.reason}")
            return None
        try:
            reply, resent, y = self._checked(sender, rnd, r.content)
        except BadReply as err:
            self._refuse(server_round, sender, err)
            return None
        self._route(sender, rnd, sorted(resent) + [(rnd, reply.frames)])
        if y is not None:
            self.guard.weights.commit(sender, y)
        self.ledger.acknowledge(sender, rnd, keep_handed=bool(reply.rejected))
        self.to_restore.discard(sender)
        if self.merges is not None:
            self._owed_confirmed(sender)
        return sender, reply

    def _checked(
        self, sender: int, rnd: int, content
    ) -> tuple[protocol.TrainReply, list[tuple[int, protocol.Frames]], float | None]:
        """The reply of ``sender`` for round ``rnd``, its resent outboxes and the weight the node then holds by the
        weight ledger (None without one), each checked (:class:`BadReply` when anything fails).

        A reply longer than an honest one can be (:meth:`_cost_cap`) is refused unread. Every resent outbox must be
        of a distinct round the node was handed a train message in since its last good reply (each routed once),
        and passes the checks of a fresh one; then the weight ledger replays the node's rounds (weights.py)."""
        batches = self._batches(sender)
        handed_rounds = self.ledger.resendable(sender, rnd)
        inbox_size = len(self.ledger.handed(sender))
        cap, size = self._cost_cap(sender, [*handed_rounds, rnd], inbox_size), protocol.reply_bytes(content)
        if cap is not None and size > cap:
            raise BadReply("size", f"a {size}-byte reply; an honest one holds at most {cap} bytes in round {rnd}")
        reply = protocol.read_train_reply(content)
        rounds = [k for k, _ in reply.resent]
        if len(set(rounds)) != len(rounds) or not set(rounds) <= set(handed_rounds):
            raise BadReply(
                "round",
                f"resent outboxes of rounds {sorted(rounds)[:8]}; it may resend each of rounds "
                f"{sorted(handed_rounds)[:8]} once (those it was handed since its last good reply)",
            )
        resent = sorted(reply.resent)
        for k, frames in resent:
            self.guard.check(sender, k, Outbox(k, frames, []), 0)
        self.guard.check(sender, rnd, Outbox(reply.round, reply.frames, reply.rejected), inbox_size)
        y = self.guard.check_weights(sender, [*resent, (rnd, reply.frames)], batches, reply.rejected)
        return reply, resent, y

    def _batches(self, p: int) -> list:
        """What ``p`` was handed since its last good reply, as the weight ledger reads it: a merge's give batch
        (absorbed at the give, or else before anything of the next round) is labelled -1."""
        return [(-1 if r >= protocol.MERGE_BATCH else r, i, b) for r, i, b in self.ledger.unacked[p]]

    def _cost_cap(self, p: int, rounds: list[int], inbox_size: int) -> int | None:
        """The most bytes of frames and positions an honest reply of ``p`` can hold: for each of ``rounds`` (the
        one asked, and those it may resend) one message per out-neighbour of at most the compressor's longest,
        with the frame headers, and one position per message it was handed. None when not checked."""
        g = self.guard
        if g.graph is None or g.max_message_bytes is None:
            return None
        head = protocol.FRAME_BYTES
        return 4 * inbox_size + sum(head + len(g.out_neighbours(k, p)) * (head + g.size_limit(k)) for k in rounds)

    def _route(self, sender: int, rnd: int, outboxes: list[tuple[int, protocol.Frames]]) -> None:
        """Post ``sender``'s ``(round, frames)`` outboxes to the router, counted as sent (dropped or not)."""
        for k, frames in outboxes:
            msgs = dict(frames)
            self.router.post(sender, k, msgs)
            self.bits_sent[sender] += sum(8 * len(d) for d in msgs.values())
            self.messages_resent += len(msgs) if k < rnd else 0

    def _close_round(self, server_round: int, losses: list[float]) -> None:
        """Nodes asked in this round that never answered are stragglers; stop when no node returned a good reply."""
        silent = self.ledger.unanswered(server_round)
        for p in silent:
            self._straggler(server_round, p, "no reply within the round timeout")
        if (silent or self.ledger.replied(server_round)) and not losses:
            # nobody returned a good reply: a broken ClientApp, not stragglers; stop rather than run on with nothing
            stragglers = self.ledger.stragglers
            last = stragglers[-1]["reason"] if stragglers else "no reply"
            raise RuntimeError(f"round {server_round}: no node returned a valid train reply; last: {last}")

    def _refuse(self, server_round: int, p: int | None, err: BadReply) -> None:
        """A reply that failed the checks: recorded, the node is a straggler, a repeat offender may be excluded."""
        log(WARNING, "round %d: refused the reply of node %s (%s): %s", server_round, p, err.kind, err)
        excluded = self.guard.reject(server_round, p, err.kind, str(err))
        if p is None:
            return
        self._straggler(server_round, p, f"rejected reply ({err.kind}): {err}")
        if excluded:
            self.ledger.exclude(p)
            msg = "round %d: node %d excluded after %d refused replies: nothing is routed to or from it any more; "
            msg += "the mass it holds leaves the run (docs/reliability.md)"
            log(WARNING, msg, server_round, p, self.guard.exclude_after)

    def _receiver_rejected(self, server_round: int, receiver: int, positions: list[int]) -> None:
        box = self.ledger.take_handed(receiver)
        nrej = len(positions)
        self.messages_rejected += nrej
        self.rejected.append(f"round {server_round}: node {receiver} rejected {nrej} message(s)")
        bounced = self.guard.receiver_rejected(receiver, box, positions)
        senders = sorted({box[i][0] for i in positions})
        msg = "round %d: node %d rejected %d message(s) from node(s) %s; %d bounced back to their senders"
        log(WARNING, msg, server_round, receiver, nrej, senders, bounced)
        for s in senders:
            if (count := self.guard.rejected_by_sender[s]) >= 3:
                log(WARNING, "node %d: %d of its messages were rejected by receivers", s, count)

    def _straggler(self, server_round: int, p: int, reason: str) -> None:
        self.ledger.straggle(p, server_round, reason)
        msg = "round %d: node %d did not return a valid train reply (%s); what it was handed is handed again, and "
        msg += "it resends its outbox when it answers (docs/reliability.md)"
        log(WARNING, msg, server_round, p, reason)

    # -- evaluate: every node reports its de-biased model and accuracy ----------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            return []
        rnd = self.core(server_round)
        return [
            Message(
                protocol.eval_content(rnd, self.token, self._restore_for(p), self.ledger.acked[p], dict(config)),
                dst_node_id=self.part_to_node[p],
                message_type=MessageType.EVALUATE,
            )
            for p in self.sample(self.fraction_evaluate)
            if not self.guard.is_excluded(p)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Consensus measurements from the nodes' reports. A node whose report is an error or malformed (or that is
        unknown, or reports twice) is left out of this evaluation and recorded in ``eval_failures``."""
        reps = self._eval_reports(server_round, replies)
        if not reps:
            return None
        self._vouch(server_round, reps)
        parts = sorted(reps)
        # handed but not absorbed: the batches of rounds the node had not finished when it reported
        y_unabsorbed = self.ledger.unabsorbed_weight({p: reps[p].done for p in parts})
        if self.merges is not None:  # give batches are labelled beyond every round: absorbed ones are not in transit
            y_unabsorbed -= self.merge_batches_absorbed({p: reps[p].absorbed for p in parts})
        self.last_eval = eval_report(
            server_round,
            {p: reps[p].z for p in parts},
            {p: reps[p].y for p in parts},
            {p: reps[p].acc for p in parts},
            y_pending=sum(reps[p].y_pending for p in parts),
            y_mailboxes=self.router.in_transit_mass() + y_unabsorbed,
            val_acc_by_node={p: reps[p].val_acc for p in parts},
        )
        ev = self.last_eval
        keys = ("acc_node_mean", "acc_node_min", "consensus_distance", "y_nodes", "y_pending", "y_mailboxes")
        return MetricRecord({k: float(getattr(ev, k)) for k in keys})

    def _vouch(self, server_round: int, reps: dict[int, protocol.EvalReply]) -> None:
        """Replace a reported weight the weight ledger disagrees with by the ledger's (recorded in
        ``weight_corrections``). A node holds, with its unacknowledged outboxes (``y_pending``), the weight the
        ledger had for it at its last good reply plus every batch handed since that it says it absorbed (those of
        the rounds up to ``done``; the others count as in the relay's mailboxes)."""
        w = self.guard.weights
        if w is None:
            return
        for p in sorted(reps):
            rep = reps[p]
            due = [b for b in self.ledger.unacked[p] if not protocol.absorbs(b[0], rep.done, rep.absorbed)]
            held = w.absorb(w.y[p], *taken(due))
            if w.vouch(server_round, p, rep.y + rep.y_pending, held) != rep.y + rep.y_pending:
                reps[p] = replace(rep, y=held, y_pending=0.0)

    def _eval_reports(self, server_round: int, replies: Iterable[Message]) -> dict[int, protocol.EvalReply]:
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
        return reps

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
            straggler_events=list(self.ledger.stragglers),
            nodes_not_returned=self.ledger.not_returned(),
            eval_failures=list(self.eval_failures),
            messages_resent=self.messages_resent,
            weight_corrections=list(g.weights.corrections) if g.weights is not None else [],
            reconnected_nodes=list(self.reconnected),
            mailbox_messages=sum(len(b) for b in self.router.mailboxes),
            mailbox_bits=sum(8 * len(d) for b in self.router.mailboxes for _, _, d in b),
            registration_left_out=list(self.left_out),
            missing_partitions=list(self.missing_partitions),
        )


def _rng_state(state) -> tuple:
    """random.Random.getstate() after a trip through plain lists (a checkpoint)."""
    return (state[0], tuple(state[1]), state[2])
