"""The benchmark's sections that run whole configs through Flower, each run in a subprocess with its process tree's
memory sampled (:func:`bench_measure.run_worker`): ``overhead`` (Flower against the in-process loop), ``scale``
(growing node counts), ``ray`` (a two-node Ray cluster) and ``deploy`` (the Deployment Engine with node workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.simulations.bench_measure import bench_command, loadavg, run_worker, stats


def _per_round(res: dict[str, Any], skip: int = 1) -> dict[str, float]:
    return stats(res.get("round_s", [])[skip:])


def _vs_inprocess(row: dict[str, Any], key: str) -> float:
    """Median seconds per round of ``row[key]`` / those of the in-process loop."""
    return row[key]["median"] / row["inprocess_s_per_round"]["median"]


def _overhead_row(base: dict[str, Any], cores: int, mem_limit: float, two_actors: bool) -> dict[str, Any]:
    """One (model, nodes): in-process, Flower with one actor (then with ``node-store=context``), and, with
    ``two_actors``, Flower with one CPU per actor."""
    flower = base | {"mode": "flower", "cpus_per_client": cores, "ray_cpus": cores}
    inp = run_worker(base | {"mode": "inprocess"}, mem_limit, 1800)
    fl = run_worker(flower, mem_limit, 1800)
    row = {
        "inprocess_s_per_round": _per_round(inp),
        "flower_s_per_round": _per_round(fl),
        "flower_startup_s": fl.get("startup_s"),
        "flower_total_s": fl.get("total_s"),
        "flower_peak_pss_gib": fl["peak_pss_gib"],
        "inprocess_peak_pss_gib": inp["peak_pss_gib"],
        "ok": inp["ok"] and fl["ok"],
        "load_after": loadavg(),
    }
    if row["ok"]:
        row["ratio"] = _vs_inprocess(row, "flower_s_per_round")
    else:
        row["errors"] = [r.get("log_tail", "") for r in (inp, fl) if not r["ok"]]
    if row["ok"]:  # the node-store choice: state files (default) against the whole state in context.state
        flc = run_worker(flower | {"config": {"node-store": "context"}}, mem_limit, 1800)
        if flc["ok"]:
            row["flower_context_s_per_round"] = _per_round(flc)
            row["ratio_context"] = _vs_inprocess(row, "flower_context_s_per_round")
    if two_actors:
        fl2 = run_worker(flower | {"cpus_per_client": 1}, mem_limit, 1800)
        row["flower_2actors_s_per_round"] = _per_round(fl2)
        if fl2["ok"] and row["ok"]:
            row["ratio_2actors"] = _vs_inprocess(row, "flower_2actors_s_per_round")
    return row


def section_overhead(cases, rounds: int, local_steps: int, dataset: str, mem_limit: float, log, two_actors=()):
    """Flower (one actor) vs in-process seconds per round for each (model, nodes)."""
    out = {}
    cores = os.cpu_count() or 2
    for model, nodes in cases:
        key = f"{model}_{nodes}"
        base = {"model": model, "nodes": nodes, "rounds": rounds, "local_steps": local_steps, "dataset": dataset}
        row = out[key] = _overhead_row(base, cores, mem_limit, (model, nodes) in two_actors)
        log(
            f"overhead {key}: in-process {row['inprocess_s_per_round']['median']:.3f} s/round, Flower "
            f"{row['flower_s_per_round']['median']:.3f} s/round, ratio {row.get('ratio', float('nan')):.2f}"
        )
    return out


SCALE_MODELS = ("cnn", "mlp", "logreg")


def section_scale(
    ladder,
    rounds: int,
    local_steps: int,
    dataset: str,
    mem_limit: float,
    log,
    timeout: float,
    model: str = "cnn",
    linear: bool = True,
):
    """``model`` through Flower (two actors, one CPU each) at growing node counts; stops at the first failure.

    With ``linear`` (the default) the runs use what keeps a round O(N) on Flower's simulation engine
    (linkstate.py: indexed message lookup, reply polling scaled to the node count); ``linear=False`` measures
    Flower's engine as it comes. Each row has ``s_per_node_round`` (median seconds per round / nodes)."""
    if model not in SCALE_MODELS:
        raise ValueError(f"scale model {model!r}: one of {', '.join(SCALE_MODELS)}")
    out = {}
    for nodes in ladder:
        spec = {
            "linear": linear,
            "model": model,
            "nodes": nodes,
            "rounds": rounds,
            "local_steps": local_steps,
            "dataset": dataset,
            "mode": "flower",
            "cpus_per_client": 1,
            "ray_cpus": os.cpu_count() or 2,
        }
        res = run_worker(spec, mem_limit, timeout)
        row = {
            "ok": res["ok"],
            "model": model,
            "linear": linear,
            "s_per_round": _per_round(res),
            "peak_rss_gib": res["peak_rss_gib"],
            "peak_pss_gib": res["peak_pss_gib"],
            "peak_processes": res["peak_processes"],
            "startup_s": res.get("startup_s"),
            "total_s": res.get("total_s"),
            "wall_s": res["wall_s"],
            "mem_limit_hit": res["mem_limit_hit"],
            "timed_out": res["timed_out"],
            "load_after": loadavg(),
        }
        row["s_per_node_round"] = row["s_per_round"]["median"] / nodes if row["s_per_round"]["n"] else float("nan")
        if not res["ok"]:
            row["log_tail"] = res.get("log_tail", "")
        out[str(nodes)] = row
        log(
            f"scale {model} {nodes} nodes: ok={row['ok']} {row['s_per_round']['median']:.2f} s/round "
            f"({1000 * row['s_per_node_round']:.1f} ms per node), peak PSS "
            f"{row['peak_pss_gib']:.2f} GiB (RSS sum {row['peak_rss_gib']:.2f} GiB), wall {row['wall_s']:.0f} s"
        )
        if not res["ok"]:
            break
    return out


