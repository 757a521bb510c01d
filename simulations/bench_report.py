"""The benchmark's report: the flat headline keys of ``bench.json`` (:func:`assemble`) and ``bench.md``
(:func:`render_md`: the goals table, then one table per section that ran)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flower_sparsepush.simulations.bench_micro import FRACTIONS

REQUIRED_KEYS = (
    "flower_overhead_ratio_resnet20_16",
    "flower_overhead_ratio_cnn_16",
    "flower_overhead_ratio_cnn_64",
    "max_nodes_run",
    "peak_mem_gib_at_max_nodes",
    "entropy_ratio_topk_0.1",
    "entropy_ratio_topk_0.01",
    "entropy_ratio_topk_0.001",
    "codec_vs_topk_ratio_0.27M",
    "codec_vs_topk_ratio_11M",
    "topk_vs_memory_pass_ratio_11M",
    "scale_per_node_ratio_1000_vs_16",
    "ray_cluster_nodes_used",
    "ray_cluster_metrics_equal",
    "deploy_s_per_round_4_nodes",
    "sim_s_per_round_4_nodes",
    "machine",
    "command",
)


def assemble(
    sections: dict[str, Any], machine: dict[str, Any], command: str, mode: str, load: dict[str, Any]
) -> dict[str, Any]:
    """The flat headline keys of bench.json from the section results (NaN where a part was not run)."""
    nan = float("nan")
    ov, sc, wi, co, tk = (sections.get(k, {}) for k in ("overhead", "scale", "wire", "codec", "topk"))
    rep: dict[str, Any] = {"machine": machine, "command": command, "mode": mode, "load": load}
    for model, nodes in (("resnet20", 16), ("cnn", 16), ("cnn", 64), ("resnet20", 64)):
        rep[f"flower_overhead_ratio_{model}_{nodes}"] = ov.get(f"{model}_{nodes}", {}).get("ratio", nan)
    ok = [int(n) for n, r in sc.items() if r.get("ok")]
    rep["max_nodes_run"] = max(ok) if ok else 0
    rep["peak_mem_gib_at_max_nodes"] = sc[str(max(ok))]["peak_pss_gib"] if ok else nan
    rep["peak_rss_sum_gib_at_max_nodes"] = sc[str(max(ok))]["peak_rss_gib"] if ok else nan
    rep["scale_model"] = sc[str(max(ok))].get("model", "cnn") if ok else None
    rep["scale_per_node_ratio_1000_vs_16"] = per_node_ratio(sc, 1000, 16)
    for frac in FRACTIONS:
        rep[f"entropy_ratio_topk_{frac:g}"] = wi.get(f"resnet20_update|topk:{frac:g}", {}).get("ratio", nan)
        rep[f"entropy_ratio_topk_{frac:g}_q4"] = wi.get(f"resnet20_update|topk:{frac:g}+q:4", {}).get("ratio", nan)
        rep[f"index_entropy_ratio_topk_{frac:g}"] = wi.get(f"resnet20_update|topk:{frac:g}", {}).get("index_ratio", nan)
    for label in ("0.27M", "11M"):
        rep[f"codec_vs_topk_ratio_{label}"] = co.get(f"{label}|0.01", {}).get("encdec_vs_topk", nan)
        rep[f"codec_vs_topk_ratio_{label}_max_over_fractions"] = max(
            (r["encdec_vs_topk"] for k, r in co.items() if k.startswith(f"{label}|")), default=nan
        )
    for frac in FRACTIONS:
        rep[f"topk_vs_memory_pass_ratio_11M_{frac:g}"] = tk.get(f"11M|{frac:g}", {}).get("topk_vs_pass", nan)
    tk_11m = [rep[f"topk_vs_memory_pass_ratio_11M_{frac:g}"] for frac in FRACTIONS]
    rep["topk_vs_memory_pass_ratio_11M"] = nan if any(math.isnan(x) for x in tk_11m) else max(tk_11m)
    ra = sections.get("ray", {})
    ray_ok = bool(ra) and "error" not in ra
    rep["ray_cluster_nodes_used"] = int(ra.get("nodes_used", 0)) if ray_ok else 0
    rep["ray_cluster_metrics_equal"] = bool(ray_ok and ra.get("metrics_equal"))
    de = sections.get("deploy", {})
    rep["deploy_s_per_round_4_nodes"] = de.get("deploy_s_per_round", nan)
    rep["sim_s_per_round_4_nodes"] = de.get("sim_s_per_round", nan)
    rep["sections"] = sections
    return rep


def _fmt(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _scale_title(sc: dict[str, Any]) -> str:
    """``small CNN`` / ``logreg`` ..., and whether Flower's engine ran as it comes (rows from before the model and
    the linear switch were recorded are the small CNN, as it comes)."""
    rows = list(sc.values())
    model = rows[0].get("model", "cnn") if rows else "cnn"
    name = "small CNN" if model == "cnn" else model
    linear = rows[0].get("linear", False) if rows else False
    return f"{name}, {'indexed message lookup (linkstate.py)' if linear else 'Flower engine as it comes'}"


def per_node_ratio(scale: dict[str, Any], big: int, small: int) -> float:
    """Seconds per node per round at ``big`` nodes / at ``small`` nodes (1.0: a round is linear in the node count);
    NaN unless both ran."""
    a, b = scale.get(str(small), {}), scale.get(str(big), {})
    if not (a.get("ok") and b.get("ok")):
        return float("nan")
    return (b["s_per_round"]["median"] / big) / (a["s_per_round"]["median"] / small)


def growth(scale: dict[str, Any]) -> dict[str, Any] | None:
    ok = sorted(int(n) for n, r in scale.items() if r.get("ok"))
    if len(ok) < 2:
        return None
    a, b = scale[str(ok[0])], scale[str(ok[-1])]
    return {
        "from": ok[0],
        "to": ok[-1],
        "node_factor": ok[-1] / ok[0],
        "time_factor": b["s_per_round"]["median"] / a["s_per_round"]["median"],
        "mem_per_node_mib": (b["peak_pss_gib"] - a["peak_pss_gib"]) * 1024 / (ok[-1] - ok[0]),
    }


# --------------------------------------------------------------------------- bench.md


def _spread(s: dict[str, float], nd: int = 3) -> str:
    """``median [min, max]`` of a :func:`bench_measure.stats` entry."""
    return f"{_fmt(s['median'], nd)} [{_fmt(s['min'], nd)}, {_fmt(s['max'], nd)}]"


def _ms(r: dict[str, Any], key: str) -> str:
    """The median of the seconds ``r[key]`` in milliseconds, two decimals."""
    return _fmt(r[key]["median"] * 1e3, 2)


def _table(title: str, header: str, rows: list[str], intro: str = "") -> list[str]:
    """A ``##`` section of bench.md: its title, an optional paragraph, a table (``header`` and ``rows``)."""
    separator = "|" + "---|" * (header.count("|") - 1)
    return ["", f"## {title}", "", *([intro, ""] if intro else []), header, separator, *rows]


