"""simulations/gradient_swap.py: the swap hands local SGD exactly the wrapped gradient (an identity wrap changes no bit
of a run, a halved one changes it), calls ``after`` once per node and round, and is undone on leaving, also on an
error; the in-neighbour is the round's one sender."""

import pytest
import torch
from flower_sparsepush.simulations.gradient_swap import in_neighbour, swapped_gradient

from flower_sparsepush.core.topology import make_graph
from flower_sparsepush.run import node_train
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess

CFG = {"dataset": "synthetic", "model": "mlp", "num-nodes": 4, "graph": "exponential", "num-rounds": 3,
       "compressor": "topk:0.05+q:4", "gamma": 0.1, "lr": 0.1}  # fmt: skip


def _models(**kw):
    return torch.stack([s.z for s in run_inprocess(validate(CFG | kw)).states])


def test_an_identity_swap_changes_nothing_and_a_changed_gradient_changes_the_run():
    plain, seen = _models(), []
    with swapped_gradient(lambda g, setup, node, rnd: g, lambda setup, node, rnd, z: seen.append((rnd, node))):
        same = _models()
    assert torch.equal(same, plain)
    assert sorted(seen) == [(r, n) for r in range(3) for n in range(4)]

    def halve(g, setup, node, rnd):
        return lambda point, k: (0.5 * g(point, k)[0], g(point, k)[1])

    with swapped_gradient(halve):
        assert not torch.equal(_models(), plain)
    assert torch.equal(_models(), plain)  # undone


def test_the_swap_is_undone_on_an_error_and_the_in_neighbour_is_the_rounds_sender():
    local_sgd, sgd_steps = node_train.local_sgd, node_train.sgd_steps
    with pytest.raises(RuntimeError, match="boom"), swapped_gradient(lambda g, *a: g):
        raise RuntimeError("boom")
    assert (node_train.local_sgd, node_train.sgd_steps) == (local_sgd, sgd_steps)
    g = make_graph("exponential", 16)
    for rnd in range(8):
        for i in range(16):
            j = in_neighbour(g, rnd, i)
            assert g.out_of(rnd, j) == [i] and j == (i - 2 ** (rnd % 4)) % 16
    assert in_neighbour(make_graph("ring", 5), 3, 0) == 4
    with pytest.raises(SystemExit, match="has 3 in-neighbours"):
        in_neighbour(make_graph("complete", 4), 0, 0)
