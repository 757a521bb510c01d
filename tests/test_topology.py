"""Graph schedules: peers follow their definitions; mixing is column-stochastic; the connectivity check works."""

import math

import numpy as np
import pytest

from flower_sparsepush.core import topology
from flower_sparsepush.core.topology import Graph, GraphError, check_strongly_connected, make_graph, torus_shape

ALL_SPECS = ["ring", "exponential", "exponential-multi:2", "random-out:2", "complete", "undirected-ring", "torus"]


@pytest.mark.parametrize("n", [2, 3, 8, 12, 16, 33])
def test_exponential_peers_follow_the_definition(n):
    g = make_graph("exponential", n)
    m = max(1, math.ceil(math.log2(n)))
    for t in range(3 * m):
        for i, outs in enumerate(g.out_neighbours(t)):
            assert outs == [(i + 2 ** (t % m)) % n]
    # every round is a permutation: each node also has exactly one in-neighbour
    for t in range(m):
        ins = sorted(j for outs in g.out_neighbours(t) for j in outs)
        assert ins == list(range(n))


def test_exponential_non_power_of_two_cycles_all_distances_and_never_self_sends():
    g = make_graph("exponential", 12)  # m = ceil(log2 12) = 4: distances 1, 2, 4, 8
    assert g.period == 4
    assert [g.out_neighbours(t)[0] for t in range(5)] == [[1], [2], [4], [8], [1]]
    check_strongly_connected(g)


def test_multi_peer_exponential_sends_to_consecutive_distances():
    g = make_graph("exponential-multi:2", 16)
    assert g.out_neighbours(0)[0] == [1, 2]
    assert g.out_neighbours(1)[0] == [4, 8]
    assert g.out_neighbours(2)[3] == [4, 5]
    assert g.default_window == 2
    check_strongly_connected(g)


def test_random_out_is_seeded_redrawn_and_has_uneven_in_degrees():
    a, b = make_graph("random-out:2", 20, seed=3), make_graph("random-out:2", 20, seed=3)
    assert a.out_neighbours(5) == b.out_neighbours(5)
    assert a.out_neighbours(5) != a.out_neighbours(6)
    assert a.out_neighbours(5) != make_graph("random-out:2", 20, seed=4).out_neighbours(5)
    for outs_i, outs in enumerate(a.out_neighbours(0)):
        assert len(outs) == 2 and outs_i not in outs
    in_deg = np.bincount([j for outs in a.out_neighbours(0) for j in outs], minlength=20)
    assert in_deg.min() != in_deg.max()


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_mixing_matrices_are_column_stochastic_and_windows_connected(spec):
    g = make_graph(spec, 16, seed=1)
    for t in range(6):
        p = g.mixing_matrix(t).toarray()
        np.testing.assert_allclose(p.sum(axis=0), 1.0, rtol=1e-12)
        assert (p >= 0).all() and (np.diag(p) > 0).all()
    check_strongly_connected(g)


def test_undirected_graphs_are_doubly_stochastic():
    for spec in ("undirected-ring", "torus"):
        p = make_graph(spec, 16).mixing_matrix(0).toarray()
        np.testing.assert_allclose(p, p.T)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_torus_shape_and_bad_sizes():
    assert torus_shape(16) == (4, 4) and torus_shape(12) == (3, 4)
    assert all(len(o) == 4 for o in make_graph("torus", 16).out_neighbours(0))
    with pytest.raises(GraphError, match="rows x cols"):
        make_graph("torus", 13)


def test_connectivity_check_rejects_a_graph_that_is_never_strongly_connected():
    # two directed rings that never talk to each other
    g = Graph.static([[1], [0], [3], [2]])
    with pytest.raises(GraphError, match=r"'static' with 4 nodes is not strongly connected.*window 3"):
        check_strongly_connected(g, window=3)


