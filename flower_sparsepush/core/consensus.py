"""Averaging-only experiments: gossip from random vectors with no training, to see what a graph, a compressor and
a step size do to consensus, mass and bits. Every message is really encoded and decoded."""

from __future__ import annotations

import time

import torch

from flower_sparsepush.core.codec import message_entropy_bits
from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.node import Node
from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.core.topology import check_strongly_connected, make_graph


def run_consensus(
    nodes: int,
    graph: str = "exponential",
    compressor: str = "topk:0.01",
    gamma: float = 0.05,
    rounds: int = 1000,
    dim: int = 1000,
    seed: int = 0,
    form: str = "ref",
    trace_every: int = 0,
    drop: float = 0.0,
    link_down: float = 0.0,
    churn: float = 0.0,
    bounce: bool = True,
) -> dict:
    """Run ``rounds`` gossip rounds from random float64 vectors and report how close every node got to the average.

    ``consensus_error`` is ``max_i ||z_i - mean_0|| / ||mean_0||``; ``mass_error`` the relative change of
    ``sum_i x_i``; ``weight_mass_error`` that of ``sum_i y_i``; bits are 8 x encoded message lengths. Each round
    every online node absorbs its mailbox (and takes back bounced messages), then sends. ``drop``, ``link_down``
    and ``churn`` model the network (router.py); messages still held after the last round are delivered before
    the errors are measured.
    """
    g = make_graph(graph, nodes, seed)
    check_strongly_connected(g, rounds=rounds)
    if dim < 1 or rounds < 1:
        raise ValueError(f"dim and rounds must be >= 1, got dim={dim}, rounds={rounds}")
    rule = PushSum(make_compressor(compressor, seed=seed), gamma, form)
    router = Router(nodes, Network(drop=drop, link_down=link_down, churn=churn, seed=seed), bounce=bounce)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(nodes, dim, generator=gen, dtype=torch.float64)
    mean0, total0 = x0.mean(0), x0.sum(0)
    outs = lambda i: lambda t: g.out_of(t, i)  # noqa: E731
    peers = [Node(i, rule.init_state(x0[i]), lambda t: rule, outs(i)) for i in range(nodes)]
    states = [p.state for p in peers]

    def error() -> float:
        return max(float((s.z - mean0).norm() / mean0.norm()) for s in states)

    start = time.perf_counter()
    bits, entropy, trace = _gossip(peers, router, rounds, trace_every, error)
    for i in range(nodes):  # deliver what is still in flight
        peers[i].begin(rounds, *router.collect(i))
    wall = time.perf_counter() - start
    total = sum(s.x for s in states)
    result = {
        "nodes": nodes,
        "graph": g.name,
        "compressor": rule.compressor.spec,
        "gamma": gamma,
        "form": form,
        "dim": dim,
        "seed": seed,
        "rounds": rounds,
        "consensus_error": error(),
        "mass_error": float((total - total0).norm() / total0.norm()),
        "weight_mass_error": abs(sum(s.y for s in states) - nodes) / nodes,
        "bits_per_node_per_round": bits / nodes / rounds,
        "entropy_ratio": bits / entropy if entropy else float("nan"),
        "drop": drop,
        "link_down": link_down,
        "churn": churn,
        "bounce": bounce,
        "messages_dropped": router.dropped,
        "wall_s": wall,
    }
    if trace:
        result["trace"] = trace
    return result


def _gossip(peers: list[Node], router: Router, rounds: int, trace_every: int, error) -> tuple[float, float, list]:
    """``rounds`` gossip rounds: every online node absorbs its mailbox, then sends; returns (bits sent, their
    entropy bound in bits, the consensus-error trace every ``trace_every`` rounds)."""
    bits = entropy = 0.0
    trace = []
    for t in range(rounds):
        online = [i for i in range(len(peers)) if router.network.online(t, i)]
        for i in online:
            inbox, bounced = router.collect(i)
            peers[i].begin(t, inbox, bounced)
        for i in online:
            msgs = peers[i].finish(t)
            router.post(i, t, msgs)
            for data in msgs.values():
                bits += 8 * len(data)
                entropy += message_entropy_bits(data)
        if trace_every and (t + 1) % trace_every == 0:
            trace.append({"round": t + 1, "consensus_error": error()})
    return bits, entropy, trace
