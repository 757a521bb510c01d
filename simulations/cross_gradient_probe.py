"""Would cross-gradients rescue SCSP under label skew? A diagnostic with free, exact cross-gradients.

Cross-gradient methods (CGA, Esfandiari et al. 2021; NGC, Aketi et al. 2022) let node i step along gradients of its
neighbours' data taken at its own model: node j computes the gradient of its data at its copy of ``z_i`` and sends it
back. Here node i steps along the mean of its own gradient and its in-neighbour's data gradient of this round, both at
the point where i reads its gradients (``gradient-lookahead``), with the neighbour's gradient computed exactly at that
point and exchanged for free (no bits counted, twice the SGD compute): an upper bound on what a compressed
cross-gradient could do. It is not a run-config switch; this module swaps the gradient that ``run.node_train`` hands
to ``learn.sgd.sgd_steps``, in this process only, and runs the full 20-epoch ``scsp-400x`` claims row
(``scsp-h1-q8m-klr-la5``) on ``dirichlet:0.1``. The model gossip, its bits and the final merge are the row's.

``python -m flower_sparsepush.simulations.cross_gradient_probe [--seeds 0] [--out results]`` writes
``cross_gradient_probe.json`` and ``.md`` (about 23 minutes a seed on one thread).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from flower_sparsepush.simulations.report_files import write_report

ROW, PARTITION = "scsp-h1-q8m-klr-la5", "dirichlet:0.1"


def in_neighbour(graph, rnd: int, i: int) -> int:
    """The node that sends to ``i`` in round ``rnd`` (graphs with one in-neighbour per round)."""
    senders = [j for j in range(graph.n) if i in graph.out_of(rnd, j)]
    if len(senders) != 1:
        raise SystemExit(f"graph {graph.name}: node {i} has {len(senders)} in-neighbours in round {rnd}; need one")
    return senders[0]


def run_seed(seed: int) -> dict[str, Any]:
    from flower_sparsepush.simulations.claims import plan, run_row

    from flower_sparsepush.learn.evaluate import load_flat
    from flower_sparsepush.learn.seeds import generator
    from flower_sparsepush.run import node_train

    now: dict[str, Any] = {}
    local_sgd, sgd_steps = node_train.local_sgd, node_train.sgd_steps

    def local_sgd_here(setup, z, momentum, node, rnd, **kw):
        now.update(setup=setup, node=node, rnd=rnd)
        return local_sgd(setup, z, momentum, node, rnd, **kw)

    def sgd_steps_here(z, buf, steps, gradient, hp, *rest):
        setup, node, rnd = now["setup"], now["node"], now["rnd"]
        j = in_neighbour(setup.graph, rnd, node)
        aug = generator(setup.schedule.seed, j, "aug", rnd + 10**6)  # the neighbour's batch, its own augmentation

        def cross(point, k):
            g, loss = gradient(point, k)
            model = setup.model
            load_flat(model, point)
            xb, yb = node_train.node_batch(setup, j, rnd, k, aug)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            gj = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()]
            )
            return 0.5 * (g + gj), loss

        return sgd_steps(z, buf, steps, cross, hp, *rest)

    spec = next(
        s for s in plan(["fashion_mnist"], False, (seed,)) if s["id"] == f"fashion_mnist/{PARTITION}/{ROW}/s{seed}"
    )
    node_train.local_sgd, node_train.sgd_steps = local_sgd_here, sgd_steps_here
    try:
        r = run_row(spec | {"evals": 4}, "cross_gradient_probe")
    finally:
        node_train.local_sgd, node_train.sgd_steps = local_sgd, sgd_steps
    keep = (
        "id",
        "seed",
        "acc_consensus",
        "acc_node_mean",
        "acc_node_min",
        "val_acc_consensus",
        "bits_per_node",
        "wall_s",
    )
    return {k: r[k] for k in keep} | {"history": r["history"]}


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Regenerate: `{command}`. `{ROW}` on `{PARTITION}`, 20 epochs, each node stepping along the mean of its own "
        "gradient and its in-neighbour's data gradient at its own point (free, exact; simulations/cross_gradient_probe.py). "
        "Test accuracy of the consensus model (= every node's after the final merge), validation in brackets.",
        "",
        "| seed | consensus | node min | bits per node |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {100 * r['acc_consensus']:.2f} ({100 * r['val_acc_consensus']:.2f}) | "
            f"{100 * r['acc_node_min']:.2f} | {r['bits_per_node']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: comma-separated whole numbers, e.g. 0,1,2")
    torch.set_num_threads(1)
    rows = [run_seed(s) for s in seeds]
    command = f"python -m flower_sparsepush.simulations.cross_gradient_probe --seeds {args.seeds} --out {args.out}"
    write_report(
        args.out, f"cross_gradient_probe_s{args.seeds.replace(',', '-')}", command, rows, to_markdown(rows, command)
    )


if __name__ == "__main__":
    main()
