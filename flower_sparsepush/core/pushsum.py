"""Push-sum node state and the gossip update rules (SGP, Sparse-Push). No Flower imports.

Every node i holds a numerator ``x`` (model-shaped, flat) and a scalar weight ``y``; the model it trains and
evaluates is the de-biased ``z = x / y``. In a gossip round, :meth:`PushSum.send` makes one message per
out-neighbour and debits from ``x`` and ``y`` exactly the mass those messages carry; :meth:`PushSum.receive`
credits the mass of received messages. So ``sum_i x_i`` and ``sum_i y_i`` are conserved whatever the compressor
(docs/algorithm.md has the equations).

:class:`PushSum` keeps that weight bookkeeping and the checks of received messages; what a message carries of the
numerator is the form's, one subclass per form of ``codec.FORMS``. ``PushSum(compressor, gamma, form)`` returns
the subclass of ``form``:

- ``"ef"``, :class:`ErrorFeedbackPushSum` (the Sparse-Push authors' form): error feedback on the numerator itself.
  The node compresses ``v = x + e``, keeps the remainder in ``e`` and sends ``a * C(v)`` with
  ``a = gamma / (d_out + 1)``. With the identity compressor and ``gamma = 1`` this is SGP exactly.
- ``"ref"``, :class:`DebiasedReferencePushSum` (this project's default): per-edge references in de-biased space.
  For each out-edge (i -> j) both ends hold the same copy ``zhat_ij``; the sender sends ``C(z_i - zhat_ij)``, both
  ends add it to their copy, and the edge moves weight ``a * y_i`` together with numerator ``a * y_i * zhat_ij``.
  The ratio of moved numerator to moved weight tracks ``z_i``, so the de-biased models reach the exact average
  also when the weights ``y`` change every round (random directed graphs).
- ``"ref-x"``, :class:`NumeratorReferencePushSum` (for comparison): the same per-edge references on the numerator
  ``x`` itself (CHOCO-style difference compression for push-sum); the edge moves ``a * xhat_ij`` and ``a * y_i``.
  It is exact on graphs whose weights settle, but lags where ``y`` keeps changing (docs/algorithm.md has the
  measurements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch

from flower_sparsepush.core import bounds
from flower_sparsepush.core.codec import FORMS, CodecError, Message, decode, encode
from flower_sparsepush.core.compression import Identity, compress_with_feedback


@dataclass
class NodeState:
    """Everything one node keeps between rounds (compact: it is pickled with every Flower message)."""

    x: torch.Tensor
    y: float = 1.0
    error: torch.Tensor | None = None
    refs_out: dict[int, torch.Tensor] = field(default_factory=dict)
    refs_in: dict[int, torch.Tensor] = field(default_factory=dict)
    momentum: torch.Tensor | None = None
    anchor: torch.Tensor | None = None  # the training layer's previous-round model (quasi-global momentum)
    drift: torch.Tensor | None = None  # this node's gradient bias, measured at periodic merges (drift-correction)
    grad_sum: torch.Tensor | None = None  # sum of lr * gradient since the last merge (drift-correction=gradient)
    # update-tracking (core/tracking.py): the copies' senders and sum at the last local SGD, the averaged moves of
    # the neighbourhood (v) and of the node's own SGD (s)
    track_keys: torch.Tensor | None = None
    track_sum: torch.Tensor | None = None
    track_v: torch.Tensor | None = None
    track_s: torch.Tensor | None = None
    # what this node's quantized merge messages have not carried yet (merge-feedback)
    merge_err: torch.Tensor | None = None
    merge_base: torch.Tensor | None = None  # the last merge's model this node knows (None: the initial model)
    # what this node's averaged merge messages, as the owner of some segments, have not carried yet (merge-feedback)
    owner_err: torch.Tensor | None = None

    @property
    def z(self) -> torch.Tensor:
        """The de-biased model used for gradients and evaluation."""
        return self.x / self.y


class Rejection(NamedTuple):
    """A received message that :meth:`PushSum.receive` refused: its position in the batch, sender and reason."""

    index: int
    sender: int
    reason: str


class PushSum:
    """The gossip rule shared by all nodes: compressor, consensus step size ``gamma`` and form.

    ``PushSum(compressor, gamma, form, ref_init)`` is the one place a form name picks its class (like
    ``pathlib.Path``): it returns the subclass of ``form`` (default ``"ref"``). A subclass may also be built
    directly, without ``form``. ``ref_init`` is the value both ends of a new edge start their reference from (the
    common initial model in training; zeros when None).

    A subclass says what a message carries of the numerator: :meth:`_send` debits it from ``x`` and returns the
    encoded messages, :meth:`_absorb` credits a received one, :meth:`_take_back` undoes the debit of a bounced one.
    This class moves the weight ``y`` and checks every received message before any of it is credited.
    """

    form: ClassVar[str]

    def __new__(cls, compressor=None, gamma: float = 1.0, form: str | None = None, ref_init=None, bound=None):
        if cls is PushSum:
            cls = rule_class("ref" if form is None else form)
        return super().__new__(cls)

    def __init__(
        self,
        compressor=None,
        gamma: float = 1.0,
        form: str | None = None,
        ref_init: torch.Tensor | None = None,
        bound: float | None = None,
    ):
        if form is not None and form != self.form:
            raise ValueError(f"{type(self).__name__} is the {self.form!r} form, got form={form!r}")
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"gamma (consensus step size) must be in (0, 1], got {gamma!r}")
        self.compressor = compressor or Identity()
        self.gamma = float(gamma)
        self.ref_init = ref_init
        self.bound = None if bound is None else bounds.check_bound(bound)

    def _compress(self, v: torch.Tensor):
        """The compressor applied to ``v`` clipped to the value bound (core/bounds.py): no message of this node
        carries a value beyond it."""
        return self.compressor(bounds.clip(v, self.bound))

    def init_state(self, x0: torch.Tensor) -> NodeState:
        """A node that starts from model ``x0`` with weight 1."""
        return NodeState(x=x0.detach().clone(), y=1.0)

    def send(self, state: NodeState, sender: int, out_neighbours: list[int], rnd: int) -> dict[int, bytes]:
        """Messages for this round's out-neighbours, as encoded bytes; debits the mass they carry from the state."""
        if not out_neighbours:
            return {}
        a = self.gamma / (len(out_neighbours) + 1)
        y_sent = a * state.y
        out = self._send(state, sender, out_neighbours, rnd, a, y_sent)
        state.y -= y_sent * len(out_neighbours)
        return out

    def receive(self, state: NodeState, messages: list[tuple[int, bytes]]) -> list[Rejection]:
        """Credit the mass of received messages, given as ``(sender, bytes)`` with the sender the router names.

        A message is rejected, changing nothing, when it does not decode for this model, is of another form, says it
        comes from another node than the router delivered it from (the per-edge reference is chosen by the router's
        sender, never by the bytes), carries a value beyond the value bound, or would make this node's state
        non-finite (it is applied, checked and undone from a copy; core/bounds.py). After a rejection, the later messages from the same sender in this
        batch are rejected too, so that sender's edge reference stays in step: the relay bounces them all back
        (router.py, ``Router.bounce_rejected``). Returns what was rejected, with the reasons.
        """
        rejected: list[Rejection] = []
        refused: set[int] = set()
        for pos, (sender, data) in enumerate(messages):
            try:
                msg = self._accept(state, sender, data, refused)
                self._apply(state, sender, msg)
            except CodecError as err:
                rejected.append(Rejection(pos, sender, str(err)))
                refused.add(sender)
        return rejected

    def _apply(self, state: NodeState, sender: int, msg: Message) -> None:
        """Credit ``msg``; if that leaves the state non-finite, put the state back as it was and raise
        :class:`CodecError` (what the message touches: ``x``, ``y`` and the in-edge reference of ``sender``)."""
        x, y, ref = state.x.clone(), state.y, state.refs_in.get(sender)
        saved_ref = None if ref is None else ref.clone()
        self._absorb(state, sender, msg)
        state.y += msg.y
        if bounds.finite(state.y, state.x, state.refs_in.get(sender)) and bounds.finite_ratio(state.x, state.y):
            return
        state.x, state.y = x, y
        if saved_ref is None:
            state.refs_in.pop(sender, None)
        else:
            state.refs_in[sender] = saved_ref
        raise CodecError("applying it would make this node's state non-finite")

    def _accept(self, state: NodeState, sender: int, data: bytes, refused: set[int]) -> Message:
        """The decoded message, or :class:`CodecError` with the reason this node refuses it."""
        if sender in refused:
            raise CodecError(f"follows a rejected message from node {sender} on the same edge")
        msg = decode(data, expected_dim=len(state.x))
        if msg.form != self.form:
            raise CodecError(f"message of the {msg.form!r} form sent to a {self.form!r} node")
        if msg.sender != sender:
            raise CodecError(f"message says it is from node {msg.sender} but came from node {sender}")
        excess = bounds.message_excess(msg.payload, self.bound)
        if excess:
            raise CodecError(excess)
        return msg

    def bounce(self, state: NodeState, dest: int, data: bytes) -> None:
        """Take back a message this node sent to ``dest`` that was never delivered (see router.py).

        Must come before the node's next message to ``dest``: the router returns bounces at the start of the next
        round. Undoes exactly the debit of :meth:`send` (and, in the reference forms, the reference update), so no
        mass is lost and both ends of the edge keep the same reference (up to floating-point rounding).
        """
        msg = decode(data, expected_dim=len(state.x))
        self._take_back(state, dest, msg)
        state.y += msg.y

    def _send(
        self, state: NodeState, sender: int, out_neighbours: list[int], rnd: int, a: float, y_sent: float
    ) -> dict[int, bytes]:
        raise NotImplementedError

    def _absorb(self, state: NodeState, sender: int, msg: Message) -> None:
        raise NotImplementedError

    def _take_back(self, state: NodeState, dest: int, msg: Message) -> None:
        raise NotImplementedError

    @staticmethod
    def lookahead_offset(state: NodeState, c: float) -> torch.Tensor | None:
        """``c * (mean_j zhat_ji - z_i)`` (float32): from the node's model towards the mean of the copies it holds
        of its in-neighbours' models (ref form: de-biased), where run-config ``gradient-lookahead`` takes the
        gradients. Those copies are what the node already knows of the others, so this costs no bits, and their
        mean is nearer the nodes' average than the node itself. None when off (``c == 0``) or before any copy."""
        if not c or not state.refs_in:
            return None
        # by sender id: a state reloaded from a file lists its copies in another order, and a float mean is not
        # order-free (the Flower path then ends an ulp away from the in-process one, which grows over a long run)
        copies = torch.stack([state.refs_in[j].to(torch.float32) for j in sorted(state.refs_in)]).mean(0)
        return (copies - state.z.to(torch.float32)) * c

    @staticmethod
    def local_update(state: NodeState, z_new: torch.Tensor, bound: float | None = None) -> bool:
        """Apply a local training step that moved the de-biased model to ``z_new``: ``x += y * (z_new - z)``, with
        ``z_new`` clipped to the value bound (core/bounds.py). A non-finite ``z_new`` (a diverged step) is not
        applied: the node keeps its model. Returns whether it was applied."""
        z_new = z_new.detach()
        if not math.isfinite(bounds.largest_abs(z_new)):
            return False
        state.x = state.y * bounds.clip(z_new, bound).to(state.x.dtype)
        return True


