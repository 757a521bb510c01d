"""Fast checks of the benchmark code's pure parts (no timing assertions, no Flower runs)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from flower_sparsepush.simulations import bench, bench_flower, bench_measure, bench_micro, bench_report, bench_worker

from flower_sparsepush.core import codec
from flower_sparsepush.core.compression import TopK


def test_stats_median_min_max():
    assert bench_measure.stats([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench_measure.stats([])["n"] == 0


def test_round_times_from_stamps():
    assert bench_worker._round_times([0.0, 1.0, 3.0], [0.5, 2.5, 3.5]) == [1.0, 2.0, 0.5]


def test_wire_ratio_matches_entropy_bound_on_small_vector():
    v = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    r = bench_micro.wire_ratio(v, "topk:0.01")
    k = TopK(0.01).count(5000)
    bound = codec.entropy_bits(5000, k, 32 * k)
    assert r["k"] == k and math.isclose(r["entropy_bits"], bound)
    assert math.isclose(r["ratio"], r["bits"] / bound)
    assert r["ratio"] >= 1.0  # nothing beats the entropy bound
    assert r["index_ratio"] >= 1.0
    q = bench_micro.wire_ratio(v, "topk:0.01+q:4")
    assert math.isclose(q["entropy_bits"], codec.entropy_bits(5000, k, 4 * k + 32))


def test_codec_section_runs_on_tiny_sizes():
    out = bench_micro.section_codec({"tiny": 2000}, {"tiny": 2}, lambda s: None, fractions=(0.1,))
    row = out["tiny|0.1"]
    assert row["k"] == 200 and row["encdec_vs_topk"] > 0 and row["topk_s"]["n"] == 2


def test_topk_section_runs_on_tiny_sizes():
    out = bench_micro.section_topk({"tiny": 20_000}, {"tiny": 2}, lambda s: None, fractions=(0.01,))
    row = out["tiny|0.01"]
    assert row["k"] == 200 and row["topk_s"]["n"] == 2 and row["abs_sum_pass_s"]["n"] == 2
    assert row["topk_vs_pass"] > 0 and row["torch_topk_vs_pass"] > 0
    assert row["same_set_as_torch_topk"]  # Gaussian: no tie at the cut, so the old and the new path agree


def test_growth_and_report_have_the_required_keys(tmp_path):
    sc = {
        "16": {
            "ok": True,
            "s_per_round": bench_measure.stats([1.0]),
            "peak_pss_gib": 1.0,
            "peak_rss_gib": 2.0,
            "peak_processes": 5,
            "startup_s": 9.0,
            "total_s": 20.0,
            "wall_s": 30.0,
        },
        "64": {
            "ok": True,
            "s_per_round": bench_measure.stats([3.0]),
            "peak_pss_gib": 2.0,
            "peak_rss_gib": 3.0,
            "peak_processes": 5,
            "startup_s": 9.0,
            "total_s": 20.0,
            "wall_s": 40.0,
        },
    }
    g = bench_report.growth(sc)
    assert g["time_factor"] == 3.0 and math.isclose(g["mem_per_node_mib"], 1024 / 48)
    v = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    sections = {
        "scale": sc,
        "growth": g,
        "wire": bench_micro.section_wire({"resnet20_update": v}, lambda s: None),
        "codec": bench_micro.section_codec({"0.27M": 3000, "11M": 4000}, {"0.27M": 1, "11M": 1}, lambda s: None),
        "topk": bench_micro.section_topk({"0.27M": 3000, "11M": 20_000}, {"0.27M": 1, "11M": 1}, lambda s: None),
        "overhead": {
            "cnn_16": {
                "ratio": 1.1,
                "inprocess_s_per_round": bench_measure.stats([1.0]),
                "flower_s_per_round": bench_measure.stats([1.1]),
                "flower_startup_s": 8.0,
            }
        },
    }
    rep = bench_report.assemble(
        sections, bench_measure.machine_info(), "sparsepush bench --quick", "quick", {"before": [0.0], "after": [0.0]}
    )
    for key in bench_report.REQUIRED_KEYS:
        assert key in rep, key
    assert rep["max_nodes_run"] == 64 and rep["peak_mem_gib_at_max_nodes"] == 2.0
    assert {"cores", "memory_gib", "torch"} <= set(rep["machine"])
    assert np.isfinite(rep["entropy_ratio_topk_0.01"]) and np.isfinite(rep["codec_vs_topk_ratio_11M"])
    per_fraction = [rep[f"topk_vs_memory_pass_ratio_11M_{f:g}"] for f in bench_micro.FRACTIONS]
    assert rep["topk_vs_memory_pass_ratio_11M"] == max(per_fraction) > 0
    json.loads(json.dumps(rep, default=float))  # serializable
    md = bench_report.render_md(rep)
    assert "| goal | target | measured | met |" in md and "1,000 virtual nodes run (cnn" in md
    assert "TopK compressor / one abs().sum() pass, 11M" in md and "## 5. Top-k selection" in md
    assert math.isnan(rep["scale_per_node_ratio_1000_vs_16"])  # 1,000 nodes not in this ladder
    assert "Seconds per node per round, 1,000 nodes / 16 nodes" in md and "10,000 virtual nodes run" in md


def test_scale_per_node_ratio_and_scale_options():
    def row(s_per_round: float, model: str = "logreg") -> dict:
        return {
            "ok": True,
            "model": model,
            "linear": True,
            "s_per_round": bench_measure.stats([s_per_round]),
            "peak_pss_gib": 2.0,
            "peak_rss_gib": 3.0,
            "peak_processes": 12,
            "startup_s": 9.0,
            "total_s": 20.0,
            "wall_s": 30.0,
        }

    sc = {"16": row(0.32), "1000": row(25.0)}
    assert math.isclose(bench_report.per_node_ratio(sc, 1000, 16), (25.0 / 1000) / (0.32 / 16))
    assert math.isnan(bench_report.per_node_ratio({"16": row(0.32)}, 1000, 16))
    rep = bench_report.assemble(
        {"scale": sc}, bench_measure.machine_info(), "c", "full", {"before": [0.0], "after": [0.0]}
    )
    assert math.isclose(rep["scale_per_node_ratio_1000_vs_16"], 1.25) and rep["scale_model"] == "logreg"
    md = bench_report.render_md(rep | {"flower_overhead_ratio_resnet20_16": float("nan")})
    assert "## 2. Scale (logreg, indexed message lookup (linkstate.py) through Flower, 2 actors)" in md
    assert "| 1000 | yes | 25.00 [25.00, 25.00] | 25.0 |" in md
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--only", "scale", "--scale-model", "mlp", "--nodes", "16,10000"])
    assert args.scale_model == "mlp" and not args.scale_flower_as_is and args.nodes == "16,10000"


def test_register_adds_the_bench_subcommand():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    bench.register(sub)
    args = parser.parse_args(["bench", "--quick", "--only", "wire"])
    assert args.quick and args.only == "wire" and args.func is bench.cmd_bench


def test_ray_section_headline_keys_and_goal_row():
    machine = bench_measure.machine_info()
    load = {"before": [0.0], "after": [0.0]}
    none = bench_report.assemble({}, machine, "sparsepush bench --only wire", "full", load)
    assert none["ray_cluster_nodes_used"] == 0 and none["ray_cluster_metrics_equal"] is False  # not run
    ray = {
        "nodes_used": 2,
        "metrics_equal": True,
        "max_abs_metric_diff": 1e-16,
        "per_node": {
            "aaaa": {"role": "head", "calls": 5, "actors": 1},
            "bbbb": {"role": "worker", "calls": 4, "actors": 1},
        },
        "cluster_startup_s": 12.0,
        "cluster_run_s": 30.0,
        "single_run_s": 25.0,
    }
    rep = bench_report.assemble({"ray": ray}, machine, "sparsepush bench --only ray", "full", load)
    assert rep["ray_cluster_nodes_used"] == 2 and rep["ray_cluster_metrics_equal"] is True
    md = bench_report.render_md(rep)
    row = "| Flower on a 2-node Ray cluster: Ray nodes hosting ClientApp actors, metrics = single machine | 2, equal |"
    assert f"{row} 2, equal | yes |" in md and "| `bbbb` | worker | 4 | 1 |" in md
    failed = bench_report.assemble({"ray": ray | {"error": "RuntimeError: boom"}}, machine, "x", "full", load)
    assert failed["ray_cluster_nodes_used"] == 0 and failed["ray_cluster_metrics_equal"] is False
    assert "ray" in bench.SECTIONS


def test_tree_memory_of_this_process_is_positive():
    import os

    rss, pss = bench_measure.proc_mem(os.getpid())
    assert rss > 0 and pss > 0


def test_an_only_run_refreshes_its_sections_and_keeps_the_others():
    machine = bench_measure.machine_info()
    load = {"before": [0.0], "after": [0.0]}
    codec_old = {"11M|0.01": {"encdec_vs_topk": 0.5}}
    overhead = {"cnn_16": {"ratio": 1.4}}
    previous = bench_report.assemble(
        {"codec": codec_old, "overhead": overhead}, machine, "sparsepush bench", "full", load
    )
    new = bench_report.assemble(
        {"codec": {"11M|0.01": {"encdec_vs_topk": 0.25}}}, machine, "sparsepush bench --only codec", "full", load
    )
    merged = bench.merge_previous(new, json.loads(json.dumps(previous, default=float)))
    assert merged["codec_vs_topk_ratio_11M"] == 0.25  # the fresh section wins
    assert merged["flower_overhead_ratio_cnn_16"] == 1.4  # the section not run is kept, with its headline key
    assert merged["section_runs"]["codec"]["command"] == "sparsepush bench --only codec"
    assert merged["section_runs"]["overhead"]["command"] == "sparsepush bench"
    assert math.isnan(merged["topk_vs_memory_pass_ratio_11M"])  # no topk section in either run: n/a, not an error
    assert "| TopK compressor / one abs().sum() pass, 11M (worst of 3 fractions) | <= 5 | n/a | no |" in (
        bench_report.render_md(merged | {"sections": {}})
    )


def test_deploy_section_gives_the_goal_row(tmp_path):
    assert "deploy" in bench.SECTIONS
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"round": r, "wall_s": w}) + "\n" for r, w in ((1, 9.0), (2, 12.0), (3, 15.0)))
    )
    assert bench_flower._s_per_round(metrics) == 3.0
    sections = {"deploy": {"deploy_s_per_round": 3.0, "sim_s_per_round": 0.5, "nodes": 4, "rounds": 3}}
    rep = bench_report.assemble(
        sections, bench_measure.machine_info(), "sparsepush bench --only deploy", "full", {"before": [0.0]}
    )
    assert rep["deploy_s_per_round_4_nodes"] == 3.0 and rep["sim_s_per_round_4_nodes"] == 0.5
