"""How compressible is what Sparse-Push sends? The energy a compressor keeps of a real per-edge residual.

In the ``ref`` form a node sends ``C(z_i - zhat_ij)``: its model minus the copy its out-neighbour holds. The part
of that residual's energy (squared norm) one message keeps bounds how fast the copies follow the models, and so
the consensus step size gamma that stays stable. This runs the first R rounds of the claims row ``sp-h4-merge``
(Fashion-MNIST CNN, 16 nodes, H = 4, top-1.2% + 4-bit, gamma 0.1; the 20-epoch schedule, so the learning rate is
the row's) and measures, on node 0's out-edge residual:

- top-k by magnitude at several kept fractions: the energy kept, and the same for a Gaussian vector of the same
  size (white noise: nothing to exploit);
- the best rank-r approximation of every weight tensor (reshaped to out x rest; biases and norms sent whole),
  what PowerGossip-style low-rank compression (Vogels et al. 2020) could at best keep, with its value count.

``python -m flower_sparsepush.simulations.residual_energy [--rounds 40,200] [--out results]`` writes
``residual_energy.json`` and ``residual_energy.md``. No plot: two small tables.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from flower_sparsepush.simulations.report_files import write_report

FRACTIONS = (0.0025, 0.005, 0.012, 0.02, 0.05)
RANKS = (1, 2, 4)


def topk_energy(v: torch.Tensor, fraction: float) -> float:
    """Share of ``||v||^2`` in the ``ceil(fraction * len(v))`` entries of largest magnitude."""
    if not 0 < fraction <= 1:
        raise ValueError(f"kept fraction must be in (0, 1], got {fraction}")
    total = float((v.double() ** 2).sum())
    if total == 0:
        raise ValueError("the vector is zero: there is no energy to keep (was the run merged at its end?)")
    k = max(1, math.ceil(fraction * v.numel()))
    return float((v.double().abs().topk(k).values ** 2).sum()) / total


def gaussian_topk_energy(fraction: float) -> float:
    """The same share for white Gaussian noise (large d): ``2 (t phi(t) + 1 - Phi(t))`` with ``P(|x| > t) = f``."""
    normal = torch.distributions.Normal(0.0, 1.0)
    t = float(normal.icdf(torch.tensor(1 - fraction / 2, dtype=torch.float64)))
    phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    return 2 * (t * phi + fraction / 2)


def lowrank_energy(v: torch.Tensor, shapes: list[tuple[int, ...]], rank: int) -> tuple[float, int]:
    """(share of ``||v||^2`` kept, values sent) by the best rank-``rank`` approximation of every tensor with two or
    more dimensions (reshaped to ``shape[0] x rest``); 1-D tensors are sent whole."""
    if sum(math.prod(s) for s in shapes) != v.numel():
        raise ValueError(f"the shapes cover {sum(math.prod(s) for s in shapes)} values, the vector has {v.numel()}")
    v = v.double()
    kept, values, start = 0.0, 0, 0
    for shape in shapes:
        size = math.prod(shape)
        part = v[start : start + size]
        start += size
        if len(shape) >= 2 and min(shape[0], size // shape[0]) > rank:
            s = torch.linalg.svdvals(part.reshape(shape[0], -1))
            kept += float((s[:rank] ** 2).sum())
            values += rank * (shape[0] + size // shape[0])
        else:
            kept += float((part**2).sum())
            values += size
    total = float((v**2).sum())
    if total == 0:
        raise ValueError("the vector is zero: there is no energy to keep (was the run merged at its end?)")
    return kept / total, values


def measure(rounds: list[int], seed: int = 0) -> list[dict[str, Any]]:
    from flower_sparsepush.simulations.claims import plan, run_config

    from flower_sparsepush.run.inprocess import run_inprocess
    from flower_sparsepush.run.setup import get_setup

    spec = next(
        p for p in plan(["fashion_mnist"], False, (seed,)) if p["id"].endswith("/iid/sp-h4-merge/s" + str(seed))
    )
    # the row's training rounds; its final merge (which would reset every copy) is left out of the truncated runs
    cfg = run_config(spec).replace(final_merge=False)
    setup = get_setup(cfg)
    shapes = [tuple(p.shape) for p in setup.model.parameters()]
    out = []
    for r in rounds:
        res = run_inprocess(cfg, num_rounds=r)
        state = res.states[0]
        j = min(state.refs_out)
        v = (state.z - state.refs_out[j]).double()
        row: dict[str, Any] = {"round": r, "of_rounds": cfg.num_rounds, "edge": [0, j], "norm": float(v.norm())}
        row["topk"] = [
            {"fraction": f, "values": math.ceil(f * v.numel()), "energy": topk_energy(v, f),
             "gaussian": gaussian_topk_energy(f)}
            for f in FRACTIONS
        ]  # fmt: skip
        row["lowrank"] = [dict(zip(("rank", "energy", "values"), (k, *lowrank_energy(v, shapes, k)))) for k in RANKS]
        out.append(row)
        print(f"round {r}: top-1.2% keeps {topk_energy(v, 0.012):.3f} of the residual's energy", flush=True)
    return out


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Regenerate: `{command}`. Node 0's out-edge residual `z - zhat` in the claims row `sp-h4-merge` (Fashion-MNIST "
        "CNN, 16 nodes, H = 4, top-1.2% + 4-bit, gamma 0.1, seed 0), after the given round of its 528. Energy = share "
        "of the residual's squared norm one message keeps. Top-k values cost about 12 bits each (4-bit value + index "
        "code), low-rank values 8 (no index).",
        "",
        "| round | kept fraction | values | energy kept | Gaussian vector |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for t in r["topk"]:
            lines.append(
                f"| {r['round']} | {100 * t['fraction']:g}% | {t['values']} | {t['energy']:.3f} | {t['gaussian']:.3f} |"
            )
    lines += ["", "| round | rank per weight tensor | values | energy kept |", "|---|---|---|---|"]
    for r in rows:
        for t in r["lowrank"]:
            lines.append(f"| {r['round']} | {t['rank']} | {t['values']} | {t['energy']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", default="40,200", help="comma-separated rounds after which to measure (of 528)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    from flower_sparsepush.simulations.claims import parse_rounds

    rounds = parse_rounds(args.rounds)
    if max(rounds) > 528:
        raise SystemExit(f"--rounds {args.rounds!r}: every round must be in 1..528 (the row's rounds)")
    rows = measure(rounds)
    command = f"python -m flower_sparsepush.simulations.residual_energy --rounds {args.rounds} --out {args.out}"
    write_report(args.out, "residual_energy", command, rows, to_markdown(rows, command))


if __name__ == "__main__":
    main()