class ErrorFeedbackPushSum(PushSum):
    """Form ``"ef"``: every out-neighbour gets the same ``a * C(x + e)``; the remainder stays in ``e``."""

    form = "ef"

    def _send(self, state, sender, out_neighbours, rnd, a, y_sent):
        c, state.error = compress_with_feedback(self._compress, state.x, state.error)
        if isinstance(self.compressor, Identity):
            state.error = None  # nothing is ever left out
        data = encode(Message(sender, rnd, a, y_sent, c, form=self.form))
        c.add_to_(state.x, alpha=-a * len(out_neighbours))
        return dict.fromkeys(out_neighbours, data)

    def _absorb(self, state, sender, msg):
        msg.payload.add_to_(state.x, alpha=msg.a)

    def _take_back(self, state, dest, msg):
        msg.payload.add_to_(state.x, alpha=msg.a)


class _EdgeReferencePushSum(PushSum):
    """The reference forms: each edge (i -> j) has a copy both ends update with the compressed difference, and the
    edge moves ``moved(a, y) * reference`` of the numerator. A subclass says what the reference follows
    (:meth:`_target`) and that factor (:meth:`_moved`)."""

    def _target(self, state: NodeState) -> torch.Tensor:
        """What the sender's references follow, as it is at the start of the round (a new tensor)."""
        raise NotImplementedError

    @staticmethod
    def _moved(a: float, y: float) -> float:
        """The factor of the reference in the numerator an edge moves, for mixing factor ``a`` and weight ``y``."""
        raise NotImplementedError

    def _new_ref(self, like: torch.Tensor) -> torch.Tensor:
        if self.ref_init is None:
            return torch.zeros_like(like)
        return self.ref_init.to(like.dtype).clone()

    def _send(self, state, sender, out_neighbours, rnd, a, y_sent):
        target = self._target(state)
        out: dict[int, bytes] = {}
        for j in out_neighbours:
            ref = state.refs_out.get(j)
            if ref is None:
                ref = state.refs_out[j] = self._new_ref(target)
            c = self._compress(target - ref)
            c.add_to_(ref)
            state.x.sub_(ref, alpha=self._moved(a, y_sent))
            out[j] = encode(Message(sender, rnd, a, y_sent, c, form=self.form))
        return out

    def _absorb(self, state, sender, msg):
        ref = state.refs_in.get(sender)
        if ref is None:
            ref = state.refs_in[sender] = self._new_ref(state.x)
        msg.payload.add_to_(ref)
        state.x.add_(ref, alpha=self._moved(msg.a, msg.y))

    def _take_back(self, state, dest, msg):
        ref = state.refs_out[dest]
        state.x.add_(ref, alpha=self._moved(msg.a, msg.y))
        msg.payload.add_to_(ref, alpha=-1.0)


class DebiasedReferencePushSum(_EdgeReferencePushSum):
    """Form ``"ref"``: references follow the de-biased model ``z``; an edge moves ``y_sent * zhat``."""

    form = "ref"

    def _target(self, state):
        return state.z

    @staticmethod
    def _moved(a, y):
        return y


class NumeratorReferencePushSum(_EdgeReferencePushSum):
    """Form ``"ref-x"``: references follow the numerator ``x``; an edge moves ``a * xhat``."""

    form = "ref-x"

    def _target(self, state):
        return state.x.clone()

    @staticmethod
    def _moved(a, y):
        return a


RULES: dict[str, type[PushSum]] = {
    cls.form: cls for cls in (ErrorFeedbackPushSum, DebiasedReferencePushSum, NumeratorReferencePushSum)
}
assert tuple(RULES) == FORMS, "one push-sum class per form of the wire codec, in its order"


def rule_class(form: str) -> type[PushSum]:
    """The push-sum class of a form name (``codec.FORMS``)."""
    if form not in RULES:
        raise ValueError(f"push-sum form must be one of {FORMS}, got {form!r}")
    return RULES[form]