def test_connectivity_check_names_the_failing_window():
    # exponential over 16 nodes: round 1 alone (shift 2) splits the nodes into two cycles
    with pytest.raises(GraphError, match=r"rounds 1\.\.1 \(window 1: 2 strongly connected components\)"):
        check_strongly_connected(make_graph("exponential", 16), window=1)


@pytest.mark.parametrize(
    "spec,n,msg",
    [
        ("mesh", 8, "unknown graph 'mesh'"),
        ("random-out:x", 8, "needs an integer"),
        ("random-out:8", 8, r"1\.\.7"),
        ("exponential-multi:4", 8, r"1\.\.3"),
        ("ring:2", 8, "takes no parameter"),
        ("ring", 1, "at least 2 nodes"),
    ],
)
def test_bad_graph_specs_get_clear_errors(spec, n, msg):
    with pytest.raises(GraphError, match=msg):
        make_graph(spec, n)


def test_static_graph_rejects_self_loops_and_out_of_range():
    with pytest.raises(GraphError, match="node 0"):
        Graph.static([[0], [0]])
    with pytest.raises(GraphError, match="node 1"):
        Graph.static([[1], [5]])


def _expected_outs(kind: str, n: int, t: int, i: int) -> list[int]:
    """Each graph's destinations written from its definition, independently of topology.py."""
    if kind == "ring":
        return [(i + 1) % n]
    if kind == "exponential":
        return [(i + 2 ** (t % math.ceil(math.log2(n)))) % n]
    if kind == "complete":
        return [j for j in range(n) if j != i]
    if kind == "undirected-ring":
        return sorted({(i - 1) % n, (i + 1) % n})
    rows, cols = topology.torus_shape(n)
    wrap = lambda d, m: min(d % m, -d % m)  # noqa: E731
    return [  # torus: the nodes one step away in a row or a column, with wrap-around
        j for j in range(n) if j != i and wrap(j // cols - i // cols, rows) + wrap(j % cols - i % cols, cols) == 1
    ]


@pytest.mark.parametrize(
    "kind,n", [("ring", 7), ("exponential", 13), ("complete", 5), ("undirected-ring", 6), ("torus", 12)]
)
def test_out_of_follows_each_graphs_definition(kind, n):
    g = make_graph(kind, n, seed=3)
    for t in range(6):
        assert [g.out_of(t, i) for i in range(n)] == [_expected_outs(kind, n, t, i) for i in range(n)]
    s = Graph.static([[1, 2], [0], [1]])
    assert [s.out_of(0, i) for i in range(3)] == [[1, 2], [0], [1]]
    r = make_graph("random-out:3", 11, seed=3)
    for t in range(4):
        outs = [r.out_of(t, i) for i in range(11)]
        assert all(len(o) == 3 and i not in o and len(set(o)) == 3 for i, o in enumerate(outs))
        assert outs == [make_graph("random-out:3", 11, seed=3).out_of(t, i) for i in range(11)]  # reproducible


def test_out_of_does_not_build_every_nodes_list(monkeypatch):
    """One node's destinations cost O(out-degree): no call of out_neighbours, and random-out draws a round once."""
    calls = {"rows": 0, "draws": 0}
    monkeypatch.setattr(Graph, "out_neighbours", lambda self, t: calls.__setitem__("rows", calls["rows"] + 1))
    for spec in ("ring", "exponential", "exponential-multi:3", "undirected-ring", "torus"):
        g = make_graph(spec, 10_000)
        assert len(g.out_of(5, 9_999)) >= 1
    assert calls["rows"] == 0
    real = np.random.default_rng

    def counting(*a, **k):
        calls["draws"] += 1
        return real(*a, **k)

    monkeypatch.setattr(topology.np.random, "default_rng", counting)
    g = make_graph("random-out:2", 50, seed=11)
    [g.out_of(t, i) for t in (100, 101) for i in range(50)]
    assert calls["draws"] == 2  # one generator per round, not one per node
