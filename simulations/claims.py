"""The claims table: FedAvg, SGP, Sparse-Push and SCSP on the same data, model, schedule and seeds.

``sparsepush claims`` runs every (row, partition, seed) with the in-process loop (training.run_inprocess, the code
the Flower ClientApp runs; tests/test_flower.py ties the two together) and appends each finished run to
``<out>/claims_rows.jsonl``, so an interrupted run resumes where it stopped (``--max-hours`` ends a chunk cleanly
between runs). ``--jobs N`` runs N rows at once in worker processes and ``--device cuda`` batches every node's local
SGD on a GPU (batched.py). Then it writes ``claims.json``, ``claims.md`` and the plots ``claims_<dataset>.png``;
``<out>/claims.status.json`` says how many runs are done of those planned.

Honesty of the numbers: every run holds out ``val-split`` of the training set (per class, seeded by the run seed).
Among the candidate rows of one goal (``group``), the one with the best *validation* score (the worst of consensus,
node mean and node min accuracy, mean over seeds) is marked ``chosen``; its test accuracy is what the goal reads.
SGP and every compressed row share epochs, seeds, data and the validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

PARTITIONS = ("iid", "skew:0.8", "dirichlet:0.1")
SKEWED = ("skew:0.8", "dirichlet:0.1")
SEEDS = (0, 1, 2)

# Per dataset: model and schedule shared by every row. Epochs are passes over the (training minus validation) set
# by all nodes together; rounds = ceil(epochs * N / (nodes * batch * local-steps)).
_COMMON = {
    "num-nodes": 16,
    "graph": "exponential",
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "weight-decay": 1e-4,
    "lr-schedule": "cosine",
    "val-split": 0.1,
}
SCHEDULES: dict[str, dict[str, Any]] = {
    "fashion_mnist": _COMMON | {"model": "cnn", "epochs": 20.0, "evals": 5},
    "cifar10": _COMMON | {"model": "resnet20", "epochs": 10.0, "evals": 2},  # the GPU headline (10 min)
}
QUICK = {"epochs": 0.1, "evals": 2}

# Goals (issue 12): (group, partitions, minimum x vs SGP, margin in accuracy points).
GOALS = [
    ("466x", ("iid",), 466.0, 1.0),
    ("1000x", ("iid",), 1000.0, 2.0),
    ("scsp", SKEWED, 400.0, 1.0),
]

_SP = {"strategy": "sparse-push"}
_MERGE = {"final-merge": True}
_SCSP = {"strategy": "scsp", "qgm": False, "final-gossip-rounds": 0}  # scsp = sparse-push + final merge here


def _sp(h: int, comp: str, gamma: float, **extra: Any) -> dict[str, Any]:
    return (
        _SP
        | {"local-steps": h, "compressor": comp, "gamma": gamma}
        | {k.replace("_", "-"): v for k, v in extra.items()}
    )


# name -> (group, partitions, run-config switches). Candidates of one group compete on the validation split.
ROWS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "sgp": ("baseline", PARTITIONS, {"strategy": "sgp"}),
    "fedavg-h2": ("baseline", SKEWED, {"strategy": "fedavg", "local-steps": 2}),  # H of the SCSP rows it stands by
    "fedavg-h4": ("baseline", SKEWED, {"strategy": "fedavg", "local-steps": 4}),
    # the authors' algorithm: error feedback on x, gamma 0.01 at top-1%, one SGD step per gossip, 50 final rounds
    "paper-ef": ("paper", ("iid",), _sp(1, "topk:0.01", 0.01, form="ef", final_gossip_rounds=50)),
    # the previous table's row made stable (gamma inside the stability limit), nothing else
    "sp-h1": ("466x", ("iid",), _sp(1, "topk:0.005+q:4", 0.05)),
    "sp-h2-fg100": ("466x", ("iid",), _sp(2, "topk:0.01+q:4", 0.1, final_gossip_rounds=100)),
    "sp-h4-merge": ("466x", ("iid",), _sp(4, "topk:0.012+q:4", 0.1) | _MERGE),
    "sp-h8-merge": ("466x", ("iid",), _sp(8, "topk:0.02+q:4", 0.1) | _MERGE),
    "sp-h4-fg100": ("466x", ("iid",), _sp(4, "topk:0.02+q:4", 0.1, final_gossip_rounds=100)),
    "sp-h8-fg100": ("1000x", ("iid",), _sp(8, "topk:0.01+q:4", 0.1, final_gossip_rounds=100)),
    "sp-h4-fg50": ("1000x", ("iid",), _sp(4, "topk:0.008+q:4", 0.1, final_gossip_rounds=50)),
    # the merge's all-reduce in 8 bits (merge-bits=8: a quarter of the exact merge's 2 dense messages), the bits it
    # frees spent on the gossip: a larger kept fraction, which stays stable at a larger gamma
    "sp-h4-q8m-g0.15": ("466x", ("iid",), _sp(4, "topk:0.021+q:4", 0.15, merge_bits=8) | _MERGE),
    "sp-h4-q8m-1000x": ("1000x", ("iid",), _sp(4, "topk:0.0072+q:4", 0.1, merge_bits=8) | _MERGE),
    # sp-h4-merge's gossip with its one exact merge (6.5 Mbit per node) spent as 8-bit merges every 132 rounds (4 in
    # all); and lighter gossip with 6 of them: how much do periodic merges buy on IID data?
    "sp-h4-m8e132": ("466x", ("iid",), _sp(4, "topk:0.012+q:4", 0.1, merge_every=132, merge_bits=8) | _MERGE),
    "sp-h4-m8e88": ("466x", ("iid",), _sp(4, "topk:0.0075+q:4", 0.1, merge_every=88, merge_bits=8) | _MERGE),
    # the bits as frequent cheap merges instead of gossip: 16 4-bit merges (every 33 rounds) or 8 8-bit ones (every
    # 66), with a trickle of gossip (top-0.2%) between them
    "sp-h4-m4e33": ("466x", ("iid",), _sp(4, "topk:0.002+q:4", 0.1, merge_every=33, merge_bits=4) | _MERGE),
    "sp-h4-m8e66": ("466x", ("iid",), _sp(4, "topk:0.002+q:4", 0.1, merge_every=66, merge_bits=8) | _MERGE),
    # sp-h4-m4e33 with error feedback on the merges: what a 4-bit merge rounds away waits for the next one
    "sp-h4-m4e33-ef": (
        "466x",
        ("iid",),
        _sp(4, "topk:0.002+q:4", 0.1, merge_every=33, merge_bits=4, merge_feedback=True) | _MERGE,
    ),
    # sp-h4-merge with the kept fraction following the learning rate (sparsity-schedule=lr: 2.4% at the start, 0.06%
    # at the end, the same bits): the nodes move apart in proportion to their step size
    "sp-h4-klr": ("466x", ("iid",), _sp(4, "topk:0.012+q:4", 0.1, sparsity_schedule="lr") | _MERGE),
    # sp-h4-klr with its exact merge in 8 bits and the freed bits in the gossip (top-2% on average: 4% at the start)
    "sp-h4-klr-q8m": (
        "466x",
        ("iid",),
        _sp(4, "topk:0.02+q:4", 0.1, merge_bits=8, sparsity_schedule="lr") | _MERGE,
    ),
    # the best test row so far, sp-h4-fg100 (top-2%, 100 final gossip rounds), with the kept fraction following the lr
    "sp-h4-klr-fg100": (
        "466x",
        ("iid",),
        _sp(4, "topk:0.02+q:4", 0.1, sparsity_schedule="lr", final_gossip_rounds=100),
    ),
    # fewer local steps (H = 4 alone costs 0.6, abl-sgp-h4) with the cheap 8-bit merge and sparsity-schedule=lr
    "sp-h1-q8m-klr": (
        "466x",
        ("iid",),
        _sp(1, "topk:0.0042+q:4", 0.05, merge_bits=8, sparsity_schedule="lr") | _MERGE,
    ),
    "sp-h2-q8m-klr": (
        "466x",
        ("iid",),
        _sp(2, "topk:0.0087+q:4", 0.1, merge_bits=8, sparsity_schedule="lr") | _MERGE,
    ),
    # the merges in 1 bit (sign x mean magnitude per tensor, merge-bits=1) with error feedback: 1/16 of a dense
    # message each, so 66 of them fit the budget (every 8 rounds = 32 SGD steps) beside a trickle of gossip, or 44
    # (every 12 rounds) beside top-0.7%: local SGD with frequent cheap averaging against gossip
    "sp-h4-m1e8-ef": (
        "466x",
        ("iid",),
        _sp(4, "topk:0.0005+q:4", 0.1, merge_every=8, merge_bits=1, merge_feedback=True) | _MERGE,
    ),
    "sp-h4-m1e12-ef": (
        "466x",
        ("iid",),
        _sp(4, "topk:0.007+q:4", 0.1, merge_every=12, merge_bits=1, merge_feedback=True) | _MERGE,
    ),
    # sp-h4-klr with the kept fraction taken per tensor (topk-layer): global top-k ranks by magnitude, which favours
    # the tensors with large values, not necessarily those whose disagreement costs accuracy
    "sp-h4-klr-layer": ("466x", ("iid",), _sp(4, "topk-layer:0.012+q:4", 0.1, sparsity_schedule="lr") | _MERGE),
    # sp-h4-klr with the gradients taken nearer the nodes' average (gradient-lookahead c: at z + c (mean of the
    # node's copies of its in-neighbours - z)); measured at round 100 of sp-h4-klr, c = 0.8 puts that point 2.4 from
    # the average against 4.1 for the node itself (c = 0.5: 2.6). No bits.
    **{
        f"sp-h4-klr-la{tag}": (
            "466x",
            ("iid",),
            _sp(4, "topk:0.012+q:4", 0.1, sparsity_schedule="lr", gradient_lookahead=c) | _MERGE,
        )
        for tag, c in (("8", 0.8), ("5", 0.5), ("3", 0.3), ("65", 0.65))
    },
    # the 1000x row with gradient-lookahead 0.5
    "sp-h4-q8m-1000x-la5": (
        "1000x",
        ("iid",),
        _sp(4, "topk:0.0072+q:4", 0.1, merge_bits=8, gradient_lookahead=0.5) | _MERGE,
    ),
    # ablations of sp-h4-merge: one switch changed each
    "abl-no-merge": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.1)),
    "abl-gamma-0.2": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.2) | _MERGE),
    # and below 0.1: averaging alone (sparsepush consensus, top-1.2% + q:4, 528 rounds) mixes fastest at 0.035-0.05
    "abl-gamma-0.05": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.05) | _MERGE),
    "abl-gamma-0.07": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.07) | _MERGE),
    "abl-sparsity-warmup": (
        "ablation",
        ("iid",),
        _sp(4, "topk:0.012+q:4", 0.1, sparsity_warmup=50, sparsity_warmup_start=0.1) | _MERGE,
    ),
    "abl-gamma-warmup": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.1, gamma_warmup=50) | _MERGE),
    # sp-h4-merge without compression: separates the damped gossip (gamma 0.1) from what compression costs
    "abl-dense-g0.1": ("ablation", ("iid",), _sp(4, "none", 0.1) | _MERGE),
    # and dense at gamma 0.3: how much faster the gossip must mix than gamma 0.1 for the H = 4 rows to reach SGP-h4
    "abl-dense-g0.3": ("ablation", ("iid",), _sp(4, "none", 0.3) | _MERGE),
    # abl-dense-g0.1 with gradient-lookahead 0.5: how much of what damping costs the lookahead wins back
    "abl-dense-g0.1-la5": ("ablation", ("iid",), _sp(4, "none", 0.1, gradient_lookahead=0.5) | _MERGE),
    # and SGP itself with H = 4 local steps and the merge: what the H = 4 schedule costs without damping
    "abl-sgp-h4": ("ablation", ("iid",), {"strategy": "sgp", "local-steps": 4} | _MERGE),
    "abl-qgm": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.1, qgm=True) | _MERGE),
    # the learning rate of sp-h4-merge: SGP's 0.05 was chosen for dense gossip; damped, compressed gossip leaves the
    # nodes further apart, which a smaller (or larger) step may suit better (chosen on the validation split)
    "abl-lr-0.025": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.1, lr=0.025) | _MERGE),
    "abl-lr-0.1": ("ablation", ("iid",), _sp(4, "topk:0.012+q:4", 0.1, lr=0.1) | _MERGE),
    # SCSP candidates under label skew (docs/algorithm.md: SCSP = Sparse-Push + the switches that recover most)
    "scsp-h1": ("scsp", SKEWED, _sp(1, "topk:0.0025+q:4", 0.02) | _MERGE | _SCSP),
    "scsp-h2": ("scsp", SKEWED, _sp(2, "topk:0.005+q:4", 0.05) | _MERGE | _SCSP),
    "scsp-h4": ("scsp", SKEWED, _sp(4, "topk:0.016+q:4", 0.1) | _MERGE | _SCSP),
    # periodic 8-bit merges (merge-every 88 rounds of H = 4: 6 merges over the run, the last one the final merge)
    # with lightly compressed gossip between them: label skew pulls the nodes apart while they train
    "scsp-h4-m8e88": ("scsp", SKEWED, _sp(4, "topk:0.01+q:4", 0.1, merge_every=88, merge_bits=8) | _MERGE | _SCSP),
    # and with each node's drift away from the merged model subtracted from its gradients (drift-correction)
    "scsp-h4-m8e88-dc": (
        "scsp",
        SKEWED,
        _sp(4, "topk:0.01+q:4", 0.1, merge_every=88, merge_bits=8, drift_correction="displacement") | _MERGE | _SCSP,
    ),
    # the bias estimated from each node's own mean gradient against the nodes' mean (read off the merges' movement)
    "scsp-h4-m8e88-gc": (
        "scsp",
        SKEWED,
        _sp(4, "topk:0.01+q:4", 0.1, merge_every=88, merge_bits=8, drift_correction="gradient") | _MERGE | _SCSP,
    ),
    # the merges in 4 bits with error feedback, so 16 of them (every 33 rounds) fit the budget with light gossip
    "scsp-h4-m4e33-ef": (
        "scsp",
        SKEWED,
        _sp(4, "topk:0.005+q:4", 0.1, merge_every=33, merge_bits=4, merge_feedback=True) | _MERGE | _SCSP,
    ),
    # the best SCSP row with gradient-lookahead 0.5
    "scsp-h4-m8e88-dc-la5": (
        "scsp",
        SKEWED,
        _sp(
            4,
            "topk:0.01+q:4",
            0.1,
            merge_every=88,
            merge_bits=8,
            drift_correction="displacement",
            gradient_lookahead=0.5,
        )
        | _MERGE
        | _SCSP,
    ),
    # the IID 466x row (sp-h4-klr-la5) as it is under label skew: the gradients read nearer the average are what
    # the nodes' mean gradient is unbiased at
    "scsp-h4-klr-la5": (
        "scsp",
        SKEWED,
        _sp(4, "topk:0.012+q:4", 0.1, sparsity_schedule="lr", gradient_lookahead=0.5) | _MERGE | _SCSP,
    ),
    # under label skew fewer local steps matter most (FedAvg: 91.02 at H = 2, 89.16 at H = 4): H = 2 with the 8-bit
    # final merge, the kept fraction following the lr and the lookahead (sp-h2-q8m-klr's bits, 519x)
    "scsp-h2-q8m-klr-la5": (
        "scsp",
        SKEWED,
        _sp(2, "topk:0.0087+q:4", 0.1, merge_bits=8, sparsity_schedule="lr", gradient_lookahead=0.5) | _MERGE | _SCSP,
    ),
    # quasi-global momentum on top of scsp-h2: its buffer diverged to NaN on this schedule (docs/algorithm.md)
    "abl-scsp-h2-qgm": ("ablation", SKEWED, _sp(2, "topk:0.005+q:4", 0.05, qgm=True) | _MERGE | _SCSP),
}
# run order: what the goals need first (a time-limited chunk then still answers the main question)
PRIORITY = ["sgp", "sp-h4-merge", "sp-h8-merge", "sp-h2-fg100", "sp-h4-fg100", "sp-h1", "sp-h8-fg100", "sp-h4-fg50",
            "scsp-h2", "scsp-h1", "scsp-h4", "fedavg-h2", "paper-ef", "abl-no-merge", "abl-qgm",
            "abl-gamma-0.2", "abl-sparsity-warmup", "abl-gamma-warmup", "abl-scsp-h2-qgm", "abl-dense-g0.1", "abl-sgp-h4", "abl-lr-0.025", "abl-lr-0.1", "abl-gamma-0.05", "abl-gamma-0.07",
            "sp-h4-q8m-g0.15", "sp-h4-q8m-1000x", "scsp-h4-m8e88", "fedavg-h4", "sp-h4-m8e132", "sp-h4-m8e88",
            "scsp-h4-m8e88-dc", "scsp-h4-m8e88-gc", "sp-h4-m4e33", "sp-h4-m8e66", "sp-h4-m4e33-ef", "sp-h4-klr",
            "sp-h1-q8m-klr", "sp-h2-q8m-klr", "scsp-h4-m4e33-ef", "sp-h4-klr-q8m", "sp-h4-klr-fg100",
            "sp-h4-m1e8-ef", "sp-h4-m1e12-ef", "abl-dense-g0.3", "sp-h4-klr-layer",
            "sp-h4-klr-la8", "sp-h4-klr-la5", "sp-h4-klr-la3", "sp-h4-klr-la65", "sp-h4-q8m-1000x-la5",
            "abl-dense-g0.1-la5", "scsp-h4-m8e88-dc-la5", "scsp-h4-klr-la5",
            "scsp-h2-q8m-klr-la5"]  # fmt: skip
CIFAR_ROWS = ["sgp", "sp-h4-merge", "sp-h8-fg100"]  # the GPU headline comparison (scripts/gpu_claims.sh)


def plan(datasets: list[str], quick: bool, seeds: tuple[int, ...] = SEEDS) -> list[dict[str, Any]]:
    """Every run: id, row name, group, run config (before validation), epochs and evaluations; priority order."""
    runs = []
    for ds in datasets:
        sched = SCHEDULES[ds] | (QUICK if quick else {})
        base = {k: v for k, v in sched.items() if k not in ("epochs", "evals")} | {"dataset": ds}
        names = CIFAR_ROWS if ds == "cifar10" else PRIORITY
        for name in names:  # row-major: a time-limited chunk finishes the important rows on every seed first
            for seed in seeds:
                group, parts, switches = ROWS[name]
                for part in parts if ds != "cifar10" else ("iid",):
                    runs.append(
                        {
                            "id": f"{ds}/{part}/{name}/s{seed}",
                            "name": name,
                            "group": group,
                            "switches": {k: v for k, v in switches.items() if k != "strategy"},
                            "cfg": base | switches | {"partition": part, "seed": seed},
                            "epochs": sched["epochs"],
                            "evals": sched["evals"],
                            "quick": quick,
                        }
                    )
    return runs


def run_config(spec: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """The validated run config of one planned run: its epochs turned into rounds of its local steps."""
    from flower_sparsepush.run.config import validate
    from flower_sparsepush.run.training import get_setup

    cfg = dict(spec["cfg"]) | {"device": device}
    train_size = get_setup(validate(cfg | {"num-rounds": 1})).train_size
    steps = cfg.get("local-steps", 1)
    rounds = math.ceil(spec["epochs"] * train_size / (cfg["num-nodes"] * cfg["batch-size"] * steps))
    # nodes on the whole test set (1,000 samples in --quick runs, which are checks, not results)
    return validate(cfg | {"num-rounds": rounds, "eval-node-samples": 1000 if spec["quick"] else 0})


def parse_rounds(text: str) -> list[int]:
    """``--rounds`` of the diagnostics that stop a claims row early (residual_energy, lookahead_distance)."""
    try:
        rounds = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--rounds {text!r}: give whole numbers separated by commas, e.g. 40,200") from None
    if min(rounds) < 1:
        raise SystemExit(f"--rounds {text!r}: every round must be 1 or more")
    return rounds


def run_row(spec: dict[str, Any], command: str, device: str = "cpu") -> dict[str, Any]:
    """Train one run and return its journal entry (numbers measured in this run)."""
    import torch

    from flower_sparsepush.core.energy import forward_flops, node_energy
    from flower_sparsepush.run.training import get_setup, run_inprocess

    torch.set_num_threads(1)
    cfg = run_config(spec, device)
    rounds, steps = cfg["num-rounds"], cfg["local-steps"]
    total = rounds + (cfg["final-gossip-rounds"] if cfg["strategy"] != "fedavg" else 0)
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
    samples = rounds * steps * cfg["batch-size"]  # per node; the final gossip phase trains nothing
    energy = node_energy(sum(res.bits_sent) / n, sum(res.bits_received) / n, samples, flops)
    keep = ("acc_consensus", "acc_node_mean", "acc_node_min", "val_acc_consensus", "val_acc_node_mean")
    return {
        "id": spec["id"],
        "name": spec["name"],
        "group": spec["group"],
        "switches": spec["switches"],
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "partition": cfg["partition"],
        "strategy": cfg["strategy"],
        "compressor": "none" if cfg["strategy"] == "fedavg" else cfg["compressor"],
        "gamma": 1.0 if cfg["strategy"] == "fedavg" else cfg["gamma"],
        "form": cfg["form"],
        "nodes": n,
        "graph": cfg["graph"],
        "epochs": spec["epochs"],
        "rounds": rounds,
        "local_steps": steps,
        "batch_size": cfg["batch-size"],
        "val_split": cfg["val-split"],
        "seed": cfg["seed"],
        "device": device,
        **{k: last[k] for k in last if k in keep or k.startswith("val_") or k.startswith("acc_")},
        "consensus_distance": last["consensus_distance"],
        "node_eval": "each node on "
        + ("1,000 seeded test / validation samples" if spec["quick"] else "the whole test set and validation split"),
        "bits_per_node": sum(res.bits_sent) / n,
        "bits_received_per_node": sum(res.bits_received) / n,
        "forward_flops_per_sample": flops,
        "train_samples_per_node": samples,
        **energy,
        "wall_s": wall,
        "history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in res.history],
        "command": command,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values]  # numpy scalars break statistics.stdev on Python 3.12
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, partition, name): means and standard deviations over its seeds, x vs SGP, chosen."""
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault((r["dataset"], r["partition"], r["name"]), []).append(r)
    rows = []
    for (ds, _part, name), rs in by_key.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {k: rs[0][k] for k in ("dataset", "model", "partition", "name", "group", "switches", "strategy",
                                     "compressor", "gamma", "form", "nodes", "graph", "epochs", "rounds",
                                     "local_steps", "batch_size", "val_split")}  # fmt: skip
        row["seeds"] = [r["seed"] for r in rs]
        for key in ("acc_consensus", "acc_node_mean", "acc_node_min", "val_acc_consensus", "val_acc_node_mean",
                    "val_acc_node_min", "bits_per_node", "consensus_distance", "wall_s", "energy_j"):  # fmt: skip
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key], row[f"{key}_std"] = _mean_std(vals)
        row["val_score"] = statistics.fmean(
            min(r["val_acc_consensus"], r["val_acc_node_mean"], r["val_acc_node_min"]) for r in rs
        )
        row["command"] = f"sparsepush claims --datasets {ds} --rows {name}"
        row["per_seed"] = {
            r["seed"]: {k: r[k] for k in ("acc_consensus", "acc_node_mean", "acc_node_min", "bits_per_node")}
            for r in rs
        }
        rows.append(row)
    sgp = {(r["dataset"], r["partition"]): r for r in rows if r["name"] == "sgp"}
    for r in rows:
        base = sgp.get((r["dataset"], r["partition"]))
        r["reduction_vs_sgp"] = base["bits_per_node"] / r["bits_per_node"] if base and r["bits_per_node"] else None
        for key in ("acc_consensus", "acc_node_mean", "acc_node_min"):
            r[f"delta_{key}"] = 100 * (r[key] - base[key]) if base else None
    for group, parts, min_ratio, _ in GOALS:  # the validation split chooses among a goal's candidates
        for ds in {r["dataset"] for r in rows}:
            for part in parts:
                cands = [r for r in rows if (r["dataset"], r["partition"], r["group"]) == (ds, part, group)
                         and (r["reduction_vs_sgp"] or 0) >= min_ratio]  # fmt: skip
                if cands:
                    max(cands, key=lambda r: r["val_score"])["chosen"] = group
    return rows


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of the claims issue, read from the chosen rows: met or by how much it is missed."""
    out = []
    for group, parts, min_ratio, margin in GOALS:
        for part in parts:
            hit = [r for r in rows if r.get("chosen") == group and r["partition"] == part
                   and r["dataset"] == "fashion_mnist"]  # fmt: skip
            if not hit:
                out.append(
                    {"goal": group, "partition": part, "met": False, "why": "no candidate ran or reached the ratio"}
                )
                continue
            r = hit[0]
            worst = min(r["delta_acc_consensus"], r["delta_acc_node_mean"], r["delta_acc_node_min"])
            out.append(
                {
                    "goal": f">= {min_ratio:g}x within {margin:g} point(s) of SGP ({part})",
                    "partition": part,
                    "row": r["name"],
                    "reduction_vs_sgp": r["reduction_vs_sgp"],
                    "worst_delta_points": worst,
                    "seeds": r["seeds"],
                    "met": worst >= -margin and len(r["seeds"]) >= 3,
                }
            )
    return out


def finish(runs: list[dict[str, Any]], out: Path, name: str, command: str) -> dict[str, Any]:
    """Write claims.json (rows, goals), the Markdown table and the plots."""
    rows = aggregate(runs)
    result = {"command": command, "schedules": SCHEDULES, "seeds": sorted({r["seed"] for r in runs}),
              "goals": goals(rows), "rows": rows}  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"Regenerate: `{command}` (resumable; `--jobs 14 --device cuda` on a GPU machine). Test accuracy in %, mean "
        "+- standard deviation over the seeds; consensus = the average of the nodes' models, nodes = each node's own "
        "model (mean / min over nodes, each on the whole test set). val = the worst of the three on the "
        "validation split (10% of each class held out of training), which chooses among a goal's candidates "
        "(marked *). x vs SGP = SGP's bits sent per node / the row's, final phases (merge, gossip-only rounds) "
        "included. delta = row - SGP in points (worst of consensus, node mean, node min).",
        "",
    ]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        s = next(r for r in rows if r["dataset"] == ds)
        label = "CIFAR-10 (JPEG q75 copy)" if ds == "cifar10" else "Fashion-MNIST"
        lines += [
            f"### {label}, {s['model']}, {s['nodes']} nodes, {s['graph']} graph, {s['epochs']:g} epochs, "
            f"batch {s['batch_size']}/node, cosine lr 0.05",
            "",
            "| partition | row | group | H | compressor | gamma | switches | seeds | consensus | nodes mean | nodes min "
            "| val | x vs SGP | delta |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in rows if r["dataset"] == ds), key=lambda r: (PARTITIONS.index(r["partition"]),
                                                                                 r["group"], r["name"])):  # fmt: skip
            sw = ", ".join(f"{k}={v}" for k, v in r["switches"].items()
                           if k not in ("local-steps", "compressor", "gamma")) or "-"  # fmt: skip

            def cell(key: str, r: dict[str, Any] = r) -> str:
                return f"{100 * r[key]:.2f} +- {100 * r[key + '_std']:.2f}"

            worst = min(r["delta_acc_consensus"], r["delta_acc_node_mean"], r["delta_acc_node_min"]) if r[
                "delta_acc_consensus"] is not None else None  # fmt: skip
            lines.append(
                f"| {r['partition']} | {r['name']}{' *' if r.get('chosen') else ''} | {r['group']} | "
                f"{r['local_steps']} | {r['compressor']} | {r['gamma']:g} | {sw} | {len(r['seeds'])} | "
                f"{cell('acc_consensus')} | {cell('acc_node_mean')} | {cell('acc_node_min')} | "
                f"{100 * r['val_score']:.2f} | {r['reduction_vs_sgp'] or 0:.0f} | "
                f"{'-' if worst is None else f'{worst:+.2f}'} |"
            )
        lines.append("")
    lines += ["### Goals (Fashion-MNIST)", ""] if any(r["dataset"] == "fashion_mnist" for r in rows) else []
    for g in result["goals"] if any(r["dataset"] == "fashion_mnist" for r in rows) else []:
        lines.append(f"- {g['goal']}: {'MET' if g['met'] else 'not met'}" + (
            f" (row {g['row']}, {g['reduction_vs_sgp']:.0f}x, worst delta {g['worst_delta_points']:+.2f} points, "
            f"{len(g['seeds'])} seed(s))" if "row" in g else f" ({g['why']})"))  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, out, name)
    return result


def plot(rows: list[dict[str, Any]], out: Path, name: str) -> None:
    """Accuracy (consensus and node min, mean +- std over seeds) against bits sent per node, one panel a partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds in dict.fromkeys(r["dataset"] for r in rows):
        parts = [p for p in PARTITIONS if any(r["partition"] == p and r["dataset"] == ds for r in rows)]
        fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 5), squeeze=False)
        for col, part in enumerate(parts):
            ax = axes[0][col]
            for r in (r for r in rows if r["dataset"] == ds and r["partition"] == part):
                marker = "*" if r.get("chosen") else ("s" if r["name"] == "sgp" else "o")
                h = ax.errorbar(
                    r["bits_per_node"],
                    100 * r["acc_consensus"],
                    yerr=100 * r["acc_consensus_std"],
                    fmt=marker,
                    ms=8,
                    capsize=3,
                    label=f"{r['name']} ({r['reduction_vs_sgp'] or 0:.0f}x)",
                )
                ax.errorbar(r["bits_per_node"], 100 * r["acc_node_min"], yerr=100 * r["acc_node_min_std"], fmt="v",
                            ms=5, capsize=2, color=h[0].get_color(), alpha=0.6)  # fmt: skip
            ax.set_xscale("log")
            ax.set(title=f"{ds} {part} (o/*: consensus, v: node min)", xlabel="bits sent per node",
                   ylabel="test accuracy (%)")  # fmt: skip
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{name}_{ds}.png", dpi=80)
        plt.close(fig)


