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
``cross_gradient_probe_s<seeds>.json`` and ``.md`` (seeds joined by ``-``; about 23 minutes a seed on one thread).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from flower_sparsepush.simulations.gradient_swap import in_neighbour, swapped_gradient
from flower_sparsepush.simulations.report_files import write_report

ROW, PARTITION = "scsp-h1-q8m-klr-la5", "dirichlet:0.1"


def run_seed(seed: int) -> dict[str, Any]:
    from flower_sparsepush.simulations.claims import plan, run_row

    from flower_sparsepush.learn.seeds import generator
    from flower_sparsepush.run.node_train import node_gradient

    def wrap(gradient, setup, node, rnd):
        j = in_neighbour(setup.graph, rnd, node)
        aug = generator(setup.schedule.seed, j, "aug", rnd + 10**6)  # the neighbour's batch, its own augmentation

        def cross(point, k):
            g, loss = gradient(point, k)
            gj, _ = node_gradient(setup, point, j, rnd, k, aug)
            return 0.5 * (g + gj), loss

        return cross

    spec = next(
        s for s in plan(["fashion_mnist"], False, (seed,)) if s["id"] == f"fashion_mnist/{PARTITION}/{ROW}/s{seed}"
    )
    with swapped_gradient(wrap):
        r = run_row(spec | {"evals": 4}, "cross_gradient_probe")
    keep = ("id", "seed", "acc_consensus", "acc_node_mean", "acc_node_min", "val_acc_consensus", "bits_per_node")
    return {k: r[k] for k in keep + ("wall_s",)} | {"history": r["history"]}


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
