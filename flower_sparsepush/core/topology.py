"""Communication graphs: who sends to whom in round t.

A graph is a schedule of directed edges. ``graph.out_neighbours(t)`` returns, for round ``t``, one sorted
list of out-neighbours per node. Mixing weights are uniform and column-stochastic: a node with ``d`` out-neighbours
keeps ``1/(d+1)`` of its mass and sends ``1/(d+1)`` to each out-neighbour. No Flower imports here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

GRAPH_NAMES = ("ring", "exponential", "exponential-multi:P", "random-out:K", "complete", "undirected-ring", "torus")


class GraphError(ValueError):
    """A graph name, size or schedule that cannot be used."""


@dataclass(frozen=True)
class Graph:
    """A (possibly time-varying) directed communication graph over ``n`` nodes.

    ``kind`` is one of the names in :data:`GRAPH_NAMES` (without the parameter), ``param`` its integer parameter
    (peers per round or out-degree), ``seed`` the seed of random graphs.
    """

    kind: str
    n: int
    param: int = 0
    seed: int = 0
    edges: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def static(cls, out_lists: list[list[int]]) -> Graph:
        """A fixed graph from explicit out-neighbour lists (one list per node)."""
        n = len(out_lists)
        for i, outs in enumerate(out_lists):
            if any(not 0 <= j < n or j == i for j in outs) or len(set(outs)) != len(outs):
                raise GraphError(
                    f"static graph: node {i} has invalid out-neighbours {outs} "
                    f"(need distinct ids in 0..{n - 1}, not {i})"
                )
        return cls("static", n, 0, 0, tuple(tuple(sorted(o)) for o in out_lists))

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.param}" if self.kind in ("exponential-multi", "random-out") else self.kind

    @property
    def period(self) -> int | None:
        """Rounds after which the schedule repeats (None for random graphs)."""
        if self.kind in ("exponential", "exponential-multi"):
            return _log2_ceil(self.n)
        if self.kind == "random-out":
            return None
        return 1

    @property
    def default_window(self) -> int:
        """Rounds whose union must be strongly connected: the schedule's period, or log2(n) for random graphs."""
        if self.kind == "exponential-multi":
            return math.ceil(_log2_ceil(self.n) / self.param)
        return self.period or _log2_ceil(self.n)

    def out_neighbours(self, t: int) -> list[list[int]]:
        """Out-neighbours of every node in round ``t`` (sorted, no self-loops, no repeats): :meth:`out_of` of each."""
        return [self.out_of(t, i) for i in range(self.n)]

    def out_of(self, t: int, i: int) -> list[int]:
        """Out-neighbours of node ``i`` in round ``t``: ``out_neighbours(t)[i]`` without building every node's list.

        O(out-degree) for the deterministic graphs (a node computing its own destinations does not pay for all n
        nodes: at n nodes that would make a round O(n^2)). ``random-out`` draws all nodes' choices from one
        per-round generator, so its round ``t`` is computed once and kept (:func:`_random_out_round`); ``static``
        reads its stored edges.
        """
        n, k = self.n, self.kind
        if not 0 <= i < n:
            raise GraphError(f"node {i} is not in 0..{n - 1}")
        if k == "static":
            return list(self.edges[i])
        if k == "ring":
            return [(i + 1) % n]
        if k == "exponential":
            return [(i + 2 ** (t % _log2_ceil(n))) % n]
        if k == "exponential-multi":
            m = _log2_ceil(n)
            return sorted((i + 2 ** ((t * self.param + p) % m)) % n for p in range(self.param))
        if k == "random-out":
            return list(_random_out_round(n, self.param, self.seed, t)[i])
        if k == "complete":
            return [j for j in range(n) if j != i]
        if k == "undirected-ring":
            return sorted({(i - 1) % n, (i + 1) % n})
        if k == "torus":
            rows, cols = torus_shape(n)
            r, c = divmod(i, cols)
            nb = {
                ((r - 1) % rows) * cols + c,
                ((r + 1) % rows) * cols + c,
                r * cols + (c - 1) % cols,
                r * cols + (c + 1) % cols,
            }
            nb.discard(i)
            return sorted(nb)
        raise GraphError(f"unknown graph kind {k!r}")

    def mixing_weights(self, t: int) -> list[float]:
        """The weight ``1/(d_out+1)`` each node gives to itself and to each out-neighbour in round ``t``."""
        return [1.0 / (len(o) + 1) for o in self.out_neighbours(t)]

    def mixing_matrix(self, t: int) -> sp.csr_matrix:
        """Column-stochastic P(t) with ``P[j, i]`` the fraction of node i's mass that goes to node j."""
        rows, cols, vals = [], [], []
        for i, outs in enumerate(self.out_neighbours(t)):
            w = 1.0 / (len(outs) + 1)
            for j in [i, *outs]:
                rows.append(j)
                cols.append(i)
                vals.append(w)
        return sp.csr_matrix((vals, (rows, cols)), shape=(self.n, self.n))