def section_ray(out_dir: str, log) -> dict[str, Any]:
    """Two Ray nodes on this machine, the Flower run attached to them vs a single-machine run
    (:mod:`flower_sparsepush.simulations.ray_cluster`, which also writes ray_cluster.json/.md to ``out_dir``)."""
    from flower_sparsepush.simulations import ray_cluster

    rep = ray_cluster.run(out_dir, command=bench_command("sparsepush bench --only ray"))
    cmp_ = rep.get("comparison", {})
    out = {
        "nodes_used": rep.get("nodes_used", 0),
        "metrics_equal": bool(rep.get("metrics_equal", False)),
        "max_abs_metric_diff": rep.get("max_abs_metric_diff", float("nan")),
        "metrics_bitwise_equal": cmp_.get("metrics_bitwise_equal"),
        "differing_fields": cmp_.get("differing_fields"),
        "max_abs_model_diff": cmp_.get("max_abs_model_diff"),
        "per_node": rep.get("cluster_run", {}).get("per_node", {}),
        "cluster_startup_s": rep.get("cluster", {}).get("startup_s"),
        "cluster_run_s": rep.get("cluster_run", {}).get("wall_s"),
        "single_run_s": rep.get("single_run", {}).get("wall_s"),
        "leftover_pids": rep.get("leftover_pids", []),
        "report": str(Path(out_dir) / "ray_cluster.json"),
    }
    fr = rep.get("flwr_run_cluster", {})  # the `flwr run` path (SuperLink with RAY_ADDRESS) on the same cluster
    if fr:
        out["flwr_run"] = {
            "actor_nodes": fr.get("actor_nodes", 0),
            "metrics_equal": bool(fr.get("comparison", {}).get("equal", False)),
            "wall_s": fr.get("wall_s"),
            **({"error": fr["error"]} if "error" in fr else {}),
        }
    if "error" in rep:
        out["error"] = rep["error"]
    log(f"ray: {out['nodes_used']} Ray node(s) hosted ClientApp actors, metrics equal: {out['metrics_equal']}")
    return out


def _s_per_round(metrics_path: Path) -> float:
    """Seconds per round from the ServerApp's cumulative ``wall_s``, after the first round (start-up)."""
    walls = [float(r["wall_s"]) for r in map(json.loads, metrics_path.read_text().splitlines()) if "wall_s" in r]
    return (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1 else float("nan")


def section_deploy(out_dir: str, log, rounds: int = 6, nodes: int = 4) -> dict[str, Any]:
    """The same small config (deploy-local's: synthetic, mlp, 4 nodes, eval every round) through ``simulate`` (in a
    subprocess) and through ``deploy-local`` with node workers (`sparsepush node`); s/round after round 1."""
    from flower_sparsepush.deploy.local import DEPLOY_DEFAULTS, SUPERNODE_POLL, deploy_run
    from flower_sparsepush.run.config import validate
    from flower_sparsepush.run.processes import pid_alive

    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    base = dict(DEPLOY_DEFAULTS) | {"num-nodes": nodes, "num-rounds": rounds}
    out: dict[str, Any] = {"config": base, "rounds": rounds, "nodes": nodes, "supernode_poll_s": SUPERNODE_POLL}
    sim_cfg = validate(base | {"out-dir": str(tmp / "sim"), "run-name": "sim"})
    code = "import json,sys; from flower_sparsepush.flower.launch import simulate; simulate(json.loads(sys.argv[1]))"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(sim_cfg.as_dict())], capture_output=True, text=True, timeout=1800
    )
    out["sim_wall_s"] = time.time() - t0
    if proc.returncode != 0:
        out["sim_error"] = proc.stderr[-2000:]
    else:
        out["sim_s_per_round"] = _s_per_round(tmp / "sim" / "sim" / "metrics.jsonl")
    dep_cfg = validate(base | {"out-dir": str(tmp / "dep"), "run-name": "dep"})
    t0 = time.time()
    try:
        res, dep = deploy_run(dep_cfg, log_dir=str(tmp / "logs"), timeout=1800, workers=True)
        out["deploy_s_per_round"] = _s_per_round(res / "metrics.jsonl")
        out["leftover_pids"] = sorted(p for p in dep.seen_pids if pid_alive(p))
    except Exception as err:  # noqa: BLE001 - recorded in the report
        out["deploy_error"] = str(err)[-2000:]
    out["deploy_wall_s"] = time.time() - t0
    out["logs"] = str(tmp / "logs")
    log(
        f"deploy: {nodes} nodes, simulate {out.get('sim_s_per_round', float('nan')):.2f} s/round, deploy-local with "
        f"node workers {out.get('deploy_s_per_round', float('nan')):.2f} s/round"
    )
    return out
