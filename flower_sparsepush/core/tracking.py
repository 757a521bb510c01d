"""Update tracking (run-config ``update-tracking``): a node corrects its own update towards its neighbours', read
from the copies of their models it already holds.

Under label skew node i's local steps carry it away from the others by a bias every round and damped gossip pulls
it back; the nodes then sit apart by about the bias over ``gamma`` and train on gradients taken there. In the spirit
of global update tracking (GUT, Aketi, Hashemi and Roy, NeurIPS 2023), node i adds to its own update the difference
between its neighbours' updates and its own, scaled by ``mu``, with no extra bits:

    v_i <- rho v_i + (1 - rho) (change of the mean of the node's copies of its in-neighbours over one round)
    s_i <- rho s_i + (1 - rho) (the move of the node's own local SGD in this round)
    z_i <- z_i (after SGD) + mu (v_i - s_i)

``v_i`` is what the neighbourhood moves per round (its local steps, corrections and gossip, read from the form
ref's per-edge copies, averaged over ``1 / (1 - rho)`` rounds because one copy is refreshed per round, in compressed
pieces), ``s_i`` what the node's own data move it. In steady state every node moves with the network, so the
correction is ``mu / (1 - mu)`` times the pull gossip exerts, and the pull still needed (with it the distance the
skew keeps between the nodes) shrinks by about ``1 - mu``. Over the nodes the corrections of a common motion decay by
``mu`` per round, so the network's own update is not biased.

Only *changes* of the copies are read: the copies lag the models they copy, and a position read off them (the
distance ``mean copies - z``) holds every node back while they all move together (measured: docs/algorithm.md).
"""

from __future__ import annotations

import torch

from flower_sparsepush.core.pushsum import NodeState

RHO = 0.9  # averaging factor of the two velocities: about 10 rounds (the exponential graph refreshes a copy per round)


def _sum(state: NodeState, keys: list[int]) -> torch.Tensor:
    return torch.stack([state.refs_in[j].to(torch.float32) for j in keys]).sum(0)


def observe(state: NodeState, mu: float) -> None:
    """At the start of a node's local SGD: fold the change of its copies since the last start into ``track_v``
    (over the copies it held then; a copy that appeared since moved from nothing) and remember where they are now."""
    if not mu or not state.refs_in:
        return
    now = sorted(state.refs_in)
    total = _sum(state, now)
    keys = None if state.track_keys is None else state.track_keys.tolist()
    if keys and all(j in state.refs_in for j in keys):
        held = total if keys == now else _sum(state, keys)  # the same copies as last time: one sum, not two
        change = (held - state.track_sum) / len(keys)
        state.track_v = (
            change * (1 - RHO) if state.track_v is None else state.track_v.mul_(RHO).add_(change, alpha=1 - RHO)
        )
    if keys != now:
        state.track_keys = torch.tensor(now, dtype=torch.int64)
    state.track_sum = total


def corrected(state: NodeState, mu: float, z_before: torch.Tensor, z_new: torch.Tensor) -> torch.Tensor:
    """The model after local SGD moved ``z_before -> z_new``, corrected by ``mu (v - s)`` (``z_new`` itself when
    tracking is off or before the node has read a neighbourhood move)."""
    if not mu:
        return z_new
    move = z_new.to(torch.float32) - z_before.to(torch.float32)
    state.track_s = move * (1 - RHO) if state.track_s is None else state.track_s.mul_(RHO).add_(move, alpha=1 - RHO)
    if state.track_v is None:
        return z_new
    return z_new + ((state.track_v - state.track_s) * mu).to(z_new.dtype)
