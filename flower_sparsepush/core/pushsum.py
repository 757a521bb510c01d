"""Push-sum node state and the gossip update rules (SGP, Sparse-Push). No Flower imports.

Every node i holds a numerator ``x`` (model-shaped, flat) and a scalar weight ``y``; the model it trains and
evaluates is the de-biased ``z = x / y``. In a gossip round, :meth:`PushSum.send` makes one message per
out-neighbour and debits from ``x`` and ``y`` exactly the mass those messages carry; :meth:`PushSum.receive`
credits the mass of received messages. So ``sum_i x_i`` and ``sum_i y_i`` are conserved whatever the compressor
(docs/algorithm.md has the equations). Two forms share this interface:

- ``"ef"`` (the Sparse-Push authors' form): error feedback on the numerator itself. The node compresses
  ``v = x + e``, keeps the remainder in ``e`` and sends ``a * C(v)`` with ``a = gamma / (d_out + 1)``.
  With the identity compressor and ``gamma = 1`` this is SGP exactly.
- ``"ref"`` (this project's default): per-edge references in de-biased space. For each out-edge (i -> j) both ends
  hold the same copy ``zhat_ij``; the sender sends ``C(z_i - zhat_ij)``, both ends add it to their copy, and the
  edge moves weight ``a * y_i`` together with numerator ``a * y_i * zhat_ij``. The ratio of moved numerator to
  moved weight tracks ``z_i``, so the de-biased models reach the exact average also when the weights ``y`` change
  every round (random directed graphs).
- ``"ref-x"`` (kept for comparison): the same per-edge references on the numerator ``x`` itself (CHOCO-style
  difference compression for push-sum); the edge moves ``a * xhat_ij`` and ``a * y_i``. It is exact on graphs
  whose weights settle, but lags where ``y`` keeps changing (docs/algorithm.md has the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

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
    # what this node's quantized merge messages have not carried yet (merge-feedback)
    merge_err: torch.Tensor | None = None

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

    ``ref_init`` is the value both ends of a new edge start their reference from (the common initial model in
    training; zeros when None).
    """

    def __init__(self, compressor=None, gamma: float = 1.0, form: str = "ref", ref_init: torch.Tensor | None = None):
        if form not in FORMS:
            raise ValueError(f"push-sum form must be one of {FORMS}, got {form!r}")
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"gamma (consensus step size) must be in (0, 1], got {gamma!r}")
        self.compressor = compressor or Identity()
        self.gamma = float(gamma)
        self.form = form
        self.ref_init = ref_init

    def init_state(self, x0: torch.Tensor) -> NodeState:
        """A node that starts from model ``x0`` with weight 1."""
        return NodeState(x=x0.detach().clone(), y=1.0)

    def _new_ref(self, like: torch.Tensor) -> torch.Tensor:
        if self.ref_init is None:
            return torch.zeros_like(like)
        return self.ref_init.to(like.dtype).clone()

    def send(self, state: NodeState, sender: int, out_neighbours: list[int], rnd: int) -> dict[int, bytes]:
        """Messages for this round's out-neighbours, as encoded bytes; debits the mass they carry from the state."""
        if not out_neighbours:
            return {}
        a = self.gamma / (len(out_neighbours) + 1)
        y_sent = a * state.y
        out: dict[int, bytes] = {}
        if self.form == "ef":
            c, state.error = compress_with_feedback(self.compressor, state.x, state.error)
            if isinstance(self.compressor, Identity):
                state.error = None  # nothing is ever left out
            data = encode(Message(sender, rnd, a, y_sent, c))
            c.add_to_(state.x, alpha=-a * len(out_neighbours))
            out = dict.fromkeys(out_neighbours, data)
        else:
            z_space = self.form == "ref"
            target = state.z if z_space else state.x.clone()  # the values at the start of the round
            for j in out_neighbours:
                ref = state.refs_out.get(j)
                if ref is None:
                    ref = state.refs_out[j] = self._new_ref(target)
                c = self.compressor(target - ref)
                c.add_to_(ref)
                state.x.sub_(ref, alpha=y_sent if z_space else a)
                out[j] = encode(Message(sender, rnd, a, y_sent, c, form=self.form))
        state.y -= y_sent * len(out_neighbours)
        return out

    def receive(self, state: NodeState, messages: list[tuple[int, bytes]]) -> list[Rejection]:
        """Credit the mass of received messages, given as ``(sender, bytes)`` with the sender the router names.

        A message is rejected, changing nothing, when it does not decode for this model, is of another form, or
        says it comes from another node than the router delivered it from (the per-edge reference is chosen by the
        router's sender, never by the bytes). After a rejection, the later messages from the same sender in this
        batch are rejected too, so that sender's edge reference stays in step: the relay bounces them all back
        (router.py, ``Router.bounce_rejected``). Returns what was rejected, with the reasons.
        """
        rejected: list[Rejection] = []
        refused: set[int] = set()
        for pos, (sender, data) in enumerate(messages):
            try:
                if sender in refused:
                    raise CodecError(f"follows a rejected message from node {sender} on the same edge")
                msg = decode(data, expected_dim=len(state.x))
                if msg.form != self.form:
                    raise CodecError(f"message of the {msg.form!r} form sent to a {self.form!r} node")
                if msg.sender != sender:
                    raise CodecError(f"message says it is from node {msg.sender} but came from node {sender}")
            except CodecError as err:
                rejected.append(Rejection(pos, sender, str(err)))
                refused.add(sender)
                continue
            if self.form == "ef":
                msg.payload.add_to_(state.x, alpha=msg.a)
            else:
                ref = state.refs_in.get(sender)
                if ref is None:
                    ref = state.refs_in[sender] = self._new_ref(state.x)
                msg.payload.add_to_(ref)
                state.x.add_(ref, alpha=msg.y if self.form == "ref" else msg.a)
            state.y += msg.y
        return rejected

    def bounce(self, state: NodeState, dest: int, data: bytes) -> None:
        """Take back a message this node sent to ``dest`` that was never delivered (see router.py).

        Must come before the node's next message to ``dest``: the router returns bounces at the start of the next
        round. Undoes exactly the debit of :meth:`send` (and, in the reference forms, the reference update), so no
        mass is lost and both ends of the edge keep the same reference (up to floating-point rounding).
        """
        msg = decode(data, expected_dim=len(state.x))
        if self.form == "ef":
            msg.payload.add_to_(state.x, alpha=msg.a)
        else:
            ref = state.refs_out[dest]
            state.x.add_(ref, alpha=msg.y if self.form == "ref" else msg.a)
            msg.payload.add_to_(ref, alpha=-1.0)
        state.y += msg.y

    @staticmethod
    def lookahead_offset(state: NodeState, c: float) -> torch.Tensor | None:
        """``c * (mean_j zhat_ji - z_i)`` (float32): from the node's model towards the mean of the copies it holds
        of its in-neighbours' models (ref form: de-biased), where run-config ``gradient-lookahead`` takes the
        gradients. Those copies are what the node already knows of the others, so this costs no bits, and their
        mean is nearer the nodes' average than the node itself. None when off (``c == 0``) or before any copy."""
        if not c or not state.refs_in:
            return None
        copies = torch.stack([r.to(torch.float32) for r in state.refs_in.values()]).mean(0)
        return (copies - state.z.to(torch.float32)) * c

    @staticmethod
    def local_update(state: NodeState, z_new: torch.Tensor) -> None:
        """Apply a local training step that moved the de-biased model to ``z_new``: ``x += y * (z_new - z)``."""
        state.x = state.y * z_new.detach().to(state.x.dtype)
