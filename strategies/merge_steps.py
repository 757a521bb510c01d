"""The relay's side of global merges on Flower: three Flower rounds of messages after the training round a merge
follows (docs/algorithm.md "Merges on Flower"; protocol.py has the records, node_merge.py the node's side).

- ``give``: every node online in that round (not excluded, its outbox of the round routed) is handed what is in
  flight to it and the merge outcomes it is owed; it replies its contribution to every segment. The nodes whose
  reply passes the checks (core/merge_relay.py) are the participants; each segment gets an owner among them.
- ``reduce``: each owner is handed the participants' contributions to its segments and replies their averages.
- ``take``: every participant is handed the outcome (the averages, or none: called off when an owner's averages
  are missing) and replies the weight it then holds, which must be the participants' mean weight.

A node that took no part (offline, late, refused) is owed the outcome: it is handed with its next train or give
message until a good reply confirms it, and the node takes it once (it learns the new base; a contribution of its
that was not used is taken back). The mass is exact: the participants share exactly the weight they gave, and
nobody else's changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, MessageType, MetricRecord
from flwr.supercore import log

from flower_sparsepush.core.codec import decode
from flower_sparsepush.core.guard import BadReply
from flower_sparsepush.core.merge_relay import count
from flower_sparsepush.core.weights import close, taken
from flower_sparsepush.flower import protocol


class MergeSteps:
    """Mixed into the routing strategy (routing.py), whose router, ledger, guard, counters and node ids it uses.
    ``self.merges`` is the run's :class:`~flower_sparsepush.core.merge_relay.MergeRelay`."""

    def _merge_message(self, p: int, order: protocol.MergeOrder, config: dict) -> Message:
        return Message(
            protocol.merge_content(order, config), dst_node_id=self.part_to_node[p], message_type=MessageType.TRAIN
        )

    def _owed(self, p: int) -> list:
        owed = list(self.merges.owed.get(p, []))
        self._owed_handed[p] = len(owed)
        return owed

    def _owed_confirmed(self, p: int) -> None:
        """``p`` confirmed the outcomes it was last handed: they are counted and forgotten."""
        k = self._owed_handed.pop(p, 0)
        owed = self.merges.owed.get(p, [])
        for outcome in owed[:k]:
            count(self.merges.transfers(p, outcome), self.bits_sent, self.bits_received)
        if k:
            self.merges.owed[p] = owed[k:]
            if not self.merges.owed[p]:
                del self.merges.owed[p]

    def merge_batches_absorbed(self, absorbed: dict[int, int]) -> float:
        """The weight of the give batches the ledger still holds that the nodes of ``absorbed`` (node -> the merge
        whose give batch it absorbed last, from its report) did absorb: a give whose reply was lost."""
        return float(
            sum(
                decode(d).y
                for p in sorted(absorbed)
                for label, inbox, bounced in self.ledger.unacked[p]
                if protocol.MERGE_BATCH <= label <= protocol.MERGE_BATCH + absorbed[p]
                for _, d in [*inbox, *bounced]
            )
        )

    def configure_merge(self, phase: str, t: int, server_round: int, config: dict) -> list[Message]:
        base = {"round": t, "token": self.token}
        msgs = []
        if phase == "give":
            asked = [
                p
                for p in range(self.num_nodes)
                if self.router.network.online(t, p) and not self.guard.is_excluded(p) and self.ledger.acked[p] == t
            ]
            self.merges.open(t, asked)
            for p in asked:
                inbox, bounced = self.router.collect(p)
                self.bits_received[p] += sum(8 * len(d) for _, d in inbox)
                redo, redo_b = self.ledger.hand(p, server_round, protocol.MERGE_BATCH + t, inbox, bounced)
                order = protocol.MergeOrder("give", **base, acked=self.ledger.acked[p], restore=self._restore_for(p),
                                            inbox=inbox, bounced=bounced, redo=redo, redo_bounced=redo_b,
                                            merges=self._owed(p))  # fmt: skip
                msgs.append(self._merge_message(p, order, config))
            return msgs
        if phase == "reduce":
            targets = [(p, {"orders": segs}) for p, segs in sorted(self._merge_orders.items())]
        else:
            self._outcome = outcome = self.merges.close()
            if self.guard.weights is not None and outcome.averages is not None:
                self.guard.weights.merged(outcome.participants, self.merges.mean_weight())
            for p in range(self.num_nodes):
                if p not in outcome.participants and not self.guard.is_excluded(p):
                    self.merges.owe(p, outcome)
            snapshot = bool(self.checkpoint_every) and (t + 1) % self.checkpoint_every == 0
            targets = [(p, {"merges": self._owed(p) + [outcome], "snapshot": snapshot}) for p in outcome.participants]
        for p, extra in targets:
            if self.guard.is_excluded(p):
                continue
            self.ledger.hand(p, server_round, protocol.MERGE_BATCH + t, [], [])
            msgs.append(
                self._merge_message(p, protocol.MergeOrder(phase, **base, acked=self.ledger.acked[p], **extra), config)
            )
        return msgs

    def aggregate_merge(self, phase: str, t: int, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        good = 0
        for r in replies:
            sender = self.node_to_part.get(r.metadata.src_node_id)
            if sender is None or not self.ledger.answer(sender, server_round, error=r.has_error()):
                self.guard.reject(
                    server_round, sender, "unexpected", "a merge reply it was not asked for", offence=False
                )
                continue
            if r.has_error():
                self._merge_failed(server_round, phase, t, sender, f"error: {r.error.reason}")
                continue
            try:
                self._take_merge_reply(phase, t, sender, protocol.read_merge_reply(r.content, phase, t))
            except BadReply as err:
                self._refuse(server_round, sender, err)
                self._merge_failed(server_round, phase, t, sender, None)
                continue
            self.ledger.acknowledge(sender, self.ledger.acked[sender])
            self.to_restore.discard(sender)
            self._owed_confirmed(sender)
            good += 1
        for p in self.ledger.unanswered(server_round):
            self._straggler(server_round, p, "no reply within the round timeout")
            self._merge_failed(server_round, phase, t, p, None)
        if phase == "give":
            self._merge_orders, transfers = self.merges.assign()
            count(transfers, self.bits_sent, self.bits_received)
        return MetricRecord(
            {"merge_replies": float(good), "bits_sent_per_node": float(sum(self.bits_sent)) / self.num_nodes}
        )

    def _take_merge_reply(self, phase: str, t: int, sender: int, reply: protocol.MergeReply) -> None:
        if phase == "give":
            w = self.guard.weights
            if w is not None:  # it took back its bounces and absorbed what it was handed: the ledger's weight
                held = w.absorb(w.y[sender], *taken(self._batches(sender)))
                if not close(reply.y, held, w.rtol):
                    raise BadReply("weight", f"gives with y={reply.y!r}; by the weight ledger it holds {held!r}")
            self.merges.give(sender, reply.frames, reply.y)
            if w is not None:
                w.commit(sender, held)
        elif phase == "reduce":
            self.merges.take_average(sender, reply.frames)
        else:
            outcome = self._outcome
            if reply.frames:
                raise BadReply("schema", "a take reply carries no messages")
            if outcome.averages is not None and reply.y != self.merges.mean_weight():
                raise BadReply(
                    "weight", f"after the merge it holds y={reply.y!r}, the mean is {self.merges.mean_weight()!r}"
                )
            count(self.merges.transfers(sender, outcome), self.bits_sent, self.bits_received)

    def _merge_failed(self, server_round: int, phase: str, t: int, p: int, reason: str | None) -> None:
        """``p`` returned no good reply to a merge phase: left out of ``give``; its outcome owed after ``take``."""
        self._owed_handed.pop(p, None)
        if reason is not None:
            self._straggler(server_round, p, reason)
        if phase == "take":
            self.merges.owe(p, self._outcome)
        msg = "round %d: node %d gave no good reply to the %s phase of the merge after round %d (docs/reliability.md)"
        log(WARNING, msg, server_round, p, phase, t)
