"""Would gradient tracking rescue SCSP under label skew? A diagnostic with a free, exact tracker.

Gradient tracking (DIGing; BEER, Zhao et al. 2022, is its compressed form) replaces node i's stochastic gradient
``g_i`` by a tracker ``t_i`` of the nodes' mean gradient, exchanged like the model:
``t_i <- (1 - gt) t_i + gt t_j + g_i(now) - g_i(previous round)`` (j: node i's in-neighbour of the previous round;
``t_i = g_i`` in a node's first round). On a graph where every node has one in- and one out-neighbour per round
(``exponential``, ``ring``) that mixing is doubly stochastic, so ``mean_i t_i = mean_i g_i`` every round.

Here the tracker is dense, exact and free (its bits are not counted): an upper bound on what BEER's compressed
tracker could do. It is not a run-config switch; this module swaps the gradient that ``run.node_train`` hands to
``learn.sgd.sgd_steps`` for the tracker, in this process only, and runs the first R rounds of the ``scsp-400x``
claims row (``scsp-h1-q8m-klr-la5``, ``dirichlet:0.1``, seed 0) under several model-gossip settings. It reports, every
25 rounds, the mean norm of the nodes' gradients and of their trackers' disagreement ``||t_i - mean t||`` and the
mean norm of the nodes' models; a setting *diverges* when a model's norm passes 1e4 or is not finite.

``python -m flower_sparsepush.simulations.gradient_tracking_probe [--rounds 200] [--out results]`` writes
``gradient_tracking_probe.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from flower_sparsepush.simulations.gradient_swap import in_neighbour, swapped_gradient
from flower_sparsepush.simulations.report_files import write_report

ROW, PARTITION, SEED = "scsp-h1-q8m-klr-la5", "dirichlet:0.1", 0
# (label, tracker mixing gt (0: no tracking), run-config changes of the model gossip)
SETTINGS = (
    ("preset row, no tracking", 0.0, {}),
    ("preset row (top-0.42% + 4-bit, gamma 0.05)", 0.5, {}),
    ("exact messages, gamma 0.05", 0.5, {"compressor": "none", "sparsity_schedule": "constant"}),
    ("exact messages, gamma 0.2", 0.5, {"compressor": "none", "sparsity_schedule": "constant", "gamma": 0.2}),
    ("exact messages, gamma 0.5", 0.5, {"compressor": "none", "sparsity_schedule": "constant", "gamma": 0.5}),
)


class Tracker:
    """Every node's tracker ``t_i`` and last gradient; mixing reads the trackers as they were at the round's start."""

    def __init__(self, graph, gt: float):
        if graph.kind not in ("exponential", "ring"):
            raise SystemExit(f"graph {graph.name}: the tracker's mixing needs one in- and one out-neighbour per round")
        self.graph, self.gt = graph, gt
        self.t: dict[int, torch.Tensor] = {}
        self.g_prev: dict[int, torch.Tensor] = {}
        self.start: dict[int, torch.Tensor] = {}
        self.round = -1

    def track(self, node: int, rnd: int, g: torch.Tensor) -> torch.Tensor:
        if rnd != self.round:  # first node of a round: freeze the trackers the mixing reads
            self.start = {k: v.clone() for k, v in self.t.items()}
            self.round = rnd
        if node in self.start:
            j = in_neighbour(self.graph, rnd - 1, node)
            t = (1 - self.gt) * self.start[node] + self.gt * self.start[j] + g - self.g_prev[node]
        else:
            t = g.clone()
        self.g_prev[node], self.t[node] = g.clone(), t
        return t

    def snapshot(self, rnd: int, z_norm: float) -> dict[str, Any]:
        ts = torch.stack([self.t[k] for k in sorted(self.t)])
        gs = torch.stack([self.g_prev[k] for k in sorted(self.g_prev)])
        return {
            "round": rnd,
            "grad_norm": float(gs.norm(dim=1).mean()),
            "tracker_disagreement": float((ts - ts.mean(0)).norm(dim=1).mean()),
            "model_norm": z_norm,
        }


def run_setting(cfg, gt: float, rounds: int) -> dict[str, Any]:
    """The first ``rounds`` rounds of ``cfg`` with the gradient tracked at mixing ``gt`` (0: the plain gradient)."""
    from flower_sparsepush.run.inprocess import run_inprocess
    from flower_sparsepush.run.setup import get_setup

    tracker = Tracker(get_setup(cfg).graph, gt)
    norms: dict[int, float] = {}  # each node's model after its local SGD this round
    trace: list[dict[str, Any]] = []

    def after(setup, node, rnd, z_new):
        norms[node] = float(z_new.norm())
        if node == setup.cfg.num_nodes - 1 and rnd % 25 == 24:
            zn = sum(norms.values()) / len(norms)
            trace.append(tracker.snapshot(rnd + 1, zn) if gt else {"round": rnd + 1, "model_norm": zn})
            print(f"  round {rnd + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in trace[-1].items() if k != "round"))

    def wrap(gradient, setup, node, rnd):
        def tracked(point, k):
            g, loss = gradient(point, k)
            return tracker.track(node, rnd, g), loss

        return tracked if gt else gradient

    with swapped_gradient(wrap, after):
        run_inprocess(cfg, num_rounds=rounds)
    diverged = any(not math.isfinite(p["model_norm"]) or p["model_norm"] > 1e4 for p in trace)
    return {"trace": trace, "diverged": diverged}


def measure(rounds: int) -> list[dict[str, Any]]:
    from flower_sparsepush.simulations.claims import plan, run_config

    spec = next(
        p for p in plan(["fashion_mnist"], False, (SEED,)) if p["id"] == f"fashion_mnist/{PARTITION}/{ROW}/s{SEED}"
    )
    base = run_config(spec).replace(final_merge=False, merge_bits=32)
    rows = []
    for label, gt, change in SETTINGS:
        cfg = base.replace(**change)
        print(f"{label}, tracker mixing {gt:g}:", flush=True)
        rows.append(
            {"setting": label, "tracker_gamma": gt, "gamma": cfg.gamma, "compressor": cfg.compressor}
            | run_setting(cfg, gt, rounds)
        )
    return rows


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    marks = sorted({p["round"] for r in rows for p in r["trace"]})
    lines = [
        f"Regenerate: `{command}`. `{ROW}` on `{PARTITION}`, seed 0, the first rounds of its 20-epoch schedule. Cell: "
        "mean norm of the nodes' models after that round (`diverged`: past 1e4 or not finite). Tracker: dense, exact, "
        "bits not counted (simulations/gradient_tracking_probe.py).",
        "",
        "| model gossip | tracking | " + " | ".join(f"round {m}" for m in marks) + " | |",
        "|---|---|" + "---|" * (len(marks) + 1),
    ]
    for r in rows:
        at = {p["round"]: p["model_norm"] for p in r["trace"]}
        cells = " | ".join(f"{at[m]:.3g}" if m in at else "-" for m in marks)
        track = f"gt {r['tracker_gamma']:g}" if r["tracker_gamma"] else "off"
        lines.append(f"| {r['setting']} | {track} | {cells} | {'diverged' if r['diverged'] else 'bounded'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="rounds of each setting (of the row's 2110)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.rounds < 25:
        ap.error("--rounds: at least 25 (the norms are read every 25 rounds)")
    torch.set_num_threads(1)
    rows = measure(args.rounds)
    command = f"python -m flower_sparsepush.simulations.gradient_tracking_probe --rounds {args.rounds} --out {args.out}"
    write_report(args.out, "gradient_tracking_probe", command, rows, to_markdown(rows, command))


if __name__ == "__main__":
    main()
