"""What the gradient diagnostics share: swapping the gradient a node's local SGD steps along, in this process only,
and the one in-neighbour a node has in a round of a one-peer graph. Not a run-config switch: nothing outside the
``with`` block, and no Flower path, sees the swap."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# (the gradient function local SGD would use, setup, node, round) -> the gradient function it uses instead
Wrap = Callable[[Callable, object, int, int], Callable]


def in_neighbour(graph, rnd: int, i: int) -> int:
    """The node that sends to ``i`` in round ``rnd`` (graphs with one in-neighbour per round)."""
    senders = [j for j in range(graph.n) if i in graph.out_of(rnd, j)]
    if len(senders) != 1:
        raise SystemExit(f"graph {graph.name}: node {i} has {len(senders)} in-neighbours in round {rnd}; need one")
    return senders[0]


@contextmanager
def swapped_gradient(
    wrap: Wrap, after: Callable[[object, int, int, torch.Tensor], None] | None = None
) -> Iterator[None]:
    """Within the block, ``run.node_train.local_sgd`` steps along ``wrap(gradient, setup, node, rnd)`` instead of
    ``gradient`` (``learn.sgd.sgd_steps`` is handed the wrapped function), and ``after(setup, node, rnd, z_new)`` is
    called after each node's local SGD. Restored on leaving, also on an error."""
    from flower_sparsepush.run import node_train

    local_sgd, sgd_steps = node_train.local_sgd, node_train.sgd_steps
    now: dict = {}

    def local_sgd_here(setup, z, momentum, node, rnd, **kw):
        now.update(setup=setup, node=node, rnd=rnd)
        out = local_sgd(setup, z, momentum, node, rnd, **kw)
        if after is not None:
            after(setup, node, rnd, out[0])
        return out

    def sgd_steps_here(z, buf, steps, gradient, hp, *rest):
        return sgd_steps(z, buf, steps, wrap(gradient, now["setup"], now["node"], now["rnd"]), hp, *rest)

    node_train.local_sgd, node_train.sgd_steps = local_sgd_here, sgd_steps_here
    try:
        yield
    finally:
        node_train.local_sgd, node_train.sgd_steps = local_sgd, sgd_steps
