"""Mailboxes between nodes, with lossy links and offline nodes. No Flower imports.

Flower has no node-to-node channel, so the ServerApp relays every message; the in-process loops relay the same
way. The router models the network between the nodes:

- a message on a link that drops it (probability ``drop``, or a link that is down for a span of rounds) is
  **bounced** to its sender, who takes back the mass it carried (:meth:`PushSum.bounce`). A real peer keeps a copy
  of each message until the receiver acknowledges it; the bounce stands for the missing acknowledgement and is not
  peer traffic. With ``bounce=False`` the message is simply lost (the unprotected form, which loses mass);
- a message to a node that is offline waits in that node's mailbox and is delivered, in order, when it returns;
- a message its receiver rejects is bounced too (:meth:`Router.bounce_rejected`), and a node the relay has
  excluded (guard.py, the repeat-offender policy) gets nothing: its mailbox and every later message to it bounce.

Which messages drop and which nodes are offline are pure functions of ``(seed, round, sender, receiver)``, so a
run is reproducible and the Flower path and the in-process loop see the same network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flower_sparsepush.core.codec import decode

_DROP, _DOWN, _OFFLINE = 1, 2, 3


@dataclass
class Network:
    """The link and node failure model (all probabilities in [0, 1))."""

    drop: float = 0.0
    link_down: float = 0.0
    down_span: int = 10
    churn: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "link_down", "churn"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"{name} must be a probability in [0, 1), got {v!r}")
        if not (isinstance(self.down_span, int) and self.down_span >= 1):
            raise ValueError(f"down_span must be a whole number of rounds >= 1, got {self.down_span!r}")

    @property
    def perfect(self) -> bool:
        return self.drop == 0 and self.link_down == 0 and self.churn == 0

    def _u(self, *key: int) -> float:
        return float(np.random.default_rng([self.seed, *key]).random())

    def delivers(self, rnd: int, sender: int, dest: int) -> bool:
        """Whether the link (sender -> dest) carries a message sent in round ``rnd``."""
        if self.link_down and self._u(_DOWN, rnd // self.down_span, sender, dest) < self.link_down:
            return False
        return not (self.drop and self._u(_DROP, rnd, sender, dest) < self.drop)

    def online(self, rnd: int, node: int) -> bool:
        """Whether ``node`` takes part in round ``rnd`` (a fraction ``churn`` of nodes is offline each round)."""
        return not (self.churn and self._u(_OFFLINE, rnd, node) < self.churn)


@dataclass
class Router:
    """Per-node mailboxes of encoded messages, and per-sender bounced messages."""

    n: int
    network: Network = field(default_factory=Network)
    bounce: bool = True
    mailboxes: list[list[tuple[int, int, bytes]]] = field(init=False)  # per receiver: (round, sender, data)
    bounced: list[list[tuple[int, bytes]]] = field(init=False)  # per sender: (receiver, data)
    dropped: int = 0
    delivered_bits: list[int] = field(init=False)
    excluded: set[int] = field(default_factory=set)  # nodes the relay stopped routing to and from (guard.py)

    def __post_init__(self) -> None:
        self.mailboxes = [[] for _ in range(self.n)]
        self.bounced = [[] for _ in range(self.n)]
        self.delivered_bits = [0] * self.n

    def post(self, sender: int, rnd: int, messages: dict[int, bytes]) -> None:
        """Accept the messages ``sender`` made in round ``rnd``; the network decides which arrive.

        A message on an edge whose earlier message is still on its way back to the sender (bounced, not yet
        collected) bounces too, ahead of it: the sender made it with the edge reference the earlier one moved, so
        the receiver cannot take it, and the sender undoes the two newest first (as :meth:`_return_edge`). This
        happens only when several of a node's outboxes are posted at once (the relay routing a resent outbox with
        a newer one after a lost reply); it is not a loss of the network and is not counted as dropped."""
        for dest, data in sorted(messages.items()):
            if not 0 <= dest < self.n:
                raise ValueError(f"node {sender} addressed a message to node {dest}; nodes are 0..{self.n - 1}")
            earlier = [k for k, (j, _) in enumerate(self.bounced[sender]) if j == dest]
            if earlier:
                self.bounced[sender].insert(earlier[0], (dest, data))
            elif dest in self.excluded:
                self.bounced[sender].append((dest, data))  # the relay's decision, not a loss: always bounced
            elif self.network.delivers(rnd, sender, dest):
                self.mailboxes[dest].append((rnd, sender, data))
            else:
                self.dropped += 1
                if self.bounce:
                    self.bounced[sender].append((dest, data))

    def collect(self, node: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        """Empty ``node``'s mailbox, as ``(sender, bytes)`` ordered by round then sender, and its bounced messages."""
        box = sorted(self.mailboxes[node], key=lambda m: (m[0], m[1]))
        self.mailboxes[node] = []
        bounced, self.bounced[node] = self.bounced[node], []
        self.delivered_bits[node] += sum(8 * len(d) for _, _, d in box)
        return [(s, d) for _, s, d in box], bounced

    def _return_edge(self, sender: int, dest: int, messages: list[tuple[int, bytes]]) -> int:
        """Bounce ``(round, bytes)`` messages of edge (sender -> dest), with every later one the router still holds
        on that edge, newest first: the sender undoes them in reverse order of sending, which restores its per-edge
        reference exactly also when it used the edge again after the first of them (pushsum.PushSum.bounce).
        Returns how many messages were bounced."""
        held = [(r, d) for r, s, d in self.mailboxes[dest] if s == sender]
        self.mailboxes[dest] = [m for m in self.mailboxes[dest] if m[1] != sender]
        held += [(round_of(d), d) for j, d in self.bounced[sender] if j == dest]
        self.bounced[sender] = [m for m in self.bounced[sender] if m[0] != dest]
        for _, data in sorted(messages + held, key=lambda m: m[0], reverse=True):
            self.bounced[sender].append((dest, data))
        return len(messages) + len(held)

    def bounce_rejected(self, receiver: int, delivered: list[tuple[int, bytes]], indices: list[int]) -> int:
        """Send back to their senders the messages ``receiver`` rejected: ``delivered`` is what the router handed
        it, as ``(sender, bytes)`` in delivery order (:meth:`collect`), and ``indices`` the positions it refused.
        A rejection also takes back every later message of the same sender in that delivery (the receiver refuses
        those too; pushsum.PushSum.receive), so the sender's mass comes home whatever the receiver claims.
        Returns the number of messages bounced (with the later ones on those edges that the router still held)."""
        first: dict[int, int] = {}
        for i in sorted(set(indices)):
            first.setdefault(delivered[i][0], i)
        count = 0
        for sender, start in first.items():
            count += self._return_edge(
                sender, receiver, [(round_of(d), d) for s, d in delivered[start:] if s == sender]
            )
        return count

    def exclude(self, node: int) -> None:
        """Stop routing to and from ``node``: its undelivered mail bounces to the senders (who take the mass back),
        every later message to it bounces, and its own bounced messages are dropped (its mass leaves with it)."""
        if node in self.excluded:
            return
        self.excluded.add(node)
        for sender in sorted({s for _, s, _ in self.mailboxes[node]}):
            self._return_edge(sender, node, [])
        self.bounced[node] = []

    def in_transit(self) -> list[bytes]:
        """Every message the router still holds (undelivered or bounced), for mass accounting."""
        return [d for box in self.mailboxes for _, _, d in box] + [d for box in self.bounced for _, d in box]

    def in_transit_mass(self) -> float:
        """Push-sum weight y carried by the messages the router holds (the one mass-in-transit sum of the code)."""
        return float(sum(decode(d).y for d in self.in_transit()))

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the router (plain types)."""
        return {
            "mailboxes": [list(box) for box in self.mailboxes],
            "bounced": [list(box) for box in self.bounced],
            "dropped": self.dropped,
            "delivered_bits": list(self.delivered_bits),
            "excluded": sorted(self.excluded),
        }

    def load_state_dict(self, d: dict) -> None:
        self.mailboxes = [[tuple(m) for m in box] for box in d["mailboxes"]]
        self.bounced = [[tuple(m) for m in box] for box in d["bounced"]]
        self.dropped = int(d["dropped"])
        self.delivered_bits = [int(b) for b in d["delivered_bits"]]
        self.excluded = set(d.get("excluded", ()))


def round_of(data: bytes) -> int:
    """The round a message was sent in, read from its header (messages the router holds always decode)."""
    return decode(data).round
