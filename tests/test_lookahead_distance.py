"""simulations/lookahead_distance.py: the distances it reports are right where the answer is known, and bad input is
refused with what to do."""

import pytest
import torch
from flower_sparsepush.simulations.lookahead_distance import distances, main

from flower_sparsepush.core.pushsum import NodeState


def test_distances_on_nodes_whose_copies_are_exact():
    # three nodes on a line at -1, 0, 2 (average 1/3): each holds exact copies of the other two
    zs = [torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([2.0])]
    states = [NodeState(x=2.0 * z, y=2.0) for z in zs]
    for i, s in enumerate(states):
        s.refs_in = {j: zs[j].clone() for j in range(3) if j != i}
    d = distances(states, (0.5, 1.0))
    assert d["own"] == pytest.approx((4 / 3 + 1 / 3 + 5 / 3) / 3)
    # c = 1: at the mean of the other two, 1, 1/2, -1/2 -> distances 2/3, 1/6, 5/6
    assert d["at"]["1.0"] == pytest.approx((2 / 3 + 1 / 6 + 5 / 6) / 3)
    # c = 1/2: halfway, at 0, 1/4, 3/4 -> 1/3, 1/12, 5/12
    assert d["at"]["0.5"] == pytest.approx((1 / 3 + 1 / 12 + 5 / 12) / 3)
    assert d["at"]["0.5"] < d["own"]


def test_a_node_without_copies_reads_at_its_own_model_and_bad_input_is_refused():
    states = [NodeState(x=torch.tensor([1.0]), y=1.0), NodeState(x=torch.tensor([3.0]), y=1.0)]
    assert distances(states, (0.5,))["at"]["0.5"] == pytest.approx(1.0)  # no copies: the own distance
    with pytest.raises(ValueError, match="no node states"):
        distances([])
    with pytest.raises(SystemExit, match="whole numbers"):
        main(["--rounds", "ten"])
    with pytest.raises(SystemExit, match="not an IID Fashion-MNIST claims row"):
        main(["--row", "nope", "--rounds", "1"])
