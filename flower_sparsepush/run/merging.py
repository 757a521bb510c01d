"""One node's part in a global merge of a run (merge-bits, merge-feedback, drift-correction): the run config's
side of core/merge_nodes.py. The in-process loop and the Flower node handlers both call these, so both compute
the same merge from the same messages."""

from __future__ import annotations

import numpy as np

from flower_sparsepush.core.merge import correct_bias, correct_drift
from flower_sparsepush.core.merge_nodes import Frames, apply, base_of, catch_up, contribute, reduce
from flower_sparsepush.core.merge_relay import MergeRelay, Outcome
from flower_sparsepush.core.pushsum import NodeState
from flower_sparsepush.run.config import RunConfig
from flower_sparsepush.run.schedule import lr_at
from flower_sparsepush.run.setup import Setup


def merge_relay(setup: Setup) -> MergeRelay:
    """The relay's bookkeeping of this run's merges."""
    cfg = setup.cfg
    dtype = np.dtype(str(setup.x0.dtype).removeprefix("torch."))
    return MergeRelay(setup.n, setup.segments, cfg.merge_bits, cfg.form, dtype)


def drift_mode(cfg: RunConfig, t: int) -> str:
    """The drift correction the merge after round ``t`` makes: only periodic merges during training measure one."""
    mode = cfg.drift_correction
    if mode != "off" and ((t + 1) % cfg.merge_every or t + 1 >= cfg.num_rounds):
        return "off"
    return mode


def lr_steps(cfg: RunConfig, t: int) -> float:
    """The summed learning rate of the local steps of the ``merge-every`` rounds up to round ``t``."""
    return cfg.local_steps * sum(lr_at(cfg, r) for r in range(t + 1 - cfg.merge_every, t + 1))


def node_contribute(setup: Setup, state: NodeState, node: int, t: int) -> Frames:
    """``node``'s contribution to the merge after round ``t``: ``[(segment, message)]``."""
    cfg = setup.cfg
    base = base_of(state, setup.x0)
    return contribute(state, base, cfg.merge_bits, setup.segments, node, t, cfg.form, cfg.merge_feedback)


def node_reduce(setup: Setup, state: NodeState, node: int, t: int, orders: list[tuple[int, Frames]]) -> Frames:
    """The owner ``node``'s averages of its segments: ``[(segment, message)]`` from ``[(segment, contributions)]``."""
    cfg = setup.cfg
    return [
        (k, reduce(state, k, setup.segments, cfg.merge_bits, contribs, node, t, cfg.form, cfg.merge_feedback))
        for k, contribs in orders
    ]


def node_take(setup: Setup, state: NodeState, node: int, outcome: Outcome) -> None:
    """``node`` takes a merge's outcome: a participant takes the merged model (and corrects its drift), a node that
    took no part learns the new base; a called-off merge changes nothing here."""
    if outcome.averages is None:
        return
    cfg = setup.cfg
    base = base_of(state, setup.x0)
    if node not in outcome.participants:
        catch_up(state, outcome.averages, base, cfg.merge_bits, setup.segments)
        return
    mode = drift_mode(cfg, outcome.round)
    before = state.z.clone() if mode == "displacement" else None
    m = apply(state, outcome.averages, base, cfg.merge_bits, setup.segments, cfg.form, outcome.participants)
    if mode == "gradient":
        correct_bias([state], base, m, lr_steps(cfg, outcome.round), cfg.momentum)
    elif mode == "displacement":
        correct_drift([state], [before], m, lr_steps(cfg, outcome.round), cfg.momentum)
