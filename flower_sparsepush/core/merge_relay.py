"""The relay's side of a global merge computed by the nodes (merge_nodes.py): who takes part, who owns which
segment, what it checks in every merge reply, what it hands whom, and the bits. No Flower imports.

A merge after round ``t`` among the nodes ``asked`` (online, not excluded):

1. every asked node hands in its contribution, one message per segment (:meth:`MergeRelay.give`, checked by
   :meth:`MergeRelay.check_give`); the *participants* are the nodes whose contribution was accepted;
2. :meth:`MergeRelay.assign` gives segment ``k`` to its owner (merge_nodes.owners) and returns what each owner must
   reduce: every participant's contribution to each of its segments;
3. each owner hands in the averages of its segments (:meth:`MergeRelay.take_average`, checked by
   :meth:`MergeRelay.check_average`: its own segments, sizes, and the mean weight of the participants exactly);
4. :meth:`MergeRelay.close` gives the :class:`Outcome`: the averages of all segments, or none when an owner's are
   missing (the merge is called off: no node changes its model). Every participant is handed the outcome; a node
   that took no part is *owed* it (:meth:`MergeRelay.owe`): it is handed with its next message, and it learns the
   new base from it.

Bits: 8 x the bytes of every merge message that travels between two different nodes, charged to its sender and
its receiver when it is handed over (:func:`count`); what a node would send itself (its contribution to a segment
it owns, its own average) does not travel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flower_sparsepush.core.bounds import message_excess
from flower_sparsepush.core.codec import CodecError, decode, max_size
from flower_sparsepush.core.compression import Compressed
from flower_sparsepush.core.guard import BadReply
from flower_sparsepush.core.merge import EXACT, check_bits
from flower_sparsepush.core.merge_nodes import owners, value_limit

Frames = list[tuple[int, bytes]]
Transfer = tuple[int, int, int]  # (sender, receiver, bytes)


@dataclass
class Outcome:
    """A finished merge: its round, participants, segment owners and the ``(segment, message)`` averages (None:
    called off)."""

    round: int
    participants: list[int]
    owners: list[int]
    averages: Frames | None

    def to_plain(self) -> dict[str, Any]:
        return {"round": self.round, "participants": list(self.participants), "owners": list(self.owners),
                "averages": None if self.averages is None else [list(f) for f in self.averages]}  # fmt: skip

    @staticmethod
    def from_plain(d: dict[str, Any]) -> Outcome:
        avgs = None if d["averages"] is None else [(int(k), bytes(b)) for k, b in d["averages"]]
        return Outcome(int(d["round"]), list(d["participants"]), list(d["owners"]), avgs)


def count(transfers: list[Transfer], sent: list[int], received: list[int]) -> None:
    """Charge every ``(sender, receiver, bytes)`` transfer to both ends, in bits."""
    for s, r, nbytes in transfers:
        sent[s] += 8 * nbytes
        received[r] += 8 * nbytes


class MergeRelay:
    """The relay's bookkeeping of merges among ``n`` nodes of a model with tensor sizes ``segments``, merged at
    ``bits`` (32: exact; values of ``value_dtype``) in push-sum ``form`` (see the module)."""

    def __init__(
        self,
        n: int,
        segments: list[int],
        bits: int,
        form: str,
        value_dtype=np.float32,
        bound: float | None = None,
    ) -> None:
        check_bits(bits)
        self.n, self.segments, self.bits, self.form = n, list(segments), bits, form
        self.bound = bound  # the run's value bound (core/bounds.py); None: values unchecked
        self._sizes = [self._size(s, value_dtype) for s in self.segments]
        self.owed: dict[int, list[Outcome]] = {}  # node -> outcomes it has not been handed (or not acknowledged)
        self.open(-1, [])

    def _size(self, size: int, value_dtype) -> int:
        """The exact encoded length of a merge message of a ``size``-entry segment."""
        if self.bits == EXACT:
            return max_size(Compressed(size, None, values=np.zeros(size, dtype=value_dtype)))
        return max_size(Compressed(size, None, codes=np.zeros(size, dtype=np.uint8), scale=1.0, bits=self.bits))

    def open(self, rnd: int, asked: list[int]) -> None:
        """Start the merge after round ``rnd`` among ``asked``."""
        self.round, self.asked = rnd, sorted(asked)
        self.given: dict[int, tuple[float, Frames]] = {}
        self.averages: dict[int, bytes] = {}
        self.participants: list[int] = []
        self.owners: list[int] = []

    # -- checks ---------------------------------------------------------------------------------------------------

    def _check_messages(self, node: int, frames: Frames, want: list[int], average: bool = False) -> list[float]:
        """Raise :class:`BadReply` unless ``frames`` are one message from ``node`` for each segment of ``want``,
        of the merge's round, form, precision and exact size; returns their weights."""
        segs = [k for k, _ in frames]
        if sorted(segs) != want:
            raise BadReply("destinations", f"merge messages for segments {sorted(segs)[:8]}, expected {want[:8]}")
        weights = []
        for k, data in frames:
            if not isinstance(data, bytes) or len(data) != self._sizes[k]:
                size = len(data) if isinstance(data, bytes) else type(data).__name__
                raise BadReply("size", f"merge message of segment {k} is {size} bytes, expected {self._sizes[k]}")
            try:
                msg = decode(data, expected_dim=self.segments[k])
            except CodecError as err:
                raise BadReply("message", f"merge message of segment {k}: {err}") from None
            quantized = msg.payload.codes is not None
            if msg.payload.indices is not None or quantized != (self.bits != EXACT) or msg.form != self.form:
                raise BadReply("message", f"merge message of segment {k} is not a dense {self.bits}-bit {self.form}")
            if quantized and msg.payload.bits != self.bits:
                raise BadReply("message", f"merge message of segment {k} has {msg.payload.bits}-bit values")
            if msg.sender != node:
                raise BadReply("sender", f"merge message of segment {k} says it is from node {msg.sender}")
            if msg.round != self.round:
                raise BadReply("round", f"merge message says round {msg.round}, the merge is after round {self.round}")
            self._check_values(k, msg, average)
            weights.append(msg.y)
        return weights

    def _check_values(self, k: int, msg, average: bool) -> None:
        """Raise :class:`BadReply` (kind ``"bound"``) when the values of the merge message ``msg`` of segment ``k``
        are beyond what an honest node can send under the run's value bound (merge_nodes.value_limit, of the
        message's weight; a quantized average is a de-biased deviation)."""
        if self.bound is None or not (math.isfinite(msg.y) and msg.y > 0):
            return  # no bound; a bad weight is the weight check's
        y = 1.0 if (average and self.bits != EXACT) else msg.y
        excess = message_excess(msg.payload, value_limit(self.bits, y, self.bound), "its limit")
        if excess is not None:
            raise BadReply("bound", f"merge message of segment {k}: {excess}")

    def check_give(self, node: int, frames: Frames, y: float) -> None:
        """Raise :class:`BadReply` unless ``frames`` is ``node``'s contribution to every segment with the weight
        ``y`` it reports holding (finite, positive, the same in every message)."""
        if node not in self.asked or node in self.given:
            raise BadReply("unexpected", f"a merge contribution from node {node}, not asked or already given")
        weights = self._check_messages(node, frames, list(range(len(self.segments))))
        if not (math.isfinite(y) and y > 0) or any(w != y for w in weights):
            raise BadReply("weight", f"merge contribution weights {sorted(set(weights))[:3]}, the node holds {y!r}")

    def check_average(self, owner: int, frames: Frames) -> None:
        """Raise :class:`BadReply` unless ``frames`` are the averages of exactly ``owner``'s segments, each with the
        participants' mean weight."""
        mine = [k for k, o in enumerate(self.owners) if o == owner]
        if not mine or owner in {self.owners[k] for k in self.averages}:
            raise BadReply("unexpected", f"merge averages from node {owner}, which owns no open segment")
        weights = self._check_messages(owner, frames, mine, average=True)
        ybar = self.mean_weight()
        if any(w != ybar for w in weights):
            raise BadReply("weight", f"merge averages carry weights {sorted(set(weights))[:3]}, the mean is {ybar!r}")

    def mean_weight(self) -> float:
        """The participants' mean weight, as every owner computes it (sum by node, then divided)."""
        return float(sum(self.given[p][0] for p in self.participants)) / len(self.participants)

    # -- the merge's steps ------------------------------------------------------------------------------------------

    def give(self, node: int, frames: Frames, y: float) -> None:
        """Accept ``node``'s checked contribution."""
        self.check_give(node, frames, y)
        self.given[node] = (float(y), list(frames))

    def assign(self) -> tuple[dict[int, list[tuple[int, Frames]]], list[Transfer]]:
        """The participants (who gave) and the owners; returns what each owner reduces, ``{owner: [(segment,
        [(sender, message)])]}``, and the transfers of the contributions to other nodes."""
        self.participants = sorted(self.given)
        if not self.participants:
            self.owners = []
            return {}, []
        self.owners = owners(self.segments, self.participants)
        orders: dict[int, list[tuple[int, Frames]]] = {}
        transfers = []
        for k, o in enumerate(self.owners):
            contribs = [(p, dict(self.given[p][1])[k]) for p in self.participants]
            orders.setdefault(o, []).append((k, contribs))
            transfers += [(p, o, len(d)) for p, d in contribs if p != o]
        return orders, transfers

    def take_average(self, owner: int, frames: Frames) -> None:
        """Accept ``owner``'s checked averages."""
        self.check_average(owner, frames)
        self.averages.update(dict(frames))

    def close(self) -> Outcome:
        """The merge's outcome; called off (``averages`` None) unless every segment was averaged."""
        done = len(self.averages) == len(self.segments) and bool(self.participants)
        avgs = sorted(self.averages.items()) if done else None
        return Outcome(self.round, list(self.participants), list(self.owners), avgs)

    @staticmethod
    def transfers(node: int, outcome: Outcome) -> list[Transfer]:
        """What handing ``outcome`` to ``node`` moves between nodes: the averages of segments others own."""
        if outcome.averages is None:
            return []
        return [(outcome.owners[k], node, len(d)) for k, d in outcome.averages if outcome.owners[k] != node]

    def owe(self, node: int, outcome: Outcome) -> None:
        self.owed.setdefault(node, []).append(outcome)

    def take_owed(self, node: int) -> list[Outcome]:
        """The outcomes owed to ``node``, forgotten here (the in-process loop hands them at once)."""
        return self.owed.pop(node, [])

    def state_dict(self) -> dict[str, Any]:
        return {"owed": {str(p): [o.to_plain() for o in outs] for p, outs in self.owed.items()}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.owed = {int(p): [Outcome.from_plain(o) for o in outs] for p, outs in d.get("owed", {}).items()}
