"""One push-sum node: the round it does and the state it keeps. No Flower imports.

Every place that runs nodes (the in-process loop, ``sparsepush consensus``, the Flower ClientApp, the drop-in
strategy that plays its nodes' gossip on the server) drives a :class:`Node`; none of them writes the round again.

Round ``t`` of a node (0-based here and everywhere in the core; Flower's ``server_round`` is ``t + 1``, see
:func:`flower_sparsepush.flower.protocol.core_round`):

1. :meth:`Node.begin` takes back the mass of its own messages the network bounced (before the node next uses those
   edges), then absorbs the messages sent to it, in the order the router delivers them (by sender);
2. the node trains, through a callback that moves its de-biased model (or not at all: averaging experiments and the
   final gossip-only rounds);
3. :meth:`Node.finish` sends one message per out-neighbour of round ``t``, debiting the mass they carry.

:meth:`Node.round` is the three steps in one call. The push-sum rule of a round (compressor, step size, form) is
built once per round by the ``rule`` callback, so random compressors draw from a ``(seed, node, round)`` generator.

A node's state travels and persists as a flat ``{name: tensor}`` dict (:meth:`Node.state_dict`,
:func:`state_to_flat`), the one serialisation of :class:`~flower_sparsepush.core.pushsum.NodeState` used by checkpoints,
the node store and Flower records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from flower_sparsepush.core.pushsum import NodeState, PushSum, Rejection

Frames = Iterable[tuple[int, bytes]]


@dataclass
class RoundOut:
    """What one node's round produced: its messages by destination, its mean training loss (NaN when it did not
    train) and the received messages it refused."""

    messages: dict[int, bytes]
    loss: float
    rejected: list[Rejection]


class Node:
    """A push-sum node: its id, its :class:`NodeState`, the rule of each round and its out-neighbours.

    ``rule(rnd)`` returns the :class:`PushSum` of round ``rnd`` for this node; ``out_neighbours(rnd)`` the nodes it
    sends to in that round.
    """

    def __init__(
        self,
        node_id: int,
        state: NodeState,
        rule: Callable[[int], PushSum],
        out_neighbours: Callable[[int], list[int]],
    ) -> None:
        self.id = node_id
        self.state = state
        self._rule_of = rule
        self._outs = out_neighbours
        self._rule: tuple[int, PushSum] | None = None

    def rule(self, rnd: int) -> PushSum:
        """The push-sum rule of round ``rnd``, built once per round."""
        if self._rule is None or self._rule[0] != rnd:
            self._rule = (rnd, self._rule_of(rnd))
        return self._rule[1]

    def begin(self, rnd: int, inbox: Frames = (), bounced: Frames = ()) -> list[Rejection]:
        """Take back ``bounced`` (``(destination, bytes)``), then absorb ``inbox`` (``(sender, bytes)``, the sender
        being the one the router names). Returns the refused inbox messages (nothing of them was credited)."""
        rule = self.rule(rnd)
        for dest, data in bounced:
            rule.bounce(self.state, dest, data)
        return rule.receive(self.state, list(inbox))

    def finish(self, rnd: int, z_new: torch.Tensor | None = None) -> dict[int, bytes]:
        """Set the de-biased model to ``z_new`` when given (a local update, clipped to the rule's value bound), then
        send this round's messages."""
        rule = self.rule(rnd)
        if z_new is not None:
            PushSum.local_update(self.state, z_new, rule.bound)
        return rule.send(self.state, self.id, self._outs(rnd), rnd)

    def round(
        self,
        rnd: int,
        inbox: Frames = (),
        bounced: Frames = (),
        train: Callable[[NodeState], float] | None = None,
    ) -> RoundOut:
        """:meth:`begin`, ``train(state)`` (it moves the model in ``state`` and returns the mean loss), then
        :meth:`finish`."""
        rejected = self.begin(rnd, inbox, bounced)
        loss = train(self.state) if train is not None else math.nan
        return RoundOut(self.finish(rnd), loss, rejected)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return state_to_flat(self.state)

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        self.state = state_from_flat(flat)


_OPTIONAL = {
    "m": "momentum",
    "e": "error",
    "a": "anchor",
    "c": "drift",
    "g": "grad_sum",
    "tk": "track_keys",
    "tm": "track_sum",
    "tv": "track_v",
    "ts": "track_s",
    "r": "merge_err",
    "b": "merge_base",
    "o": "owner_err",
}


def state_to_flat(state: NodeState) -> dict[str, torch.Tensor]:
    """``{name: tensor}``: ``x``; ``y`` (float64, shape (1,)); ``m``, ``e``, ``a``, ``c``, ``g``, ``tk``, ``tm``,
    ``tv``, ``ts``, ``r``, ``b``, ``o`` when present (momentum, error memory, previous-round model, drift correction,
    gradient sum since the last merge, update tracking's copies and moves, merge error feedback, the last merge's
    model, the merge owner's error feedback); ``ro.<j>`` / ``ri.<j>`` per-edge references (out-edge to j, in-edge from j).
    The tensors are the state's own (no copy)."""
    out = {"x": state.x, "y": torch.tensor([float(state.y)], dtype=torch.float64)}
    for key, attr in _OPTIONAL.items():
        value = getattr(state, attr)
        if value is not None:
            out[key] = value
    out.update({f"ro.{j}": ref for j, ref in state.refs_out.items()})
    out.update({f"ri.{j}": ref for j, ref in state.refs_in.items()})
    return out


def state_from_flat(flat: dict[str, torch.Tensor]) -> NodeState:
    """Inverse of :func:`state_to_flat`; raises ValueError on a dict that is not a node state."""
    if "x" not in flat or "y" not in flat:
        raise ValueError(f"a node state needs 'x' and 'y', got {sorted(flat)[:6]}")
    unknown = [k for k in flat if k not in ("x", "y", *_OPTIONAL) and not k.startswith(("ro.", "ri."))]
    if unknown:
        raise ValueError(f"not a node state entry: {unknown[0]!r}")
    state = NodeState(x=flat["x"], y=float(flat["y"].reshape(-1)[0]))
    for key, attr in _OPTIONAL.items():
        setattr(state, attr, flat.get(key))
    for key, value in flat.items():
        if key.startswith("ro."):
            state.refs_out[int(key[3:])] = value
        elif key.startswith("ri."):
            state.refs_in[int(key[3:])] = value
    return state
