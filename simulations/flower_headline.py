"""One headline row end to end through Flower: a preset on the claims' 20-epoch Fashion-MNIST schedule, run through
Flower's simulation engine (``sparsepush train --engine simulation --preset ...``) and through the in-process reference
loop with the same config, side by side in ``results/flower_headline.json`` (another preset:
``results/flower_headline_<preset>.json``).

Run: ``python -m flower_sparsepush.simulations.flower_headline [--preset sp-466x] [--seed 0] [--out results]
[--set partition=dirichlet:0.1]``
(about 15 minutes on 2 cores: the two runs one after the other). Both paths evaluate once, after the last round, every
node on the whole test set (``eval-node-samples=0``), as the claims do. ``reduction_vs_sgp`` divides SGP's bits per
node on the same schedule and seed (the claims journal, ``results/claims_rows.jsonl``) by the run's.

The in-process run uses the torch thread count the Flower nodes train with (``node_train.node_threads()``, one per
Ray actor): the thread count decides how kernels split their sums, and only the same float order lets the two
paths agree bit for bit over hundreds of rounds (``threads`` in the result).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.run.config import validate

FIELDS = ("acc_consensus", "acc_node_mean", "acc_node_min")


def sgp_bits(journal: Path, seed: int) -> float:
    """SGP's bits per node on the claims' Fashion-MNIST IID schedule for ``seed``, from the claims journal."""
    from flower_sparsepush.simulations.claims import read_journal

    row = read_journal(journal).get(f"fashion_mnist/iid/sgp/s{seed}")
    if row is not None:
        return float(row["bits_per_node"])
    raise SystemExit(f"{journal} has no sgp row for seed {seed}: run `sparsepush claims --rows sgp --seeds {seed}`")


def _row(summary: dict[str, Any], wall: float, sgp: float) -> dict[str, Any]:
    final = summary["final"]
    bits = float(summary["bits_sent_per_node"])
    return {k: final[k] for k in FIELDS} | {"bits_per_node": bits, "reduction_vs_sgp": sgp / bits, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flower_headline", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sp-466x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    p.add_argument("--runs", default="runs/flower_headline", help="where the two runs' folders go")
    p.add_argument("--journal", default="results/claims_rows.jsonl", help="the claims journal SGP's bits come from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key (checks)")
    args = p.parse_args(argv)
    from flower_sparsepush.flower.launch import simulate
    from flower_sparsepush.run.inprocess import train_inprocess
    from flower_sparsepush.run.node_train import node_threads, torch_threads

    out = Path(args.out)
    sgp = sgp_bits(Path(args.journal), args.seed)
    base = {"preset": args.preset, "seed": args.seed, "eval-node-samples": 0, "out-dir": args.runs}
    base |= dict(kv.split("=", 1) for kv in args.set)
    cfg = validate(base | {"run-name": "flower"})
    base["eval-every"] = cfg.num_rounds + cfg.final_gossip_rounds  # one evaluation, after the last round
    result: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "flower_sparsepush.simulations.flower_headline", *sys.argv[1:]]),
        "preset": args.preset,
        "config": validate(base | {"run-name": "flower"}).as_dict(),
        "sgp_bits_per_node": sgp,
        "threads": node_threads(),
    }
    for name in ("flower", "inprocess"):
        cfg = validate(base | {"run-name": name})
        t0 = time.perf_counter()
        if name == "flower":
            summary = json.loads((simulate(cfg) / "summary.json").read_text())
        else:
            with torch_threads(node_threads()):
                summary = train_inprocess(cfg, echo=None)
        result[name] = _row(summary, time.perf_counter() - t0, sgp)
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    fl, ip = result["flower"], result["inprocess"]
    result["max_abs_diff_points"] = max(abs(fl[k] - ip[k]) * 100 for k in FIELDS)
    result["bits_equal"] = fl["bits_per_node"] == ip["bits_per_node"]
    path = out / ("flower_headline.json" if args.preset == "sp-466x" else f"flower_headline_{args.preset}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