def _work(spec: dict[str, Any], command: str, device: str) -> dict[str, Any]:
    return run_row(spec, command, device)


def main(args: argparse.Namespace) -> int:
    from flower_sparsepush.run.progress import Progress

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "claims_quick" if args.quick else "claims"
    datasets = args.datasets.split(",")
    for ds in datasets:
        if ds not in SCHEDULES:
            raise ValueError(f"unknown dataset {ds!r} for claims; choose from {', '.join(SCHEDULES)}")
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((0,) if args.quick else SEEDS)
    specs = plan(datasets, args.quick, seeds)
    if args.evals:  # fewer evaluations (the last one always runs): the same result, cheaper on a CPU
        for s in specs:
            s["evals"] = args.evals
    if args.rows:
        want = set(args.rows.split(","))
        unknown = want - set(ROWS)
        if unknown:
            raise ValueError(f"unknown claims row(s) {sorted(unknown)}; rows are: {', '.join(ROWS)}")
        specs = [s for s in specs if s["name"] in want]
    journal = out / f"{name}_rows.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["id"]] = r
    todo = [s for s in specs if s["id"] not in done or args.rerun]
    quick = " --quick" if args.quick else ""
    prog = Progress(len(specs), out / f"{name}.status.json", "claims", unit="runs", initial=len(specs) - len(todo))
    deadline = time.monotonic() + 3600 * args.max_hours if args.max_hours else None

    def record(row: dict[str, Any]) -> None:
        done[row["id"]] = row
        with journal.open("a") as f:
            f.write(json.dumps(row) + "\n")
        prog.update(sum(s["id"] in done for s in specs), note=row["id"])

    def cmd(spec: dict[str, Any]) -> str:
        return f"sparsepush claims{quick} --datasets {spec['cfg']['dataset']} --rows {spec['name']}"

    if args.jobs <= 1:
        for k, spec in enumerate(todo):
            if deadline and time.monotonic() > deadline:
                print(f"stopping after {k} runs: --max-hours reached; run the same command to continue", flush=True)
                break
            print(f"[{k + 1}/{len(todo)}] {spec['id']}", flush=True)
            record(run_row(spec, cmd(spec), args.device))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        from flower_sparsepush.simulations.claims import _work as work  # picklable by its module's name

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            queue = list(todo)
            running = {}
            while queue or running:
                while queue and len(running) < args.jobs and not (deadline and time.monotonic() > deadline):
                    spec = queue.pop(0)
                    running[pool.submit(work, spec, cmd(spec), args.device)] = spec
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    spec = running.pop(fut)
                    try:
                        record(fut.result())
                    except Exception as err:  # one failed run must not lose the others
                        print(f"run {spec['id']} failed: {err!r}", flush=True)
    prog.close()
    # the table holds every run of these datasets in the journal, also those of other --rows / --seeds calls
    order = {s["id"]: k for k, s in enumerate(plan(datasets, args.quick, SEEDS + seeds))}
    runs = sorted((r for r in done.values() if r["id"] in order), key=lambda r: order[r["id"]])
    if runs:
        finish(runs, out, name, f"sparsepush claims{quick} --datasets {','.join(datasets)}")
        print((out / f"{name}.md").read_text())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("claims", help="the claims table: FedAvg vs SGP vs Sparse-Push vs SCSP (long)")
    p.add_argument("--quick", action="store_true", help="tiny schedules, one seed: a check that takes minutes")
    p.add_argument("--datasets", default="fashion_mnist", help="comma-separated: fashion_mnist, cifar10")
    p.add_argument("--rows", default="", help="run only these rows (comma-separated names, e.g. sgp,sp-h4-merge)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--rerun", action="store_true", help="run again even what the journal already holds")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | auto | cuda: where local SGD runs (batched on a GPU)")
    p.add_argument("--evals", type=int, default=0, help="evaluations per run (0 = the schedule's; the last is kept)")
    p.add_argument("--max-hours", type=float, default=0.0, help="start no new run after this many hours (0 = no limit)")
    p.add_argument("--out", default="results", help="output folder")
    p.set_defaults(func=main)


if __name__ == "__main__":  # python -m flower_sparsepush.simulations.claims ... (machines without the CLI's deps)
    import sys

    _parser = argparse.ArgumentParser(prog="claims")
    register(_parser.add_subparsers())
    _args = _parser.parse_args(["claims", *sys.argv[1:]])
    raise SystemExit(_args.func(_args))
