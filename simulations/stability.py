"""The stability map of compressed gossip: consensus step size gamma against kept fraction, graph and node count.

Averaging only (no training): every cell is one ``consensus.run_consensus`` run from random vectors of the size of
the Fashion-MNIST CNN (d = 101,730). A cell is *stable* when the consensus error never climbs back: its last value
is at most 1.02 x the smallest value seen (a run that mixes and then diverges, as gamma 0.2 at top-0.5% does, fails
this), and it ended below where it started. Rows are journaled to ``<out>/stability_rows.jsonl`` (an interrupted run
resumes); ``stability.json`` and ``stability.md`` list every cell and, per setting, the largest stable gamma.

``python -m flower_sparsepush.simulations.stability [--quick] [--out results]`` regenerates it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GRID = {
    "fractions": [0.002, 0.005, 0.01, 0.02, 0.05],
    "gammas": [0.01, 0.02, 0.05, 0.1, 0.2, 0.4],
    "settings": [
        ("exponential", 16, "ref"),
        ("ring", 16, "ref"),
        ("exponential", 64, "ref"),
        ("exponential", 16, "ef"),
    ],
    "dim": 101_730,
    "rounds": 1000,
}
QUICK = {
    "fractions": [0.01, 0.05],
    "gammas": [0.05, 0.4],
    "settings": [("exponential", 8, "ref")],
    "dim": 2000,
    "rounds": 300,
}


def is_stable(trace: list[float], start: float) -> bool:
    """Never climbs back (last <= 1.02 x the minimum: pure averaging only contracts) and ends below the start."""
    return trace[-1] <= 1.02 * min(trace) and trace[-1] < start


def cell(graph: str, nodes: int, form: str, fraction: float, gamma: float, dim: int, rounds: int) -> dict[str, Any]:
    from flower_sparsepush.core.consensus import run_consensus

    r = run_consensus(
        nodes, graph, f"topk:{fraction:g}+q:4", gamma, rounds, dim, seed=1, form=form, trace_every=max(1, rounds // 30)
    )
    trace = [p["consensus_error"] for p in r["trace"]]
    import torch

    x0 = torch.randn(nodes, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # as run_consensus
    mean0 = x0.mean(0)
    start = float(((x0 - mean0).norm(dim=1) / mean0.norm()).max())
    return {
        "graph": graph,
        "nodes": nodes,
        "form": form,
        "fraction": fraction,
        "gamma": gamma,
        "dim": dim,
        "rounds": rounds,
        "final_error": trace[-1],
        "min_error": min(trace),
        "first_error": trace[0],
        "start_error": start,
        "stable": is_stable(trace, start),
        "trace": trace,
        "bits_per_node_per_round": r["bits_per_node_per_round"],
    }


def _key(r: dict) -> tuple:
    return (r["graph"], r["nodes"], r["form"], r["fraction"], r["gamma"])


def _run_cells(todo: list[tuple], grid: dict, journal: Path, done: dict, jobs: int) -> None:
    """Run the cells of ``todo`` (in ``jobs`` processes), journaling each finished one and adding it to ``done``."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = [pool.submit(cell, *key, grid["dim"], grid["rounds"]) for key in todo]
        for k, fut in enumerate(futs):
            r = fut.result()
            done[_key(r)] = r
            with journal.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(
                f"[{k + 1}/{len(todo)}] {r['graph']} n={r['nodes']} {r['form']} top-{r['fraction']:g} "
                f"gamma {r['gamma']:g}: final {r['final_error']:.3g} {'stable' if r['stable'] else 'UNSTABLE'}",
                flush=True,
            )


def _largest_stable(rows: list[dict]) -> dict[str, float]:
    limits: dict[str, float] = {}
    for r in rows:
        key = f"{r['graph']}/{r['nodes']}/{r['form']}/{r['fraction']:g}"
        if r["stable"]:
            limits[key] = max(limits.get(key, 0.0), r["gamma"])
        else:
            limits.setdefault(key, 0.0)
    return limits


def _report(rows: list[dict], done: dict, limits: dict[str, float], cmd: str) -> str:
    gammas = sorted({r["gamma"] for r in rows})
    lines = [
        f"Regenerate: `{cmd}`. Averaging only, top-k+q:4, d = {rows[0]['dim']}, {rows[0]['rounds']} rounds. "
        "Cell: final consensus error (max_i ||z_i - mean|| / ||mean||); ! = unstable (climbs back or ends "
        "above its start).",
        "",
    ]
    for g, n, f in dict.fromkeys((r["graph"], r["nodes"], r["form"]) for r in rows):
        lines += [
            f"### {g}, {n} nodes, form {f}",
            "",
            "| kept | " + " | ".join(f"gamma {x:g}" for x in gammas) + " | largest stable |",
            "|---|" + "---|" * (len(gammas) + 1),
        ]
        for fr in sorted({r["fraction"] for r in rows}):
            cells = []
            for ga in gammas:
                hit = done.get((g, n, f, fr, ga))
                cells.append("-" if hit is None else f"{hit['final_error']:.2g}{'' if hit['stable'] else ' !'}")
            lim = limits.get(f"{g}/{n}/{f}/{fr:g}", 0.0)
            lines.append(f"| {fr:g} | " + " | ".join(cells) + f" | {lim:g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stability", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny grid (seconds)")
    p.add_argument("--out", default="results")
    p.add_argument(
        "--settings", default="", help="graph:nodes:form,... (default: the full grid's settings), e.g. ring:16:ref"
    )
    p.add_argument("--report-only", action="store_true", help="write the report from the journal, run nothing")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    args = p.parse_args(argv)
    grid = dict(QUICK if args.quick else GRID)
    if args.settings:
        try:
            grid["settings"] = [(g, int(n), f) for g, n, f in (s.split(":") for s in args.settings.split(","))]
        except ValueError:
            p.error(f"--settings {args.settings!r}: expected graph:nodes:form[,...], e.g. exponential:16:ref")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "stability_quick" if args.quick else "stability"
    journal = out / f"{name}_rows.jsonl"
    done = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            r = json.loads(line)
            done[_key(r)] = r
    cells = [(g, n, f, fr, ga) for g, n, f in grid["settings"] for fr in grid["fractions"] for ga in grid["gammas"]]
    todo = [] if args.report_only else [c for c in cells if c not in done]
    _run_cells(todo, grid, journal, done, args.jobs)
    rows = sorted(done.values(), key=_key)
    for r in rows:  # the rule may have changed since a row was journaled: classify from its trace
        r["stable"] = is_stable(r["trace"], r["start_error"])
    limits = _largest_stable(rows)
    cmd = f"python -m flower_sparsepush.simulations.stability{' --quick' if args.quick else ''}"
    (out / f"{name}.json").write_text(
        json.dumps({"command": cmd, "largest_stable_gamma": limits, "rows": rows}, indent=1) + "\n"
    )
    (out / f"{name}.md").write_text(_report(rows, done, limits, cmd))
    print((out / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
