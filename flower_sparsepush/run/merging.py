"""One node's part in a global merge of a run (merge-bits, merge-feedback, drift-correction): the run config's
side of core/merge_nodes.py. The in-process loop and the Flower node handlers both call these, so both compute
the same merge from the same messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flower_sparsepush.core.merge import correct_bias, correct_drift
from flower_sparsepush.core.merge_nodes import Frames, apply, base_of, catch_up, contribute, reduce
from flower_sparsepush.core.merge_relay import MergeRelay, Outcome, count
from flower_sparsepush.core.pushsum import NodeState
from flower_sparsepush.run.config import RunConfig
from flower_sparsepush.run.schedule import lr_at
from flower_sparsepush.run.setup import Setup


@dataclass(frozen=True)
class MergeSetup:
    """What a merge reads of a run, for a caller without a :class:`Setup` (the drop-in strategy): the config (merge
    keys, form, schedule), the number of nodes, the model's tensor sizes and the initial model. A ``Setup`` has the
    same fields."""

    cfg: RunConfig
    n: int
    segments: list[int]
    x0: torch.Tensor


def merge_relay(setup: Setup | MergeSetup) -> MergeRelay:
    """The relay's bookkeeping of this run's merges."""
    cfg = setup.cfg
    dtype = np.dtype(str(setup.x0.dtype).removeprefix("torch."))
    return MergeRelay(setup.n, setup.segments, cfg.merge_bits, cfg.form, dtype, cfg.value_bound)


def drift_mode(cfg: RunConfig, t: int) -> str:
    """The drift correction the merge after round ``t`` makes: only periodic merges during training measure one."""
    mode = cfg.drift_correction
    if mode != "off" and ((t + 1) % cfg.merge_every or t + 1 >= cfg.num_rounds):
        return "off"
    return mode


def lr_steps(cfg: RunConfig, t: int) -> float:
    """The summed learning rate of the local steps of the ``merge-every`` rounds up to round ``t``."""
    return cfg.local_steps * sum(lr_at(cfg, r) for r in range(t + 1 - cfg.merge_every, t + 1))


def node_contribute(setup: Setup | MergeSetup, state: NodeState, node: int, t: int) -> Frames:
    """``node``'s contribution to the merge after round ``t``: ``[(segment, message)]``."""
    cfg = setup.cfg
    base = base_of(state, setup.x0)
    return contribute(
        state, base, cfg.merge_bits, setup.segments, node, t, cfg.form, cfg.merge_feedback, cfg.value_bound
    )


def node_reduce(
    setup: Setup | MergeSetup, state: NodeState, node: int, t: int, orders: list[tuple[int, Frames]]
) -> Frames:
    """The owner ``node``'s averages of its segments: ``[(segment, message)]`` from ``[(segment, contributions)]``."""
    cfg = setup.cfg
    return [
        (
            k,
            reduce(
                state,
                k,
                setup.segments,
                cfg.merge_bits,
                contribs,
                node,
                t,
                cfg.form,
                cfg.merge_feedback,
                cfg.value_bound,
            ),
        )
        for k, contribs in orders
    ]


def node_take(setup: Setup | MergeSetup, state: NodeState, node: int, outcome: Outcome) -> None:
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


def merge_among(
    setup: Setup | MergeSetup,
    states: list[NodeState],
    participants: list[int],
    t: int,
    relay: MergeRelay,
    absorb: Callable[[int], object],
    sent: list[int],
    received: list[int],
) -> Outcome:
    """The global merge after round ``t`` among ``participants``, every phase in one process, as the Flower relay
    runs it: each participant absorbs what is in flight to it (``absorb(i)``, with the rule of round ``t + 1``) and
    hands in its contribution, the owners average their segments, each participant takes the averages. Bits of
    every merge message that travels are charged to ``sent`` / ``received``. The in-process loop and the drop-in
    strategy (which holds every node's state) both merge with this."""
    for i in participants:
        absorb(i)
    relay.open(t, participants)
    for i in participants:
        relay.give(i, node_contribute(setup, states[i], i, t), states[i].y)
    orders, transfers = relay.assign()
    count(transfers, sent, received)
    for owner, segs in orders.items():
        relay.take_average(owner, node_reduce(setup, states[owner], owner, t, segs))
    outcome = relay.close()
    for i in participants:
        count(relay.transfers(i, outcome), sent, received)
        node_take(setup, states[i], i, outcome)
    return outcome