def _at_most(name: str, limit: str, value: float) -> tuple[str, str, Any, bool]:
    """A goal row met when ``value`` is at most ``limit`` (NaN: not met)."""
    return name, f"<= {limit}", value, value <= float(limit)


def _goals(rep: dict[str, Any]) -> list[tuple[str, str, Any, bool]]:
    """(goal, target, measured, met) for the goals table."""
    nan = float("nan")
    max_ratio = lambda lab: rep.get(f"codec_vs_topk_ratio_{lab}_max_over_fractions", nan)  # noqa: E731
    entropy_max = max(rep[f"entropy_ratio_topk_{f:g}"] for f in FRACTIONS)
    ray_nodes, ray_equal = rep.get("ray_cluster_nodes_used", 0), rep.get("ray_cluster_metrics_equal")
    return [
        _at_most(
            "Flower overhead, ResNet-20, 16 nodes (Flower s/round / in-process s/round)",
            "1.3",
            rep["flower_overhead_ratio_resnet20_16"],
        ),
        _at_most(
            "Flower overhead, small CNN, 16 nodes (Flower s/round / in-process s/round)",
            "1.5",
            rep["flower_overhead_ratio_cnn_16"],
        ),
        (
            f"1,000 virtual nodes run ({rep.get('scale_model') or 'cnn'}, within 24 GiB)",
            ">= 1000",
            rep["max_nodes_run"],
            rep["max_nodes_run"] >= 1000,
        ),
        _at_most(
            "Seconds per node per round, 1,000 nodes / 16 nodes (a round linear in the node count: 1)",
            "1.3",
            rep.get("scale_per_node_ratio_1000_vs_16", nan),
        ),
        (
            f"10,000 virtual nodes run ({rep.get('scale_model') or 'small model'}), peak memory (PSS) <= 20 GiB",
            ">= 10000, <= 20 GiB",
            f"{rep['max_nodes_run']}, {_fmt(rep['peak_mem_gib_at_max_nodes'], 2)} GiB",
            rep["max_nodes_run"] >= 10000 and rep["peak_mem_gib_at_max_nodes"] <= 20,
        ),
        _at_most("Wire bits / entropy bound, top-10/1/0.1% (worst)", "1.10", entropy_max),
        _at_most("(encode + decode) / torch.topk, 0.27M (worst of 3 fractions)", "2", max_ratio("0.27M")),
        _at_most("(encode + decode) / torch.topk, 11M (worst of 3 fractions)", "2", max_ratio("11M")),
        _at_most(
            "TopK compressor / one abs().sum() pass, 11M (worst of 3 fractions)",
            "5",
            rep.get("topk_vs_memory_pass_ratio_11M", nan),
        ),
        (
            "Flower on a 2-node Ray cluster: Ray nodes hosting ClientApp actors, metrics = single machine",
            "2, equal",
            f"{ray_nodes}, {'equal' if ray_equal else 'not equal'}",
            ray_nodes >= 2 and bool(ray_equal),
        ),
        _at_most(
            "Deployment Engine, 4 SuperNodes with node workers, synthetic MLP, loopback: s/round "
            f"(simulation, same config: {_fmt(rep.get('sim_s_per_round_4_nodes', nan), 2)})",
            "5",
            rep.get("deploy_s_per_round_4_nodes", nan),
        ),
    ]