@functools.lru_cache(maxsize=4)
def _random_out_round(n: int, k: int, seed: int, t: int) -> tuple[tuple[int, ...], ...]:
    """Every node's ``k`` random out-neighbours in round ``t`` (one generator per round, nodes in order); the last
    few rounds are kept, so the nodes of a round computed in one process draw them once."""
    rng = np.random.default_rng([seed, t])
    out = []
    for i in range(n):
        others = rng.choice(n - 1, size=k, replace=False)
        out.append(tuple(sorted(int(j + (j >= i)) for j in others)))
    return tuple(out)


def _log2_ceil(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


def torus_shape(n: int) -> tuple[int, int]:
    """The most square ``rows x cols = n`` with both sides at least 2."""
    for rows in range(int(math.isqrt(n)), 1, -1):
        if n % rows == 0:
            return rows, n // rows
    raise GraphError(
        f"torus needs a node count that factors as rows x cols with both >= 2; {n} does not (try 16 or 12)"
    )


def make_graph(spec: str, n: int, seed: int = 0) -> Graph:
    """Parse a graph name such as ``exponential`` or ``random-out:2`` for ``n`` nodes."""
    if not isinstance(n, int) or n < 2:
        raise GraphError(f"a graph needs at least 2 nodes, got {n!r}")
    kind, _, arg = str(spec).partition(":")
    valid = ", ".join(GRAPH_NAMES)
    if kind in ("exponential-multi", "random-out"):
        try:
            param = int(arg)
        except ValueError:
            raise GraphError(f"graph {spec!r}: {kind} needs an integer after ':', e.g. {kind}:2") from None
        limit = _log2_ceil(n) if kind == "exponential-multi" else n - 1
        if not 1 <= param <= limit:
            raise GraphError(f"graph {spec!r}: the parameter must be in 1..{limit} for {n} nodes")
        return Graph(kind, n, param, seed)
    if arg:
        raise GraphError(f"graph {spec!r}: {kind!r} takes no parameter; valid graphs: {valid}")
    if kind not in ("ring", "exponential", "complete", "undirected-ring", "torus"):
        raise GraphError(f"unknown graph {spec!r}; valid graphs: {valid}")
    if kind == "undirected-ring" and n < 3:
        raise GraphError("undirected-ring needs at least 3 nodes")
    if kind == "torus":
        torus_shape(n)
    return Graph(kind, n, 0, seed)


def check_strongly_connected(graph: Graph, window: int | None = None, rounds: int | None = None) -> None:
    """Raise :class:`GraphError` unless the union of every ``window`` consecutive rounds is strongly connected.

    Windows starting at rounds ``0 .. rounds-window`` are checked (by default one period, or 4 windows for random
    graphs), which is what push-sum needs to reach the average.
    """
    window = window or graph.default_window
    if window < 1:
        raise GraphError(f"window must be >= 1, got {window}")
    starts = graph.period if graph.period is not None else 4 * window
    if rounds is not None:
        starts = max(1, min(starts, rounds - window + 1))
    for t0 in range(starts):
        union = sum(graph.mixing_matrix(t) for t in range(t0, t0 + window))
        count, _ = connected_components(union, directed=True, connection="strong")
        if count > 1:
            raise GraphError(
                f"graph {graph.name!r} with {graph.n} nodes is not strongly connected over rounds "
                f"{t0}..{t0 + window - 1} (window {window}: {count} strongly connected components); "
                "push-sum cannot reach the average: use a larger window or another graph"
            )
