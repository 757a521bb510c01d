"""The claims table from the journal's runs: one row per (dataset, partition, name) with means and standard
deviations over its seeds (:func:`aggregate`), the goals read from the rows the validation split chose
(:func:`goals`), and the files (:func:`finish`): ``claims.json``, ``claims.md`` (tables, goals, the legend of the
row names) and the plots ``claims_<dataset>.png``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from flower_sparsepush.simulations.claims_plan import GOALS, NAME_PARTS, PARTITIONS, SCHEDULES, explain_switches

from flower_sparsepush.run.presets import preset_of_row


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
        row["command"] = rs[0].get("command") or f"sparsepush claims --datasets {ds} --rows {name}"  # its flags
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
                    # on equal footing: a row run on fewer seeds than another candidate is not chosen over it
                    max(cands, key=lambda r: (len(r["seeds"]), r["val_score"]))["chosen"] = group
    return rows


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal in :data:`GOALS`, read from the chosen rows: met or by how much it is missed."""
    out = []
    for group, parts, min_ratio, margin in GOALS:
        for part in parts:
            hit = [r for r in rows if r.get("chosen") == group and r["partition"] == part
                   and r["dataset"] == "fashion_mnist"]  # fmt: skip
            if not hit:
                ran = [r for r in rows if (r["dataset"], r["partition"], r["group"]) == ("fashion_mnist", part, group)
                       and r["reduction_vs_sgp"]]  # fmt: skip
                why = "no candidate ran"
                if ran:  # the candidate that came closest to the ratio, with its accuracy against SGP
                    c = max(ran, key=lambda r: r["reduction_vs_sgp"])
                    why = (f"no candidate reached {min_ratio:g}x; closest {c['name']} at {c['reduction_vs_sgp']:.0f}x, "
                           f"worst delta {_worst_delta(c):+.2f} points, {len(c['seeds'])} seed(s)")  # fmt: skip
                out.append({"goal": group, "partition": part, "met": False, "why": why})
                continue
            r = hit[0]
            worst = _worst_delta(r)
            out.append(
                {
                    "goal": f">= {min_ratio:g}x within {margin:g} point(s) of SGP ({part})",
                    "partition": part,
                    "row": r["name"],
                    "preset": preset_of_row(r["name"]),
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
    (out / f"{name}.md").write_text(render_md(result))
    plot(rows, out, name)
    return result


def render_md(result: dict[str, Any]) -> str:
    """claims.md: how to read it, one table per dataset, the goals (Fashion-MNIST), the legend of the row names."""
    rows = result["rows"]
    lines = [
        f"Regenerate: `{result['command']}` (resumable; `--jobs 14 --device cuda` on a GPU machine). Test accuracy in "
        "%, mean +- standard deviation over the seeds; consensus = the average of the nodes' models, nodes = each "
        "node's own model (mean / min over nodes, each on the whole test set). val = the worst of the three on the "
        "validation split (10% of each class held out of training), which chooses among a goal's candidates "
        "run on the most seeds (marked *). x vs SGP = SGP's bits sent per node / the row's, final phases (merge, gossip-only rounds) "
        "included. delta = row - SGP in points (worst of consensus, node mean, node min).",
        "",
    ]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        lines += _dataset_md([r for r in rows if r["dataset"] == ds])
    if any(r["dataset"] == "fashion_mnist" for r in rows):
        lines += ["### Goals (Fashion-MNIST)", "", *map(_goal_md, result["goals"])]
    return "\n".join(lines + _legend_md(rows, blank_first=bool(lines[-1]))) + "\n"


def _worst_delta(r: dict[str, Any]) -> float:
    """The row's worst accuracy difference to SGP in points (consensus, node mean, node min)."""
    return min(r["delta_acc_consensus"], r["delta_acc_node_mean"], r["delta_acc_node_min"])


def _dataset_md(rows: list[dict[str, Any]]) -> list[str]:
    """The table of one dataset's rows, by partition, group and name; then a blank line."""
    s = rows[0]
    label = "CIFAR-10 (JPEG q75 copy)" if s["dataset"] == "cifar10" else "Fashion-MNIST"
    lines = [
        f"### {label}, {s['model']}, {s['nodes']} nodes, {s['graph']} graph, {s['epochs']:g} epochs, "
        f"batch {s['batch_size']}/node, cosine lr 0.05",
        "",
        "| partition | row | group | H | compressor | gamma | switches | seeds | consensus | nodes mean | nodes min "
        "| val | x vs SGP | delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda r: (PARTITIONS.index(r["partition"]), r["group"], r["name"]))
    return lines + [_row_md(r) for r in order] + [""]


def _row_md(r: dict[str, Any]) -> str:
    sw = ", ".join(f"{k}={v}" for k, v in r["switches"].items()
                   if k not in ("local-steps", "compressor", "gamma")) or "-"  # fmt: skip

    def cell(key: str) -> str:
        return f"{100 * r[key]:.2f} +- {100 * r[key + '_std']:.2f}"

    worst = _worst_delta(r) if r["delta_acc_consensus"] is not None else None
    return (
        f"| {r['partition']} | {r['name']}{' *' if r.get('chosen') else ''} | {r['group']} | "
        f"{r['local_steps']} | {r['compressor']} | {r['gamma']:g} | {sw} | {len(r['seeds'])} | "
        f"{cell('acc_consensus')} | {cell('acc_node_mean')} | {cell('acc_node_min')} | "
        f"{100 * r['val_score']:.2f} | {r['reduction_vs_sgp'] or 0:.0f} | "
        f"{'-' if worst is None else f'{worst:+.2f}'} |"
    )


def _goal_md(g: dict[str, Any]) -> str:
    return f"- {g['goal']}: {'MET' if g['met'] else 'not met'}" + (
        f" (row {g['row']}, preset {g.get('preset') or 'none'}, {g['reduction_vs_sgp']:.0f}x, worst delta {g['worst_delta_points']:+.2f} points, "
        f"{len(g['seeds'])} seed(s))" if "row" in g else f" ({g['why']})")  # fmt: skip


def _legend_md(rows: list[dict[str, Any]], blank_first: bool = True) -> list[str]:
    """The legend: what the parts of a row name stand for, and each row of the tables in words (from the switches
    it ran with, as the journal recorded them)."""
    first = {}
    for r in rows:
        first.setdefault(r["name"], r)
    parts = "; ".join(f"{part} = {words}" for part, words in NAME_PARTS)
    return [
        *([""] if blank_first else []),
        "### Row names",
        "",
        f"A row's name abbreviates its switches: {parts}. Each row in words (the switches it ran with):",
        "",
        *(
            f"- `{n}`: {explain_switches({'strategy': r['strategy']} | r['switches'])}"
            for n, r in sorted(first.items())
        ),
    ]


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
