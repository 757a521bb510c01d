"""Mailboxes between nodes, with lossy links and offline nodes. No Flower imports.

Flower has no node-to-node channel, so the ServerApp relays every message; the in-process loops relay the same
way. The router models the network between the nodes:

- a message on a link that drops it (probability ``drop``, or a link that is down for a span of rounds) is
  **bounced** to its sender, who takes back the mass it carried (:meth:`PushSum.bounce`). A real peer keeps a copy
  of each message until the receiver acknowledges it; the bounce stands for the missing acknowledgement and is not
  peer traffic. With ``bounce=False`` the message is simply lost (the unprotected form, which loses mass);
- a message to a node that is offline waits in that node's mailbox and is delivered, in order, when it returns.

Which messages drop and which nodes are offline are pure functions of ``(seed, round, sender, receiver)``, so a
run is reproducible and the Flower path and the in-process loop see the same network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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

    def __post_init__(self) -> None:
        self.mailboxes = [[] for _ in range(self.n)]
        self.bounced = [[] for _ in range(self.n)]
        self.delivered_bits = [0] * self.n

    def post(self, sender: int, rnd: int, messages: dict[int, bytes]) -> None:
        """Accept the messages ``sender`` made in round ``rnd``; the network decides which arrive."""
        for dest, data in sorted(messages.items()):
            if not 0 <= dest < self.n:
                raise ValueError(f"node {sender} addressed a message to node {dest}; nodes are 0..{self.n - 1}")
            if self.network.delivers(rnd, sender, dest):
                self.mailboxes[dest].append((rnd, sender, data))
            else:
                self.dropped += 1
                if self.bounce:
                    self.bounced[sender].append((dest, data))

    def collect(self, node: int) -> tuple[list[bytes], list[tuple[int, bytes]]]:
        """Empty ``node``'s mailbox (ordered by round, then sender) and its bounced messages."""
        box = sorted(self.mailboxes[node], key=lambda m: (m[0], m[1]))
        self.mailboxes[node] = []
        bounced, self.bounced[node] = self.bounced[node], []
        self.delivered_bits[node] += sum(8 * len(d) for _, _, d in box)
        return [d for _, _, d in box], bounced

    def in_transit(self) -> list[bytes]:
        """Every message the router still holds (undelivered or bounced), for mass accounting."""
        return [d for box in self.mailboxes for _, _, d in box] + [d for box in self.bounced for _, d in box]
