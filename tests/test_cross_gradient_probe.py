"""simulations/cross_gradient_probe.py: the neighbour whose data a node borrows is the one that sends to it that round,
a graph without exactly one such neighbour is refused, and bad seeds are refused with what to type."""

import pytest
from flower_sparsepush.simulations.cross_gradient_probe import in_neighbour, main

from flower_sparsepush.core.topology import make_graph


def test_the_borrowed_neighbour_is_the_one_that_sends_to_the_node_that_round():
    g = make_graph("exponential", 16)
    for rnd in range(8):
        for i in range(16):
            j = in_neighbour(g, rnd, i)
            assert g.out_of(rnd, j) == [i] and j == (i - 2 ** (rnd % 4)) % 16
    assert in_neighbour(make_graph("ring", 5), 3, 0) == 4


def test_graphs_without_one_in_neighbour_and_bad_seeds_are_refused(capsys):
    with pytest.raises(SystemExit, match="has 3 in-neighbours"):
        in_neighbour(make_graph("complete", 4), 0, 0)
    with pytest.raises(SystemExit):
        main(["--seeds", "zero"])
    assert "comma-separated whole numbers" in capsys.readouterr().err
