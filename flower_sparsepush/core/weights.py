"""The relay's weight ledger: every node's push-sum weight ``y``, as the relay can know it exactly. No Flower imports.

A node's weight changes only through messages the relay routes (pushsum.py): it starts at ``y0`` (1), takes back
its bounced messages, absorbs what it is handed (less what it rejects), and in each round it ran sends every
out-neighbour the same share ``y_sent = a * y`` with ``a = gamma_t / (d_out + 1)``, keeping ``y - d_out * y_sent``;
a merge sets the participants' weight to their mean. The relay sees all of it, so :class:`WeightLedger` follows
every node's ``y`` with the node's own arithmetic, in the node's order (bounces, then the inbox, then the send), and
refuses an outbox whose messages carry any other weight or mixing factor (:class:`WeightError`, which the relay records as a refused reply of kind ``weight``,
charged to the sender). Within :data:`RTOL` (a few ulps: sums taken in another order) a weight passes.

What this stops: a message can neither create weight (``y = 1e308``, ``1e9``) nor destroy it (``1e-300``); a
re-stamped old message passes only if its weight happens to be the share of the current round; a node that claims
to have rejected messages it absorbed holds more than the ledger credits it (the rejected messages go home to their
senders), so every later message of it is refused. The ledger's ``y`` replaces a node's reported weight in the
relay's mass accounting when the two disagree (:meth:`vouch`).

The relay checks a reply with :meth:`replay`: the node's outboxes of the rounds it ran since its last good reply
(resent ones first), each after absorbing the batches handed to it up to that round, and commits the result with
:meth:`commit` once the whole reply passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from flower_sparsepush.core.codec import HEADER

RTOL = 1e-12  # relative tolerance of a weight check: rounding of sums taken in another order, never more

Frames = Sequence[tuple[int, bytes]]
# (label, inbox as (sender, bytes), bounced as (destination, bytes)); label: the round first handed, or a label
# below every round for a batch absorbed before the node's next round in any case (a merge's give batch)
Batch = tuple[int, Frames, Frames]


class WeightError(ValueError):
    """A message whose weight or mixing factor the ledger does not allow (the relay refuses the reply: guard kind
    ``weight``)."""


def carried(data: bytes) -> tuple[float, float]:
    """``(a, y)`` of an encoded message, from its header (the message was checked by the relay before)."""
    *_, a, y = HEADER.unpack_from(data)
    return float(a), float(y)


def close(got: float, want: float, rtol: float = RTOL) -> bool:
    """``got`` equals ``want`` up to ``rtol`` (relative); never for a non-finite ``got``."""
    return math.isfinite(got) and abs(got - want) <= rtol * abs(want)


def taken(batches: Sequence[Batch]) -> tuple[list, list]:
    """``(bounced, inbox)`` frames of ``batches`` in the order a node takes them when it takes them at once: every
    bounce first, then every inbox, each in the order handed (node.Node.begin)."""
    return [f for _, _, b in batches for f in b], [f for _, i, _ in batches for f in i]


class WeightLedger:
    """The weights of ``n`` nodes that start at ``y0``, under consensus step size ``gamma`` (a number, or a
    function of the round: the run's warm-up)."""

    def __init__(self, n: int, gamma: float | Callable[[int], float], y0: float = 1.0, rtol: float = RTOL) -> None:
        self.y = [float(y0)] * n
        self.gamma = gamma
        self.rtol = rtol
        self.corrections: list[dict] = []  # {"round", "node", "reported", "ledger"}: reports the ledger overruled

    def gamma_at(self, rnd: int) -> float:
        return float(self.gamma(rnd)) if callable(self.gamma) else float(self.gamma)

    def share(self, rnd: int, degree: int) -> float:
        """The mixing factor ``a`` of a node with ``degree`` out-neighbours in round ``rnd`` (pushsum.PushSum.send)."""
        return self.gamma_at(rnd) / (degree + 1)

    @staticmethod
    def absorb(y: float, bounced: Frames = (), inbox: Frames = ()) -> float:
        """``y`` after taking back ``bounced`` and absorbing ``inbox``, in that order (node.Node.begin)."""
        for _, data in bounced:
            y += carried(data)[1]
        for _, data in inbox:
            y += carried(data)[1]
        return y

    def kept(self, rnd: int, y: float, degree: int) -> float:
        """What a node holding ``y`` keeps after sending its share to each of ``degree`` out-neighbours."""
        return y - self.share(rnd, degree) * y * degree if degree else y

    def send(self, node: int, rnd: int, y: float, frames: Frames) -> float:
        """Check that every message of ``node``'s outbox of round ``rnd`` carries the share of ``y`` the rule
        gives; returns the weight the node keeps (:meth:`kept`). :class:`WeightError` otherwise."""
        if not frames:
            return y
        a = self.share(rnd, len(frames))
        y_sent = a * y
        for dest, data in frames:
            got_a, got_y = carried(data)
            if not close(got_a, a, self.rtol):
                raise WeightError(f"message to node {dest} of round {rnd} has mixing factor {got_a!r}, not {a!r}")
            if not close(got_y, y_sent, self.rtol):
                raise WeightError(
                    f"message to node {dest} of round {rnd} carries y={got_y!r}; node {node} holds {y!r} by the "
                    f"ledger, its share is {y_sent!r}",
                )
        return self.kept(rnd, y, len(frames))

    def replay(
        self, node: int, outboxes: Sequence[tuple[int, Frames]], batches: Sequence[Batch], rejected: Sequence[int] = ()
    ) -> float:
        """Check ``node``'s outboxes ``(round, frames)`` of the rounds it ran since its last good reply (in round
        order) against the batches handed to it since (:class:`Batch`, in the order handed) and the positions it
        says it rejected (into the inboxes of ``batches``, concatenated). Each outbox comes after the batches
        handed up to its round; rejected messages are never credited (they went home). Returns the node's weight
        after the last outbox, for :meth:`commit`; :class:`WeightError` when a message carries another."""
        skip = set(rejected)
        numbered, pos = [], 0
        for label, inbox, bounced in batches:
            mine = [f for i, f in enumerate(inbox, pos) if i not in skip]
            numbered.append((label, mine, bounced))
            pos += len(inbox)
        y, left = self.y[node], numbered
        for k, frames in outboxes:
            # in round k the node takes every batch handed up to round k at once
            due, left = [b for b in left if b[0] <= k], [b for b in left if b[0] > k]
            y = self.absorb(y, *taken(due))
            y = self.send(node, k, y, frames)
        return y

    def commit(self, node: int, y: float) -> None:
        self.y[node] = float(y)

    def merged(self, participants: Sequence[int], mean: float) -> None:
        """A merge's outcome: every participant holds the participants' mean weight."""
        for p in participants:
            self.y[p] = float(mean)

    def vouch(self, rnd: int, node: int, reported: float, held: float) -> float:
        """The weight to account for ``node``, which reports ``reported`` when the ledger says it holds ``held``:
        the ledger's when they disagree (recorded in :attr:`corrections`)."""
        if close(reported, held, self.rtol) or (held == 0 and reported == 0):
            return reported
        self.corrections.append({"round": rnd, "node": node, "reported": reported, "ledger": held})
        return held

    def state_dict(self) -> dict[str, Any]:
        return {"y": list(self.y), "corrections": list(self.corrections)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if len(d["y"]) != len(self.y):
            raise ValueError(f"weight ledger of {len(d['y'])} nodes, the run has {len(self.y)}")
        self.y = [float(v) for v in d["y"]]
        self.corrections = [dict(c) for c in d["corrections"]]
