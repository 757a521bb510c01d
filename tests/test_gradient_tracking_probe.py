"""simulations/gradient_tracking_probe.py: its tracker keeps the invariant gradient tracking rests on (the trackers'
mean is the gradients' mean every round), tracks a fixed gradient field exactly, and refuses a graph its mixing does
not fit."""

import pytest
import torch
from flower_sparsepush.simulations.gradient_tracking_probe import Tracker, main

from flower_sparsepush.core.topology import make_graph


def _rounds(tracker: Tracker, grads, rounds: int) -> None:
    for rnd in range(rounds):
        for i in range(tracker.graph.n):
            tracker.track(i, rnd, grads(i, rnd))


def test_the_trackers_mean_is_the_gradients_mean_every_round():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 16, 5, generator=gen, dtype=torch.float64)
    tracker = Tracker(make_graph("exponential", 16), 0.3)
    for rnd in range(40):
        for i in range(16):
            tracker.track(i, rnd, noise[rnd, i])
        t = torch.stack([tracker.t[i] for i in range(16)])
        assert torch.allclose(t.mean(0), noise[rnd].mean(0), atol=1e-12)


def test_fixed_gradients_are_tracked_to_their_mean_and_without_mixing_nothing_is():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(16, 5, generator=gen, dtype=torch.float64)  # each node's gradient, the same every round
    mixed = Tracker(make_graph("exponential", 16), 0.5)
    _rounds(mixed, lambda i, rnd: g[i], 8)  # gt = 1/2 on the one-peer exponential graph: exact after 4 rounds
    for i in range(16):
        assert torch.allclose(mixed.t[i], g.mean(0), atol=1e-12)
    alone = Tracker(make_graph("ring", 16), 0.0)
    _rounds(alone, lambda i, rnd: g[i], 8)
    assert all(torch.equal(alone.t[i], g[i]) for i in range(16))


def test_a_graph_with_several_in_neighbours_and_a_short_run_are_refused(capsys):
    with pytest.raises(SystemExit, match="one in- and one out-neighbour"):
        Tracker(make_graph("complete", 4), 0.5)
    with pytest.raises(SystemExit):
        main(["--rounds", "10"])
    assert "--rounds: at least 25" in capsys.readouterr().err
