"""The node's side of a global merge on Flower (protocol.py has the records, docs/algorithm.md "Merges on Flower"):

- ``give``: take back bounced messages and absorb what was in flight to the node (as the in-process loop does
  before a merge), then reply its contribution to every segment (run/merging.node_contribute);
- ``reduce``: the owner of some segments replies their averages (run/merging.node_reduce);
- ``take``: the node takes the merge's outcome (run/merging.node_take) and replies the weight it then holds.

A node keeps :class:`Marks` with its state, so that every outcome is taken once, in order, whatever the relay
hands again: the merge it gave to and has not settled (``given``), the last outcome it took (``last``), the label of
the merge whose ``give`` batch of in-flight messages it absorbed last (``absorbed``; a message that hands that batch
again after a lost reply does not have it absorbed twice, protocol.absorbs), and what its feedback residuals were before it gave and reduced:
a node whose contribution was not used (it was left out, or the merge was called off) goes back to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flower_sparsepush.core.merge_relay import Outcome
from flower_sparsepush.core.pushsum import NodeState
from flower_sparsepush.flower import protocol
from flower_sparsepush.run.merging import node_contribute, node_reduce, node_take
from flower_sparsepush.run.node_train import make_node

PREFIX = "mg."


@dataclass
class Marks:
    """A node's merge bookkeeping (see the module); stored with its state as ``mg.*`` entries."""

    given: int = -1
    last: int = -1
    absorbed: int = -1
    prev_err: torch.Tensor | None = None
    prev_owner: torch.Tensor | None = None

    def to_flat(self) -> dict[str, torch.Tensor]:
        out = {PREFIX + "ints": torch.tensor([self.given, self.last, self.absorbed], dtype=torch.int64)}
        for name in ("prev_err", "prev_owner"):
            if getattr(self, name) is not None:
                out[PREFIX + name] = getattr(self, name)
        return out

    @staticmethod
    def from_flat(flat: dict[str, torch.Tensor]) -> Marks:
        ints = flat.get(PREFIX + "ints")
        given, last, absorbed = (-1, -1, -1) if ints is None else (int(v) for v in ints.tolist())
        return Marks(given, last, absorbed, flat.get(PREFIX + "prev_err"), flat.get(PREFIX + "prev_owner"))


def _copy_or_zeros(v: torch.Tensor | None, d: int) -> torch.Tensor:
    return torch.zeros(d, dtype=torch.float64) if v is None else v.clone()


def settle(setup, state: NodeState, node: int, marks: Marks, outcome: Outcome) -> None:
    """Take ``outcome`` unless it was taken already; a contribution it did not use is taken back first."""
    if outcome.round <= marks.last:
        return
    used = outcome.averages is not None and node in outcome.participants
    if marks.given == outcome.round and not used:
        if marks.prev_err is not None:
            state.merge_err = marks.prev_err
        if outcome.averages is None and marks.prev_owner is not None:
            state.owner_err = marks.prev_owner
    node_take(setup, state, node, outcome)
    marks.given, marks.last, marks.prev_err, marks.prev_owner = -1, outcome.round, None, None


def give(setup, state: NodeState, node: int, done: int, marks: Marks, order: protocol.MergeOrder):
    """The ``give`` phase (see the module): returns the reply content."""
    t = order.round
    for outcome in order.merges:
        settle(setup, state, node, marks, outcome)
    if marks.given == t:
        raise RuntimeError(f"node {node} was asked twice to give to the merge after round {t}")
    redo = [f for r, frames in order.redo if protocol.absorbs(r, done, marks.absorbed) for f in frames]
    redo_b = [f for r, frames in order.redo_bounced if protocol.absorbs(r, done, marks.absorbed) for f in frames]
    fresh = marks.absorbed < t
    inbox = redo + (order.inbox if fresh else [])
    bounced = redo_b + (order.bounced if fresh else [])
    refused = make_node(setup, node, state).begin(t + 1, inbox, bounced)
    if refused:
        raise RuntimeError(f"node {node} refused a message handed before the merge after round {t}: {refused[0]}")
    marks.absorbed = t
    if setup.cfg.merge_feedback:
        marks.prev_err = _copy_or_zeros(state.merge_err, state.x.numel())
    frames = node_contribute(setup, state, node, t)
    marks.given = t
    return protocol.merge_reply_content("give", t, frames, state.y)


def reduce(setup, state: NodeState, node: int, marks: Marks, order: protocol.MergeOrder):
    """The ``reduce`` phase: the averages of the segments this node owns."""
    if setup.cfg.merge_feedback:
        marks.prev_owner = _copy_or_zeros(state.owner_err, state.x.numel())
    frames = node_reduce(setup, state, node, order.round, order.orders)
    return protocol.merge_reply_content("reduce", order.round, frames, state.y)


def take(setup, state: NodeState, node: int, marks: Marks, order: protocol.MergeOrder):
    """The ``take`` phase: the outcome(s) handed, in order."""
    for outcome in order.merges:
        settle(setup, state, node, marks, outcome)
    return protocol.merge_reply_content("take", order.round, [], state.y)


PHASES = {"give": give, "reduce": reduce, "take": take}
