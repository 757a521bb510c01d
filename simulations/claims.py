"""The claims table: FedAvg, SGP, Sparse-Push and SCSP on the same data, model, schedule and seed.

``sparsepush claims`` runs every row in this process with the in-process loop (training.run_inprocess, the same
code the Flower ClientApp runs; tests/test_flower.py proves the two give the same models), appending each
finished row to ``<out>/claims_rows.jsonl`` so that an interrupted run resumes where it stopped. Then it writes
``claims.json``, ``claims.md`` and the plots ``claims_<dataset>.png``. ``--quick`` is a minutes-long check with
tiny schedules; its files are named ``claims_quick*``. ``--row ID`` runs (or re-runs) one row.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

PARTITIONS = ("iid", "skew:0.8", "dirichlet:0.1")

# Per dataset: model and schedule shared by every row (stated in the table). Epochs are passes over the whole
# training set by all nodes together; rounds = ceil(epochs * N / (nodes * batch * local-steps)).
_COMMON = {
    "num-nodes": 16,
    "graph": "exponential",
    "batch-size": 32,
    "local-steps": 1,
    "lr": 0.05,
    "momentum": 0.9,
    "weight-decay": 1e-4,
    "lr-schedule": "cosine",
}
SCHEDULES: dict[str, dict[str, Any]] = {
    "fashion_mnist": _COMMON | {"model": "cnn", "epochs": 2.0, "evals": 4},
    "cifar10": _COMMON | {"model": "resnet20", "epochs": 1.0, "evals": 2},
}
QUICK = {"epochs": 0.1, "evals": 2}

# Compression budgets: (compressor, gamma). The consensus step size shrinks with the kept fraction
# (docs/algorithm.md). gamma 0.2 beat 0.05 at top-0.5%+q:4 in a 1-epoch Fashion-MNIST IID calibration run
# (78.4% vs 75.9% consensus accuracy); it is used for every budget.
BUDGETS = {
    "fashion_mnist": [("topk:0.1", 0.2), ("topk:0.01+q:4", 0.2), ("topk:0.005+q:4", 0.2), ("topk:0.002+q:4", 0.2)],
    "cifar10": [("topk:0.005+q:4", 0.2)],
}
SCSP_BUDGETS = {
    "fashion_mnist": [("topk:0.005+q:4", 0.2), ("topk:0.002+q:4", 0.2)],
    "cifar10": [("topk:0.005+q:4", 0.2)],
}


# SCSP = Sparse-Push + qgm + final gossip (config.py); these rows switch on one ingredient at a time.
ABLATION = {"qgm": {"qgm": True}, "final-gossip": {"final-gossip-rounds": 50}}


def plan(datasets: list[str], quick: bool) -> list[dict[str, Any]]:
    """Every row to run: its id and its run config (before validation)."""
    rows = []
    for ds in datasets:
        sched = SCHEDULES[ds] | (QUICK if quick else {})
        base = {k: v for k, v in sched.items() if k not in ("epochs", "evals")} | {"dataset": ds, "seed": 0}
        for part in PARTITIONS:
            variants = [("fedavg", "none", 1.0, {}), ("sgp", "none", 1.0, {})]
            variants += [("sparse-push", c, g, {}) for c, g in BUDGETS[ds]]
            variants += [("scsp", c, g, {}) for c, g in SCSP_BUDGETS[ds]]
            if part != "iid" and ds == "fashion_mnist":  # SCSP ablation: each ingredient alone, first budget
                c, g = SCSP_BUDGETS[ds][0]
                variants += [("sparse-push+" + name, c, g, sw) for name, sw in ABLATION.items()]
            for label, comp, gamma, switches in variants:
                strategy = label.split("+")[0]
                cfg = base | {"partition": part, "strategy": strategy} | switches
                if strategy in ("sparse-push", "scsp"):
                    cfg |= {"compressor": comp, "gamma": gamma}
                rows.append(
                    {
                        "id": f"{ds}/{part}/{label}/{comp}",
                        "label": label,
                        "cfg": cfg,
                        "epochs": sched["epochs"],
                        "evals": sched["evals"],
                    }
                )
    return rows


def run_row(spec: dict[str, Any], command: str) -> dict[str, Any]:
    """Train one row and return its table entry (numbers measured in this run)."""
    import torch

    from flower_sparsepush.config import validate
    from flower_sparsepush.energy import forward_flops, node_energy
    from flower_sparsepush.training import get_setup, run_inprocess

    torch.set_num_threads(1)
    cfg = dict(spec["cfg"])
    setup_cfg = validate(cfg | {"num-rounds": 1})
    train_size = len(get_setup(setup_cfg).ds.y_train)
    rounds = math.ceil(spec["epochs"] * train_size / (cfg["num-nodes"] * cfg["batch-size"] * cfg["local-steps"]))
    cfg = validate(cfg | {"num-rounds": rounds, "eval-node-samples": 1000})
    total = rounds + cfg["final-gossip-rounds"]
    every = max(1, total // spec["evals"])
    start = time.perf_counter()
    res = run_inprocess(
        cfg,
        eval_every=every,
        log=lambda m: print(f"  {spec['id']}: round {m['round']}/{total} acc {m['acc_consensus']:.4f}", flush=True),
    )
    wall = time.perf_counter() - start
    last = res.history[-1]
    n = cfg["num-nodes"]
    setup = get_setup(cfg)
    flops = forward_flops(setup.model, tuple(setup.ds.input_shape))
    samples = rounds * cfg["local-steps"] * cfg["batch-size"]  # per node; the final gossip phase trains nothing
    energy = node_energy(sum(res.bits_sent) / n, sum(res.bits_received) / n, samples, flops)
    return {
        "id": spec["id"],
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "partition": cfg["partition"],
        "strategy": cfg["strategy"],
        "label": spec["label"],
        "compressor": cfg["compressor"],
        "gamma": cfg["gamma"],
        "form": cfg["form"],
        "qgm": cfg["qgm"],
        "final_gossip_rounds": cfg["final-gossip-rounds"],
        "nodes": n,
        "graph": cfg["graph"],
        "epochs": spec["epochs"],
        "rounds": rounds,
        "local_steps": cfg["local-steps"],
        "batch_size": cfg["batch-size"],
        "seed": cfg["seed"],
        "acc_consensus": last["acc_consensus"],
        "acc_node_mean": last["acc_node_mean"],
        "acc_node_min": last["acc_node_min"],
        "node_eval": "seeded random subset",
        "consensus_distance": last["consensus_distance"],
        "bits_per_node": sum(res.bits_sent) / n,
        "bits_received_per_node": sum(res.bits_received) / n,
        "forward_flops_per_sample": flops,
        "train_samples_per_node": samples,
        **energy,
        "wall_s": wall,
        "history": res.history,
        "command": command,
    }


def finish(rows: list[dict[str, Any]], out: Path, name: str, command: str) -> None:
    """Add reduction_vs_sgp, write the JSON, the Markdown table and the plots."""
    for r in rows:  # FedAvg sends the dense model: its run config's compressor and gamma are unused
        if r["strategy"] == "fedavg":
            r["compressor"], r["gamma"] = "none", 1.0
        if "node_eval" not in r and r["dataset"] == "cifar10":
            # rows run before training.eval_subset evaluated nodes on the first 1,000 test images, which in the
            # class-sorted CIFAR-10 tree are all airplanes: those node accuracies mean nothing
            r["acc_node_mean"] = r["acc_node_min"] = None
    sgp = {(r["dataset"], r["partition"]): r["bits_per_node"] for r in rows if r["strategy"] == "sgp"}
    for r in rows:
        base = sgp.get((r["dataset"], r["partition"]))
        r["reduction_vs_sgp"] = base / r["bits_per_node"] if base and r["bits_per_node"] else None
    (out / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    lines = [
        f"Regenerate: `{command}`. Accuracy = the consensus model (average of the nodes' de-biased models) on "
        "the whole test set; 'nodes' = mean / min of each node's own model on 1,000 test samples (n/a: CIFAR-10 "
        "rows whose node evaluation used the first 1,000 test images, all of one class; fixed since). bits/node = "
        "bits sent per node; bits/node, x vs SGP and energy/node are those of the rightmost partition that ran "
        "(they differ by under 1% between partitions). energy/node = radio (0.5 uJ per bit sent or received) + "
        "compute (2.3 pJ/FLOP x 3 x forward FLOPs per training sample); defaults and sources in "
        "flower_sparsepush/energy.py.",
        "",
    ]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == ds]
        s = sub[0]
        label = "CIFAR-10 (JPEG q75 copy)" if ds == "cifar10" else "Fashion-MNIST"
        lines += [
            f"### {label}, {s['model']}, {s['nodes']} nodes, {s['graph']} graph, {s['epochs']:g} epochs "
            f"({s['rounds']} rounds x {s['local_steps']} local step(s), batch {s['batch_size']}/node), seed {s['seed']}",
            "",
            "| strategy | compressor | gamma | "
            + " | ".join(PARTITIONS)
            + " | bits/node | x vs SGP | energy/node J (radio+compute) |",
            "|---|---|---|" + "---|" * len(PARTITIONS) + "---|---|---|",
        ]
        for key in dict.fromkeys((r["label"], r["compressor"], r["gamma"]) for r in sub):
            cells, bits, red, energy = [], None, None, ""
            for part in PARTITIONS:
                hit = [r for r in sub if (r["label"], r["compressor"], r["gamma"]) == key and r["partition"] == part]
                if hit:
                    h = hit[0]
                    nodes = (
                        f"nodes {100 * h['acc_node_mean']:.1f}/{100 * h['acc_node_min']:.1f}"
                        if h["acc_node_mean"] is not None
                        else "nodes n/a"
                    )
                    cells.append(f"{100 * h['acc_consensus']:.2f} ({nodes})")
                    bits, red = h["bits_per_node"], h["reduction_vs_sgp"]
                    energy = f"{h['energy_j']:.3g} ({h['energy_radio_j']:.3g}+{h['energy_compute_j']:.3g})"
                else:
                    cells.append("not run")
            red_s = f"{red:.0f}" if red else "-"
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]:g} | " + " | ".join(cells) + f" | {bits:.3g} | {red_s} | {energy} |"
            )
        lines.append("")
    (out / f"{name}.md").write_text("\n".join(lines))
    plot(rows, out, name)


def plot(rows: list[dict[str, Any]], out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds in dict.fromkeys(r["dataset"] for r in rows):
        fig, axes = plt.subplots(2, len(PARTITIONS), figsize=(5 * len(PARTITIONS), 8), squeeze=False)
        for col, part in enumerate(PARTITIONS):
            for r in (r for r in rows if r["dataset"] == ds and r["partition"] == part):
                label = r["label"] + ("" if r["compressor"] == "none" else f" {r['compressor']}")
                h = r["history"]
                bits = [max(m["bits_sent_per_node"], 1.0) for m in h]
                acc = [100 * m["acc_consensus"] for m in h]
                style = "--" if r["strategy"] == "scsp" else (":" if "+" in r["label"] else "-")
                axes[0][col].plot(bits, acc, style, marker="o", ms=3, label=label)
                axes[1][col].plot([m["round"] for m in h], acc, style, marker="o", ms=3, label=label)
            axes[0][col].set_xscale("log")
            axes[0][col].set(title=f"{ds} {part}", xlabel="cumulative bits sent per node", ylabel="accuracy (%)")
            axes[1][col].set(xlabel="round", ylabel="accuracy (%)")
        for ax in axes[0]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{name}_{ds}.png", dpi=80)
        plt.close(fig)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "claims_quick" if args.quick else "claims"
    datasets = args.datasets.split(",")
    for ds in datasets:
        if ds not in SCHEDULES:
            raise ValueError(f"unknown dataset {ds!r} for claims; choose from {', '.join(SCHEDULES)}")
    specs = plan(datasets, args.quick)
    if args.row:
        specs = [s for s in specs if s["id"] == args.row]
        if not specs:
            raise ValueError(f"no claims row {args.row!r}; ids look like fashion_mnist/iid/sparse-push/topk:0.01+q:4")
    journal = out / f"{name}_rows.jsonl"
    done = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            r = json.loads(line)
            done[r["id"]] = r
    quick = " --quick" if args.quick else ""
    for k, spec in enumerate(specs):
        if spec["id"] in done and not args.row:
            continue
        print(f"[{k + 1}/{len(specs)}] {spec['id']}", flush=True)
        row = run_row(spec, f"sparsepush claims{quick} --datasets {spec['cfg']['dataset']} --row {spec['id']}")
        done[spec["id"]] = row
        with journal.open("a") as f:
            f.write(json.dumps(row) + "\n")
    rows = [done[s["id"]] for s in plan(datasets, args.quick) if s["id"] in done]
    finish(rows, out, name, f"sparsepush claims{quick} --datasets {','.join(datasets)}")
    print((out / f"{name}.md").read_text())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("claims", help="the claims table: FedAvg vs SGP vs Sparse-Push vs SCSP (long)")
    p.add_argument("--quick", action="store_true", help="tiny schedules: a check that takes minutes")
    p.add_argument("--datasets", default="fashion_mnist,cifar10", help="comma-separated: fashion_mnist, cifar10")
    p.add_argument("--row", default="", help="run only this row id (see claims_rows.jsonl)")
    p.add_argument("--out", default="results", help="output folder")
    p.set_defaults(func=main)
