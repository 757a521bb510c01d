"""The relay's delivery ledger: what it handed each node that the node has not acknowledged. No Flower imports.

On Flower the relay hands each node its messages inside a train message and learns what the node did only from its
reply, which can be lost. The ledger keeps, per node ``p``:

- ``unacked[p]``: every batch (the inbox and the bounced messages of one round) handed to ``p`` since its last good
  reply, as ``(round first handed, inbox, bounced)``. :meth:`hand` returns the earlier ones to hand again
  (``redo``): the node absorbs a batch only for a round it has not finished, so nothing is absorbed twice;
- ``acked[p]``: the last round whose outbox of ``p`` was routed. A good reply for round ``t``
  (:meth:`acknowledge`) empties ``unacked[p]`` and sets ``acked[p] = t``. The node resends its outboxes of the
  rounds after ``acked[p]``; the relay routes those of the rounds it handed since, before ``t`` (:meth:`resendable`),
  each once, and refuses a reply that resends any other;
- ``awaiting``: the nodes whose latest train message has no answer yet (an error reply is no answer), with its
  server round. A node still awaiting at the end of a run did not come back (:meth:`not_returned`);
- ``stragglers``: one event per train message with no good reply (:meth:`straggle`): no reply, an error or a
  refused reply. Nothing is acknowledged then, so what the node was handed is handed again.

Invariant: every message handed to node ``p`` since its last good reply is in ``unacked[p]``. The mass handed to
a node is either absorbed and acknowledged by the node or held here, so a lost reply loses none; only
:meth:`exclude` (a repeat offender, guard.py) lets it go, and it leaves the run with the node.
"""

from __future__ import annotations

from typing import Any

from flower_sparsepush.core.codec import decode

Frames = list[tuple[int, bytes]]
Batch = tuple[int, Frames, Frames]  # (round first handed, inbox as (sender, bytes), bounced as (destination, bytes))


def _weight(frames: Frames) -> float:
    """The push-sum weight ``y`` the encoded messages of ``frames`` carry."""
    return float(sum(decode(d).y for _, d in frames))


class DeliveryLedger:
    """What the relay handed each of ``n`` nodes and holds until the node acknowledges it (see the module)."""

    def __init__(self, n: int) -> None:
        self.acked = [-1] * n
        self.unacked: list[list[Batch]] = [[] for _ in range(n)]
        self.awaiting: dict[int, int] = {}  # node -> server round of the train message it has not answered
        self.stragglers: list[dict] = []  # {"round", "node", "reason", "y_inbox", "y_held"}
        self._handed: dict[int, Frames] = {}  # node -> every (sender, bytes) of its last train message, redo first
        self._answered: tuple[int, set[int]] = (0, set())  # (server round, nodes that answered it)

    def hand(
        self, node: int, server_round: int, rnd: int, inbox: Frames, bounced: Frames
    ) -> tuple[list[tuple[int, Frames]], list[tuple[int, Frames]]]:
        """Record the train message of ``server_round`` (core round ``rnd``) that hands ``node`` this round's
        ``inbox`` and ``bounced``. Returns what it must be handed again, by round: the inboxes and the bounced
        messages of the earlier batches it has not acknowledged (``redo``, ``redo_bounced``)."""
        earlier = self.unacked[node]
        redo = [(r, i) for r, i, _ in earlier if i]
        redo_bounced = [(r, b) for r, _, b in earlier if b]
        self._handed[node] = [f for _, frames in redo for f in frames] + inbox
        earlier.append((rnd, inbox, bounced))
        self.awaiting[node] = server_round
        return redo, redo_bounced

    def handed(self, node: int) -> Frames:
        """Every ``(sender, bytes)`` handed in ``node``'s last train message: the positions its reply may reject."""
        return self._handed.get(node, [])

    def take_handed(self, node: int) -> Frames:
        """:meth:`handed`, forgotten here (read once, when the node's rejections are bounced)."""
        return self._handed.pop(node, [])

    def _answers(self, server_round: int) -> set[int]:
        if self._answered[0] != server_round:
            self._answered = (server_round, set())
        return self._answered[1]

    def answer(self, node: int, server_round: int, error: bool = False) -> bool:
        """Record a reply of ``node`` to its train message of ``server_round``; False, recording nothing, when it
        was not asked in that round or answered it already. An ``error`` reply leaves it awaiting."""
        answered = self._answers(server_round)
        if node in answered or self.awaiting.get(node) != server_round:
            return False
        answered.add(node)
        if not error:
            self.awaiting.pop(node)
        return True

    def replied(self, server_round: int) -> int:
        """How many nodes answered their train message of ``server_round`` (good, refused or error replies)."""
        return len(self._answers(server_round))

    def unanswered(self, server_round: int) -> list[int]:
        """The nodes asked in ``server_round`` that sent no reply at all, in the order they were first asked."""
        answered = self._answers(server_round)
        return [p for p, asked in self.awaiting.items() if asked == server_round and p not in answered]

    def resendable(self, node: int, rnd: int) -> list[int]:
        """The rounds whose outboxes ``node`` may resend with its reply for round ``rnd``, each once: those it was
        handed a train message for since its last good reply (all after ``acked[node]``), before ``rnd``."""
        return [r for r, _, _ in self.unacked[node] if 0 <= r < rnd]

    def acknowledge(self, node: int, rnd: int, keep_handed: bool = False) -> None:
        """A good reply of ``node`` for round ``rnd``: it absorbed everything it was handed, and its outboxes up to
        ``rnd`` are routed. ``keep_handed`` keeps :meth:`handed` for the rejections its reply reports."""
        self.acked[node] = rnd
        self.unacked[node] = []
        if not keep_handed:
            self._handed.pop(node, None)

    def straggle(self, node: int, server_round: int, reason: str) -> dict:
        """Record that ``node`` returned no good reply in ``server_round``; returns the event, with ``y_held`` (the
        weight it was handed and has not acknowledged) and ``y_inbox`` (the part handed in its latest message)."""
        self._handed.pop(node, None)
        batches = self.unacked[node]
        y_held = float(sum(_weight(i) + _weight(b) for _, i, b in batches))
        y_inbox = _weight(batches[-1][1]) + _weight(batches[-1][2]) if batches else 0.0
        event = {"round": server_round, "node": node, "reason": reason, "y_inbox": y_inbox, "y_held": y_held}
        self.stragglers.append(event)
        return event

    def exclude(self, node: int) -> None:
        """Stop holding anything for ``node`` (excluded: the mass it was handed leaves the run with it)."""
        self.awaiting.pop(node, None)
        self.unacked[node] = []

    def unabsorbed_weight(self, done: dict[int, int]) -> float:
        """The weight handed to the nodes of ``done`` (node -> the last round it finished) in batches of rounds it
        had not finished: in neither the node nor the router."""
        return float(sum(_weight(i) + _weight(b) for p in sorted(done) for r, i, b in self.unacked[p] if r > done[p]))

    def not_returned(self) -> list[int]:
        """Nodes whose latest train message was never answered."""
        return sorted(self.awaiting)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain types)."""
        return {
            "acked": list(self.acked),
            "unacked": [[(r, list(i), list(b)) for r, i, b in u] for u in self.unacked],
            "stragglers": list(self.stragglers),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.acked = list(d["acked"])
        self.unacked = [[(r, [tuple(f) for f in i], [tuple(f) for f in b]) for r, i, b in u] for u in d["unacked"]]
        self.stragglers = list(d["stragglers"])
