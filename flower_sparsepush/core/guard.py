"""What the relay checks before it routes a node's messages, and the repeat-offender policy. No Flower imports.

On Flower the ServerApp relays every push-sum message (strategies/routing.py), so it sees each node's whole
outbox and can refuse it before anything reaches a peer. :meth:`Guard.check` accepts an outbox only when

- its round is the round the relay asked the node to run;
- its destinations are exactly the node's out-neighbours in that round (each once);
- every message is at most as long as the run's compressor can make it (:func:`message_size_limit`), decodes
  for the run's model and push-sum form, says it comes from the node that sent it (the relay knows the sender:
  Flower authenticates it) and from that round;
- the positions of inbox messages the node says it rejected are positions of messages it was handed.

These are the checks an honest receiver makes (pushsum.PushSum.receive) plus the ones only the relay can make, so
a message that passes is never rejected by an honest receiver. A failing outbox is refused whole (nothing of it is
routed) and recorded with the node, the kind of fault (:data:`KINDS`) and the reason. With ``exclude_after`` K > 0,
a node with K refused outboxes is excluded: the router stops routing to and from it (router.Router.exclude), and
the mass it holds leaves the run with it (docs/reliability.md, threat table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flower_sparsepush.core.bounds import message_excess
from flower_sparsepush.core.codec import CodecError, decode, max_size
from flower_sparsepush.core.router import Router
from flower_sparsepush.core.weights import WeightError, WeightLedger

# the kinds of refused replies (what the ServerApp records as "kind")
KINDS = ("unknown node", "unexpected", "schema", "round", "destinations", "size", "message", "sender", "weight")
KINDS += ("bound",)  # a message value beyond the run's value bound (core/bounds.py)


class BadReply(ValueError):
    """A node's reply that the relay refuses; ``kind`` is one of :data:`KINDS`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Outbox:
    """What a node hands the relay after a round: the round it ran, its messages as ``(destination, bytes)``, and
    the positions in the inbox it was handed of the messages it rejected."""

    round: int
    frames: list[tuple[int, bytes]]
    rejected: list[int] = field(default_factory=list)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def message_size_limit(compressor, dim: int, dtype: torch.dtype = torch.float32) -> int:
    """The longest message, in bytes, that ``compressor`` can produce for a ``dim``-entry model of ``dtype``.

    The compressor is run once on a sample vector: how many entries it keeps and how it codes their values do not
    depend on the values (codec.max_size bounds the index section by the largest coding the encoder can choose).
    """
    sample = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    return max_size(compressor(sample))


@dataclass(frozen=True)
class ReplyChecks:
    """What the relay checks every reply against; a check whose value is None is skipped.

    - ``graph``: a reply must address exactly the sender's out-neighbours of its round;
    - ``dim``, ``form``: every message (and every evaluation report) is of this model size and push-sum form;
    - ``value_bound``: no message value (or quantization scale) beyond it (core/bounds.py; kind ``"bound"``);
    - ``max_message_bytes``: the longest message the run's compressor makes (bytes, or a function of the round when
      the compressor changes over rounds; :func:`message_size_limit`);
    - ``exclude_after``: stop routing to and from a node after this many refused replies (0: never);
    - ``gamma``: the run's consensus step size (a number, or a function of the round); when set, the relay keeps
      the weight ledger (weights.py) and refuses a message whose weight is not the share the rule gives.

    The ServerApp and the in-process loop build it from the run (``run.setup.reply_checks``).
    """

    graph: Any = None
    dim: int | None = None
    form: str | None = None
    value_bound: float | None = None
    max_message_bytes: int | Callable[[int], int] | None = None
    exclude_after: int = 0
    gamma: float | Callable[[int], float] | None = None


