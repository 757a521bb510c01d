"""Compressed gossip inside its stability limit keeps the nodes together over a long schedule; outside it, it does not.

The consensus step size gamma must shrink with the kept fraction (results/stability.md maps the limit on model-sized
vectors). This is the training-side proof on a small model: 8 nodes, top-1% + 4-bit messages, a cosine schedule of
240 rounds. Inside the limit the nodes' consensus distance stays bounded and shrinks as the learning rate does; at
gamma 0.5 the same run drifts apart and the worst node's accuracy falls.
"""

from functools import cache

from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess


@cache  # the stable run serves both tests
def _run(gamma: float):
    cfg = validate(
        {
            "dataset": "synthetic",
            "model": "mlp",
            "num-nodes": 8,
            "graph": "exponential",
            "compressor": "topk:0.01+q:4",
            "gamma": gamma,
            "num-rounds": 240,
            "lr": 0.1,
            "lr-schedule": "cosine",
            "eval-node-samples": 200,
        }  # fmt: skip
    )
    return run_inprocess(cfg, eval_every=40).history


def test_inside_the_limit_the_distance_is_bounded_and_shrinks_with_the_learning_rate():
    h = _run(0.05)
    dist = [m["consensus_distance"] for m in h]
    assert max(dist) <= 1.5 * dist[0]  # bounded: never far above where the first evaluation found it
    assert all(b < a for a, b in zip(dist[2:], dist[3:]))  # shrinking as the cosine learning rate falls
    assert dist[-1] < dist[0] / 2
    assert h[-1]["acc_node_min"] > 0.75


def test_outside_the_limit_the_nodes_drift_apart():
    stable, unstable = _run(0.05), _run(0.5)
    dist = [m["consensus_distance"] for m in unstable]
    assert dist[-1] > 3 * dist[0]  # grows although the learning rate goes to zero
    assert dist[-1] > 10 * stable[-1]["consensus_distance"]
    assert unstable[-1]["acc_node_min"] < stable[-1]["acc_node_min"] - 0.05
