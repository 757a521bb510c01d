"""Where gradient-lookahead reads the gradients: how far that point is from the nodes' average.

The nodes' average ``zbar = sum_i x_i / sum_i y_i`` moves by the mean of the nodes' gradients, so the closer to
``zbar`` those are read, the more the average follows plain large-batch SGD. With ``gradient-lookahead`` c a node
reads its gradient at ``z_i + c (mean_j zhat_ji - z_i)`` (``PushSum.lookahead_offset``: the mean of the copies it
holds of its in-neighbours' models). This runs the first R rounds of a claims row (default ``sp-h4-klr``, seed 0,
its final merge left out) and reports the mean distance to ``zbar`` of the nodes' own models and of that point
for several c. The copies lag the models they copy, so the distance has a minimum in c.

``python -m flower_sparsepush.simulations.lookahead_distance [--row sp-h4-klr] [--rounds 100] [--out results]``
writes ``lookahead_distance.json`` and ``lookahead_distance.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from flower_sparsepush.simulations.report_files import write_report

from flower_sparsepush.core.pushsum import NodeState, PushSum

CS = (0.25, 0.5, 0.65, 0.8, 1.0)


def distances(states: list[NodeState], cs: tuple[float, ...] = CS) -> dict[str, Any]:
    """Mean over nodes of ``||z_i - zbar||`` (``own``) and of ``||z_i + offset_c - zbar||`` for every c (``at``);
    a node that holds no copy yet reads its gradient at ``z_i``."""
    if not states:
        raise ValueError("no node states: run at least one round first")
    xs = torch.stack([s.x.to(torch.float64) for s in states])
    zbar = xs.sum(0) / float(sum(s.y for s in states))
    zs = [s.z.to(torch.float64) for s in states]
    own = sum(float((z - zbar).norm()) for z in zs) / len(zs)
    at = {}
    for c in cs:
        total = 0.0
        for s, z in zip(states, zs):
            off = PushSum.lookahead_offset(s, c)
            point = z if off is None else z + off.to(torch.float64)
            total += float((point - zbar).norm())
        at[str(c)] = total / len(states)
    return {"own": own, "at": at}


def measure(row: str, rounds: list[int], seed: int = 0) -> list[dict[str, Any]]:
    from flower_sparsepush.simulations.claims import plan, run_config

    from flower_sparsepush.run.inprocess import run_inprocess

    specs = [p for p in plan(["fashion_mnist"], False, (seed,)) if p["id"].endswith(f"/iid/{row}/s{seed}")]
    if not specs:
        raise SystemExit(
            f"--row {row!r}: not an IID Fashion-MNIST claims row (the names are in simulations/claims.py ROWS)"
        )
    cfg = run_config(specs[0]).replace(final_merge=False)
    if max(rounds) > cfg.num_rounds:
        raise SystemExit(f"--rounds: row {row} trains {cfg.num_rounds} rounds; measure within 1..that")
    out = []
    for r in rounds:
        res = run_inprocess(cfg, num_rounds=r)
        out.append({"row": row, "seed": seed, "round": r, "of_rounds": cfg.num_rounds} | distances(res.states))
        print(f"round {r}: own {out[-1]['own']:.2f}, " + ", ".join(f"c={c} {d:.2f}" for c, d in out[-1]["at"].items()))
    return out


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    cs = list(rows[0]["at"])
    lines = [
        f"Regenerate: `{command}`. Mean distance (L2, over the 16 nodes) from the nodes' average to where each node "
        "reads its gradients: its own model (c = 0) or `z_i + c (mean of its in-copies - z_i)` (gradient-lookahead c), "
        "after the given round of the claims row's training.",
        "",
        "| row | seed | round | own model | " + " | ".join(f"c = {c}" for c in cs) + " |",
        "|---|---|---|---|" + "---|" * len(cs),
    ]
    for r in rows:
        cells = " | ".join(f"{r['at'][c]:.2f}" for c in cs)
        lines.append(f"| {r['row']} | {r['seed']} | {r['round']} of {r['of_rounds']} | {r['own']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", default="sp-h4-klr", help="an IID Fashion-MNIST claims row (seed 0)")
    ap.add_argument("--rounds", default="100", help="comma-separated rounds after which to measure")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    from flower_sparsepush.simulations.claims import parse_rounds

    rows = measure(args.row, parse_rounds(args.rounds))
    command = (
        f"python -m flower_sparsepush.simulations.lookahead_distance --row {args.row} --rounds {args.rounds} "
        f"--out {args.out}"
    )
    write_report(args.out, "lookahead_distance", command, rows, to_markdown(rows, command))


if __name__ == "__main__":
    main()
