"""Averaging-only comparison of the push-sum forms: writes results/consensus.json and results/consensus.md.

Regenerate with ``python -m flower_sparsepush.simulations.consensus_table`` (about 10 minutes on 2 cores;
``--quick`` for a 1-minute check). Every number comes from real encoded messages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flower_sparsepush.core.consensus import run_consensus

CASES = [
    # (graph, compressor, gamma)
    ("exponential", "topk:0.05", 0.05),
    ("exponential", "topk:0.05+q:4", 0.05),
    ("exponential", "topk:0.01", 0.02),
    ("random-out:2", "topk:0.05", 0.05),
    ("random-out:2", "topk:0.05+q:4", 0.05),
    ("random-out:2", "topk:0.01", 0.02),
]
FORMS = ("ef", "ref-x", "ref")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a smaller vector")
    parser.add_argument("--out", default="results", help="output folder")
    args = parser.parse_args(argv)
    nodes, dim, rounds = (16, 200, 600) if args.quick else (16, 1000, 3000)
    rows = []
    for graph, compressor, gamma in CASES:
        for form in FORMS:
            r = run_consensus(nodes, graph, compressor, gamma=gamma, rounds=rounds, dim=dim, seed=0, form=form)
            rows.append(r)
            print(
                f"{graph:>14} {compressor:>14} gamma={gamma:<5} {form:>5}: error {r['consensus_error']:.2e}", flush=True
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m flower_sparsepush.simulations.consensus_table" + (" --quick" if args.quick else "")
    name = "consensus_quick" if args.quick else "consensus"
    (out / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    lines = [
        f"Consensus error max_i ||z_i - mean|| / ||mean|| after {rounds} rounds; {nodes} nodes, d = {dim}, seed 0.",
        f"Regenerate: `{command}`",
        "",
        "| graph | compressor | gamma | ef (authors) | ref-x (x-space refs) | ref (z-space refs, default) | bits/node/round |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in range(0, len(rows), len(FORMS)):
        group = rows[i : i + len(FORMS)]
        errors = " | ".join(f"{r['consensus_error']:.1e}" for r in group)
        g = group[0]
        lines.append(
            f"| {g['graph']} | {g['compressor']} | {g['gamma']} | {errors} | {g['bits_per_node_per_round']:.0f} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