class Guard:
    """The relay's checks of node replies (:meth:`check`, against :class:`ReplyChecks`) and its record of refused
    replies and excluded nodes."""

    def __init__(self, router: Router, checks: ReplyChecks | None = None) -> None:
        checks = checks or ReplyChecks()
        graph, dim, form = checks.graph, checks.dim, checks.form
        max_message_bytes, exclude_after = checks.max_message_bytes, checks.exclude_after
        if not (_is_int(exclude_after) and exclude_after >= 0):
            raise ValueError(f"exclude_after must be a whole number >= 0 (0 = never), got {exclude_after!r}")
        self.router = router
        self.n = router.n
        self.graph = graph
        self.dim = dim
        self.form = form
        self.max_message_bytes = max_message_bytes
        self.exclude_after = exclude_after
        self.value_bound = checks.value_bound
        self.rejected_replies: list[dict] = []  # {"round", "node", "kind", "reason"}
        self.offences: dict[int, int] = {}  # node -> refused replies
        self.excluded: list[dict] = []  # {"round", "node", "replies_rejected"}
        self.rejected_by_sender: dict[int, int] = {}  # sender -> its messages that receivers rejected
        self.bounced_rejected = 0  # messages bounced to their senders after a receiver rejected them
        self.weights = None  # the weight ledger (weights.py), when the checks name the run's gamma
        if checks.gamma is not None:
            self.weights = WeightLedger(self.n, checks.gamma)
        self._outs: tuple[int, list[list[int]]] | None = None
        self._limit: tuple[int, int] | None = None

    def out_neighbours(self, rnd: int, node: int) -> list[int]:
        if self._outs is None or self._outs[0] != rnd:
            self._outs = (rnd, self.graph.out_neighbours(rnd))
        return self._outs[1][node]

    def size_limit(self, rnd: int) -> int | None:
        """The longest message the run's compressor makes in round ``rnd`` (None: not checked)."""
        if not callable(self.max_message_bytes):
            return self.max_message_bytes
        if self._limit is None or self._limit[0] != rnd:
            self._limit = (rnd, int(self.max_message_bytes(rnd)))
        return self._limit[1]

    def check(self, sender: int, rnd: int, outbox: Outbox, inbox_size: int) -> None:
        """Raise :class:`BadReply` unless ``outbox`` is what an honest ``sender`` can produce in round ``rnd``,
        having been handed ``inbox_size`` messages."""
        if not _is_int(outbox.round) or outbox.round != rnd:
            raise BadReply("round", f"reply for round {outbox.round!r}, the relay asked for round {rnd}")
        dests = []
        for frame in outbox.frames:
            if not (isinstance(frame, tuple) and len(frame) == 2 and _is_int(frame[0])):
                raise BadReply("schema", "a frame is not (destination, bytes)")
            if not isinstance(frame[1], bytes):
                raise BadReply("schema", f"the message to node {frame[0]} is {type(frame[1]).__name__}, not bytes")
            dests.append(frame[0])
        if len(set(dests)) != len(dests):
            raise BadReply("destinations", f"more than one message to the same node: {sorted(dests)}")
        if not all(0 <= d < self.n for d in dests):
            raise BadReply("destinations", f"addressed to nodes {sorted(dests)}; nodes are 0..{self.n - 1}")
        if self.graph is not None:
            want = self.out_neighbours(rnd, sender)
            if sorted(dests) != sorted(want):
                raise BadReply(
                    "destinations",
                    f"addressed to {sorted(dests)}, its out-neighbours in round {rnd} are {sorted(want)}",
                )
        limit = self.size_limit(rnd)
        for dest, data in outbox.frames:
            if limit is not None and len(data) > limit:
                raise BadReply(
                    "size", f"a {len(data)}-byte message to node {dest}; the compressor makes at most {limit}"
                )
            try:
                msg = decode(data, expected_dim=self.dim)
            except CodecError as err:
                raise BadReply("message", f"message to node {dest}: {err}") from None
            if self.form is not None and msg.form != self.form:
                raise BadReply(
                    "message", f"message to node {dest} is of the {msg.form!r} form, the run's is {self.form!r}"
                )
            if msg.sender != sender:
                raise BadReply("sender", f"message to node {dest} says it is from node {msg.sender}")
            if msg.round != rnd:
                raise BadReply("round", f"message to node {dest} says round {msg.round}, the relay asked for {rnd}")
            excess = message_excess(msg.payload, self.value_bound)
            if excess:
                raise BadReply("bound", f"message to node {dest}: {excess}")
        idx = list(outbox.rejected)
        if not all(_is_int(i) and 0 <= i < inbox_size for i in idx) or len(set(idx)) != len(idx):
            raise BadReply(
                "schema", f"rejected positions {idx[:8]} are not distinct positions of its {inbox_size} messages"
            )

    def check_weights(self, sender: int, outboxes, batches, rejected=()) -> float | None:
        """The weight ``sender`` holds after its ``(round, frames)`` outboxes by the ledger (weights.py), or None
        without a ledger; :class:`BadReply` (``weight``) when a message carries another weight than its share."""
        if self.weights is None:
            return None
        try:
            return self.weights.replay(sender, outboxes, batches, rejected)
        except WeightError as err:
            raise BadReply("weight", str(err)) from None

    def reject(self, server_round: int, node: int | None, kind: str, reason: str, offence: bool = True) -> bool:
        """Record a refused reply; returns True when it makes ``node`` an excluded repeat offender (from now on the
        router routes nothing to or from it). ``node`` is None for a reply from a node id the relay does not know;
        ``offence=False`` records without counting it against the node (a second reply to one train message)."""
        self.rejected_replies.append({"round": server_round, "node": node, "kind": kind, "reason": reason})
        if node is None or not offence:
            return False
        self.offences[node] = self.offences.get(node, 0) + 1
        if self.exclude_after and self.offences[node] >= self.exclude_after and node not in self.router.excluded:
            self.router.exclude(node)
            self.excluded.append({"round": server_round, "node": node, "replies_rejected": self.offences[node]})
            return True
        return False

    def receiver_rejected(self, receiver: int, delivered: list[tuple[int, bytes]], indices: list[int]) -> int:
        """Bounce what ``receiver`` rejected of the ``delivered`` ``(sender, bytes)`` messages back to their senders
        (router.Router.bounce_rejected) and count the rejections per sender. A receiver can reject an honest
        sender's message (or claim to), so these counts are reported, never held against the sender."""
        for i in indices:
            s = delivered[i][0]
            self.rejected_by_sender[s] = self.rejected_by_sender.get(s, 0) + 1
        n = self.router.bounce_rejected(receiver, delivered, indices)
        self.bounced_rejected += n
        return n

    def is_excluded(self, node: int) -> bool:
        return node in self.router.excluded