def _head_md(rep: dict[str, Any]) -> list[str]:
    """Title, machine, the command that regenerates the report, and the goals table."""
    m = rep["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, flwr {m['flwr']}, Python "
        f"{m['python']}; one torch thread. Mode: {rep['mode']}. Load average (1/5/15 min) before: "
        f"{rep['load'].get('before')}, after: {rep['load'].get('after')} (the machine is shared with other jobs).",
        "",
        f"Regenerate: `{rep['command']}`",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for name, target, val, met in _goals(rep):
        lines.append(
            f"| {name} | {target} | {_fmt(val) if isinstance(val, float) else val} | {'yes' if met else 'no'} |"
        )
    return lines


def _overhead_md(ov: dict[str, Any]) -> list[str]:
    rows = []
    for key, r in ov.items():
        f2 = r.get("flower_2actors_s_per_round")
        rows.append(
            f"| {key.replace('_', ', ')} | {_spread(r['inprocess_s_per_round'])} | "
            f"{_spread(r['flower_s_per_round'])} | {_fmt(r.get('ratio'), 2)} | "
            + (f"{_spread(f2)} | {_fmt(r.get('ratio_2actors'), 2)}" if f2 else "- | -")
            + f" | {_fmt(r.get('flower_startup_s'), 1)} | "
            + (
                f"{_fmt(r['flower_context_s_per_round']['median'])} | {_fmt(r.get('ratio_context'), 2)} |"
                if "flower_context_s_per_round" in r
                else "- | - |"
            )
        )
    return _table(
        "1. Flower overhead (seconds per round, median [min, max] over rounds 2..R)",
        "| model, nodes | in-process | Flower, 1 actor | ratio | Flower, 2 actors | ratio | Ray start + "
        "registration s | Flower, context.state | ratio |",
        rows,
        intro="Flower keeps node state in the node store (state files, the default); the last two columns are the "
        "same run with `node-store=context` (the whole state in Flower's context.state, pickled with every message).",
    )


def _scale_md(sc: dict[str, Any], growth_: dict[str, Any] | None) -> list[str]:
    rows = []
    for n, r in sc.items():
        s = r["s_per_round"]
        per_node = s["median"] / int(n) * 1000 if s.get("n") else float("nan")
        rows.append(
            f"| {n} | {'yes' if r['ok'] else 'no'} | {_spread(s, 2)} | {_fmt(per_node, 1)} | "
            f"{_fmt(r['peak_pss_gib'], 2)} | {_fmt(r['peak_rss_gib'], 2)} | {r['peak_processes']} | "
            f"{_fmt(r['startup_s'], 1)} | {_fmt(r['wall_s'], 0)} |"
        )
    lines = _table(
        f"2. Scale ({_scale_title(sc)} through Flower, 2 actors)",
        "| nodes | ran | s/round median [min, max] | ms per node per round | peak PSS GiB (tree) | "
        "peak RSS sum GiB | processes | start-up s | wall s |",
        rows,
    )
    if growth_ is not None:
        g = growth_
        lines += [
            "",
            f"Growth from {g['from']} to {g['to']} nodes: time per round x{_fmt(g['time_factor'], 2)}, "
            f"memory (PSS) +{_fmt(g['mem_per_node_mib'], 2)} MiB per node "
            f"(nodes x{_fmt(g['node_factor'], 1)}).",
        ]
    return lines


# section -> (title, table header, the row of one entry (key, value), the paragraph before the table), in the
# order of bench.md
_TABLES: dict[str, tuple[str, str, Callable[[str, dict[str, Any]], str], str]] = {
    "wire": (
        "3. Wire efficiency (bits of one real message / entropy bound)",
        "| vector | compressor | k | bits | bound | ratio | index part / log2 C(d,k) | index coding |",
        lambda key, r: (
            f"| {key.replace('|', ' | ')} | {r['k']} | {r['bits']} | {r['entropy_bits']:.0f} | {r['ratio']:.4f} | "
            f"{r['index_ratio']:.4f} | {r['coding']} |"
        ),
        "",
    ),
    "codec": (
        "4. Codec speed (ms, median over interleaved repeats; Gaussian vectors)",
        "| size, fraction | torch.topk | TopK compressor | encode | decode | add_to_ | (enc+dec)/topk | all/topk |",
        lambda key, r: (
            f"| {key.replace('|', ', ')} | {_ms(r, 'topk_s')} | {_ms(r, 'select_s')} | {_ms(r, 'encode_s')} | "
            f"{_ms(r, 'decode_s')} | {_ms(r, 'add_to_s')} | {r['encdec_vs_topk']:.3f} | {r['pipeline_vs_topk']:.2f} |"
        ),
        "",
    ),
    "topk": (
        "5. Top-k selection vs one memory pass (ms, median over interleaved repeats; Gaussian float32)",
        "| size, fraction | k | abs().sum() | TopK compressor | torch.topk path | TopK / pass | torch.topk / pass | "
        "speed-up | same set |",
        lambda key, r: (
            f"| {key.replace('|', ', ')} | {r['k']} | {_ms(r, 'abs_sum_pass_s')} | {_ms(r, 'topk_s')} | "
            f"{_ms(r, 'torch_topk_path_s')} | {r['topk_vs_pass']:.2f} | {r['torch_topk_vs_pass']:.2f} | "
            f"{r['speedup_vs_torch_topk']:.1f}x | {'yes' if r['same_set_as_torch_topk'] else 'no'} |"
        ),
        "`TopK(frac)(v)` is the whole compressor call (selection + values); the torch.topk path is the selection it "
        "replaced (torch.topk on |v|, sorted positions, values); `v.abs().sum()` is one pass over the vector (at "
        "0.27M it runs from cache, so that ratio is for reference only).",
    ),
    "store": (
        "Node store: writing one node's state (ms, median over interleaved repeats)",
        "| model | state MB | store save | of which CRC-32 | torch.save + rename | ArrayRecord pickle round trip |",
        lambda label, r: (
            f"| {label} | {r['state_mb']:.1f} | {_ms(r, 'store_save_s')} | {_ms(r, 'checksum_s')} | "
            f"{_ms(r, 'torch_save_rename_s')} | {_ms(r, 'arrayrecord_pickle_round_trip_s')} |"
        ),
        "The store's save (safetensors written straight from the tensors' memory, in place over the older of two "
        "slots, CRC-32 included) vs the store before (torch.save to a temporary file, renamed over the old one) vs "
        "one pickle round trip of the state as a Flower ArrayRecord (`node-store=context`, each direction of every "
        "message).",
    ),
    "data": (
        "6. Data path (batch 32, per second, median)",
        "| model | training.node_batch | data.NodeData.next_batch | model steps (fwd+bwd) | loader share of a step |",
        lambda model, r: (
            f"| {model} | {r['node_batch_per_s']['median']:.0f} | {r['nodedata_batch_per_s']['median']:.0f}"
            f" | {r['model_steps_per_s']['median']:.1f} | {100 * r['loader_share_of_step']:.1f}% |"
        ),
        "",
    ),
}


def _ray_md(ra: dict[str, Any]) -> list[str]:
    rows = [
        f"| `{node[:12]}` | {r['role']} | {r['calls']} | {r['actors']} |" for node, r in ra.get("per_node", {}).items()
    ]
    fr = ra.get("flwr_run")
    return [
        *_table(
            "Ray cluster (two Ray nodes on this machine; details in ray_cluster.md)",
            "| Ray node | role | ClientApp calls | actors |",
            rows,
        ),
        "",
        f"Metrics equal to the single-machine run: {'yes' if ra.get('metrics_equal') else 'no'} (max abs "
        f"difference {ra.get('max_abs_metric_diff', float('nan')):.3g}); start-up "
        f"{_fmt(ra.get('cluster_startup_s'), 1)} s, cluster run {_fmt(ra.get('cluster_run_s'), 1)} s, "
        f"single-machine run {_fmt(ra.get('single_run_s'), 1)} s"
        + (
            f"; `flwr run` path on the same cluster: ClientAppActors on {fr.get('actor_nodes', 0)} "
            f"Ray node(s), metrics equal: {'yes' if fr.get('metrics_equal') else 'no'}"
            if fr
            else ""
        )
        + (f"; error: `{ra['error']}`" if "error" in ra else "")
        + ".",
    ]


def render_md(rep: dict[str, Any]) -> str:
    """bench.md: the goals table, then a table for each section in the report."""
    sec = rep["sections"]
    lines = _head_md(rep)
    if sec.get("overhead"):
        lines += _overhead_md(sec["overhead"])
    if sec.get("scale"):
        lines += _scale_md(sec["scale"], sec.get("growth"))
    for name, (title, header, row, intro) in _TABLES.items():
        if sec.get(name):
            lines += _table(title, header, [row(key, r) for key, r in sec[name].items()], intro)
    if sec.get("ray"):
        lines += _ray_md(sec["ray"])
    return "\n".join(lines) + "\n"
