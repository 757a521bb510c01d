"""A real Ray cluster of two Ray nodes on this machine: the Flower simulation attached to it, compared with
a single-machine run of the same config and seed. Writes ``results/ray_cluster.json`` and ``results/ray_cluster.md``.

Run: ``python -m flower_sparsepush.simulations.ray_cluster`` (about two minutes on 2 cores; ``--help`` for options).

What it does, in order, printing one progress line per step:

1. ``ray start --head --num-cpus 1`` and ``ray start --address <head> --num-cpus 1`` (Ray's own way of making a
   cluster), each with its own ports that the OS reports free, one private ``--temp-dir`` and the dashboard off. The
   head writes its address to ``<temp-dir>/ray_current_cluster`` only, never to ``/tmp/ray``, so no other
   ``ray.init()`` on this shared machine attaches to it by accident.
2. The cluster run: a child process with ``RAY_ADDRESS=<head>`` runs :func:`launch.simulate` (Flower's
   ``run_simulation``; Flower's ``ray.init()`` then attaches to the cluster instead of starting Ray). Each ClientApp
   actor asks for one CPU (``launch.BACKEND_CONFIG``), so with two 1-CPU nodes Flower's pool holds one actor per
   node. A Flower client mod (:class:`NodeRecorder`, which passes every message through unchanged) appends one line
   per ClientApp call with the Ray node id, actor id and PID of the process that ran it; after the run the child
   reads Ray's actor table (GCS) as a second, independent record of where each ``ClientAppActor`` lived.
   Then (unless ``--no-flwr-run``) the same config through the ``flwr run`` path on the same cluster:
   :func:`launch.flwr_run` in a child with ``RAY_ADDRESS`` set, so the private ``flower-superlink --simulation`` and
   the simulation process it spawns attach too; that ClientApp comes from the project without the recorder, so
   Ray's actor table (only the actors that appeared during that run) says where its actors lived.
3. The single-machine run: the same config and seed in a child with ``RAY_ADDRESS=local`` (a fresh local Ray,
   whatever cluster exists on the machine), with the same recorder.
4. Comparison of every metric of every evaluation row (``metrics.jsonl``, all fields but wall-clock times), the
   summary's bit counts and each node's final model (``nodes.npz``).
5. Cleanup by PID: every process started here carries an environment marker (``SPARSEPUSH_RAY_CLUSTER=<token>``)
   that Ray's daemons, agents and workers inherit; all of them (and their descendants) get SIGTERM, then SIGKILL,
   also on errors, Ctrl-C and SIGTERM, and the report lists any that were left (none expected). ``ray stop`` is not
   used: it kills every Ray process of the machine, other people's too.

Modules: this one runs the experiment and writes the report; ``ray_cluster_procs`` starts the cluster and stops
every process by PID, ``ray_cluster_runs`` runs each config in a child process and reads the evidence.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.simulations.ray_cluster_procs import (
    NODE_STORE_ENV,
    Processes,
    log,
    marked_pids,
    start_cluster,
    stop_pids,
)
from flower_sparsepush.simulations.ray_cluster_runs import child, compare_runs, placement, read_records, run_child

RUN_CFG = {
    "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4",
    "gamma": 0.3,
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 6,
    "graph": "exponential",
    "num-rounds": 4,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.9,
    "eval-every": 2,
    "save-nodes": True,
    "seed": 0,
}


# --------------------------------------------------------------------------- the whole experiment


def run(
    out_dir: str | os.PathLike = "results",
    keep_temp: bool = False,
    timeout: float = 600.0,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
    flwr_run_too: bool = True,
) -> dict[str, Any]:
    """Cluster run, single-machine run, comparison; writes ``<out_dir>/ray_cluster.json`` and ``.md``.
    ``overrides`` change :data:`RUN_CFG` (tests use a smaller run); ``command`` is the command line recorded;
    ``flwr_run_too`` adds the ``flwr run`` path (private SuperLink with RAY_ADDRESS) on the same cluster."""
    if command is None:
        command = shlex.join(["python", "-m", "flower_sparsepush.simulations.ray_cluster", *sys.argv[1:]])
    procs = Processes()
    rep: dict[str, Any] = {"command": command, "when": time.strftime("%Y-%m-%d %H:%M"), "ok": False}
    rep["machine"] = {"cores": os.cpu_count(), "host_python": sys.version.split()[0]}
    t_all = time.time()
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _experiment(rep, procs, timeout, overrides, flwr_run_too)
    except BaseException as err:
        rep["error"] = f"{type(err).__name__}: {err}"
        log(f"failed: {rep['error']}")
        if isinstance(err, KeyboardInterrupt):
            raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        left = procs.cleanup(keep_temp=keep_temp)
        rep["processes_stopped"] = procs.stopped
        rep["leftover_pids"] = left
        rep["total_wall_s"] = round(time.time() - t_all, 2)
        log(f"cleanup: {'no process left' if not left else f'LEFT RUNNING: {left}'}")
        write_report(rep, Path(out_dir))
    return rep


def _experiment(
    rep: dict[str, Any], procs: Processes, timeout: float, overrides: dict[str, Any] | None, flwr_run_too: bool
) -> None:
    """The steps of :func:`run`, each adding to ``rep`` (so that a failure leaves what was measured before it)."""
    from flower_sparsepush.run.config import validate

    runs = Path(procs.temp_dir) / "runs"
    raw = RUN_CFG | (overrides or {})
    base = validate(raw | {"out-dir": str(runs)}).as_dict()  # the children get it as JSON
    rep["config"] = {k: base[k] for k in raw}
    rep["node_store"] = (
        "context.state"
        if base["node-store"] == "context"
        else f"files in {base['node-store'] or '$' + NODE_STORE_ENV + ' = <temp dir>/node-store'} (one disk)"
    )
    cluster = start_cluster(procs)
    rep["cluster"] = cluster
    log(f"both Ray nodes up in {cluster['startup_s']:.1f}s; cluster run (RAY_ADDRESS={cluster['address']})")
    res_c, place_c, roles = _cluster_run(procs, base, cluster["address"], timeout)
    if flwr_run_too:
        rep["flwr_run_cluster"] = _flwr_run_path(procs, base, cluster["address"], roles, timeout)
    log("stopping the cluster's processes")
    cluster_pids = marked_pids(procs.token, procs.temp_dir)
    procs.stopped += len(cluster_pids)
    stop_pids(cluster_pids)
    log(f"stopped {len(cluster_pids)} processes; single-machine run (a fresh local Ray)")
    res_s, place_s = _single_run(procs, base, timeout)
    cmp_ = compare_runs(runs / "cluster", runs / "single")
    if "per_node" in rep.get("flwr_run_cluster", {}):
        rep["flwr_run_cluster"]["comparison"] = compare_runs(runs / "flwr-cluster", runs / "single")
    rep.update(_evidence(res_c, place_c, roles, res_s, place_s, cmp_))
    rep["ok"] = rep["nodes_used"] == 2 and cmp_["equal"]
    log(
        f"metrics equal: {cmp_['equal']} (max abs diff {cmp_['max_abs_metric_diff']:.3g}, bit-for-bit "
        f"{cmp_['metrics_bitwise_equal']}; models max abs diff {cmp_.get('max_abs_model_diff', float('nan')):.3g})"
    )


def _cluster_run(
    procs: Processes, base: dict[str, Any], address: str, timeout: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The config through ``simulate`` attached to the cluster, with the recorder: the child's result, where its
    ClientApp calls ran, and the role (head, worker) of each Ray node id."""
    rec_c = str(Path(procs.temp_dir) / "cluster.calls.jsonl")
    cfg_c = base | {"run-name": "cluster"}
    spec = {"name": "cluster", "cfg": cfg_c, "record": rec_c, "cluster": True, "expect_nodes": 2}
    res_c = run_child(procs, spec, procs.env(RAY_ADDRESS=address), timeout)
    roles = {n["node_id"]: n["role"] for n in res_c.get("ray_nodes", [])}
    place_c = placement(read_records(rec_c), roles)
    log(
        f"cluster run done in {res_c['wall_s']:.1f}s: ClientApp calls on {place_c['nodes_used']} Ray node(s): "
        + ", ".join(f"{v['role']} {v['calls']} calls/{v['actors']} actor(s)" for v in place_c["per_node"].values())
    )
    return res_c, place_c, roles


def _flwr_run_path(
    procs: Processes, base: dict[str, Any], address: str, roles: dict[str, str], timeout: float
) -> dict[str, Any]:
    """The config through the ``flwr run`` path on the same cluster: where Ray's actor table says its
    ClientAppActors lived, or the error (the ``simulate`` path is the headline, so a failure here is recorded)."""
    log("flwr run path on the same cluster: flower-superlink --simulation with RAY_ADDRESS, then flwr run")
    cfg_f = base | {"run-name": "flwr-cluster"}
    spec = {"name": "flwr-cluster", "cfg": cfg_f, "cluster": True, "expect_nodes": 2, "engine": "flwr-run"}
    try:
        res_f = run_child(procs, spec, procs.env(RAY_ADDRESS=address), timeout, quiet=True)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        error = f"{type(err).__name__}: {err}"[-3000:]
        log(f"flwr run path failed: {error[:300]}")
        return {"error": error}
    per_f: dict[str, Any] = {}
    for a in res_f.get("gcs_actors", []):
        n = per_f.setdefault(a["node_id"], {"role": roles.get(a["node_id"], "unknown"), "actors": 0})
        n["actors"] += 1
    log(
        f"flwr run path done in {res_f['wall_s']:.1f}s: ClientAppActors on {len(per_f)} Ray node(s) (Ray's actor table)"
    )
    return {
        "wall_s": res_f["wall_s"],
        "run_s": res_f["run_s"],
        "actor_nodes": len(per_f),
        "per_node": per_f,
        **({"gcs_error": res_f["gcs_actors_error"]} if "gcs_actors_error" in res_f else {}),
    }


def _single_run(procs: Processes, base: dict[str, Any], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same config and seed on a fresh local Ray, with the recorder: the child's result and where calls ran."""
    rec_s = str(Path(procs.temp_dir) / "single.calls.jsonl")
    cfg_s = base | {"run-name": "single"}
    spec = {"name": "single", "cfg": cfg_s, "record": rec_s, "cluster": False}
    res_s = run_child(procs, spec, procs.env(RAY_ADDRESS="local"), timeout)
    place_s = placement(read_records(rec_s))
    log(f"single-machine run done in {res_s['wall_s']:.1f}s: ClientApp calls on {place_s['nodes_used']} Ray node(s)")
    return res_s, place_s


def _evidence(
    res_c: dict[str, Any],
    place_c: dict[str, Any],
    roles: dict[str, str],
    res_s: dict[str, Any],
    place_s: dict[str, Any],
    cmp_: dict[str, Any],
) -> dict[str, Any]:
    """The report's record of both runs and their comparison; a Ray node counts only when the calls recorded on it
    ran on the cluster's nodes."""
    gcs = res_c.get("gcs_actors", [])
    gcs_nodes = sorted({a["node_id"] for a in gcs})
    recorded_in_cluster = set(place_c["per_node"]) <= set(roles) and bool(roles)
    return {
        "ray_nodes": res_c.get("ray_nodes", []),
        "cluster_run": {
            "wall_s": res_c["wall_s"],
            "simulate_s": res_c["run_s"],
            **place_c,
            "calls_ran_on_cluster_nodes": recorded_in_cluster,
            "gcs_client_app_actors": gcs,
            "gcs_actor_nodes": len(gcs_nodes),
            **({"gcs_error": res_c["gcs_actors_error"]} if "gcs_actors_error" in res_c else {}),
        },
        "single_run": {"wall_s": res_s["wall_s"], "simulate_s": res_s["run_s"], **place_s},
        "comparison": cmp_,
        "nodes_used": place_c["nodes_used"] if recorded_in_cluster else 0,
        "metrics_equal": cmp_["equal"],
        "max_abs_metric_diff": cmp_["max_abs_metric_diff"],
    }


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def write_report(rep: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_cluster.json").write_text(json.dumps(rep, indent=2, default=float) + "\n")
    (out / "ray_cluster.md").write_text(render_md(rep))
    log(f"written: {out / 'ray_cluster.json'}, {out / 'ray_cluster.md'}")


def render_md(rep: dict[str, Any]) -> str:
    lines = [
        "# Flower simulation on a two-node Ray cluster (one machine)",
        "",
        f"Regenerate: `{rep['command']}` ({rep.get('when')}, {rep['machine']['cores']} cores). Steps and the "
        "multi-machine recipe: [docs/ray-cluster.md](../docs/ray-cluster.md).",
        "",
    ]
    if "error" in rep:
        lines += [f"**Failed**: `{rep['error']}`", ""]
    cl = rep.get("cluster", {})
    if cl:
        lines += [
            "```bash",
            cl["head_command"],
            cl["worker_command"].replace(cl["address"], "<head address>"),
            "```",
            "",
        ]
    if rep.get("cluster_run") and rep.get("single_run") and rep.get("comparison"):
        lines += _runs_md(rep)
    lines.append(
        f"- Processes stopped by PID: {rep.get('processes_stopped', 0)}; left running: "
        f"{rep.get('leftover_pids') or 'none'}."
    )
    return "\n".join(lines) + "\n"


def _runs_md(rep: dict[str, Any]) -> list[str]:
    """The run, where its ClientApp calls ran, and how it compares with the single-machine run."""
    cl, cr, sr, cmp_ = rep["cluster"], rep["cluster_run"], rep["single_run"], rep["comparison"]
    c = rep["config"]
    lines = [
        f"Run: {c['strategy']} {c['compressor']}, {c['num-nodes']} virtual nodes, {c['num-rounds']} rounds, "
        f"{c['dataset']} / {c['model']}, seed {c['seed']}; each ClientApp actor asks for 1 CPU; node state: "
        f"{rep.get('node_store', 'n/a')}.",
        "",
        "| Ray node | role | ClientApp calls | actors | virtual nodes served |",
        "|---|---|---|---|---|",
    ]
    for node, v in cr["per_node"].items():
        lines.append(
            f"| `{node[:12]}` | {v['role']} | {v['calls']} | {v['actors']} | {', '.join(map(str, v['partitions']))} |"
        )
    differ = ", ".join(f"{k} by {v:.3g}" for k, v in cmp_["differing_fields"].items())
    return lines + [
        "",
        f"- Ray nodes that hosted ClientApp actors: **{rep['nodes_used']}** (recorded per call by a client mod; "
        f"Ray's actor table agrees: ClientAppActors on {cr['gcs_actor_nodes']} node(s)).",
        f"- Metrics vs the single-machine run (fresh local Ray, {sr['nodes_used']} node): "
        f"{'**equal**' if cmp_['equal'] else '**different**'}; max abs difference {cmp_['max_abs_metric_diff']:.3g} "
        f"over {cmp_['rows'][0]} evaluation rows x {len(cmp_['fields'])} fields (clock fields excluded), "
        f"bit-for-bit: {'yes' if cmp_['metrics_bitwise_equal'] else 'no'}"
        + (f" (differ: {differ})" if cmp_["differing_fields"] else "")
        + f"; bit counts equal: {'yes' if cmp_['bits_equal'] else 'no'}; final node models max abs difference "
        f"{cmp_.get('max_abs_model_diff', float('nan')):.3g}.",
        *_flwr_run_md(rep.get("flwr_run_cluster")),
        f"- Wall time: cluster {cl['startup_s']:.1f} s to start both nodes + {cr['wall_s']:.1f} s run; "
        f"single machine {sr['wall_s']:.1f} s (each run includes Ray start or attach and Python start-up).",
    ]


def _flwr_run_md(fr: dict[str, Any] | None) -> list[str]:
    if not fr:
        return []
    if "error" in fr:
        return [f"- The `flwr run` path on the same cluster failed: `{fr['error'].splitlines()[0]}`."]
    c = fr.get("comparison", {})
    roles = ", ".join(f"{v['role']} {v['actors']}" for v in fr["per_node"].values())
    return [
        f"- The `flwr run` path on the same cluster (private `flower-superlink --simulation` started with "
        f"RAY_ADDRESS, then `flwr run`; {fr['wall_s']:.1f} s): ClientAppActors on {fr['actor_nodes']} Ray node(s) "
        f"({roles}; Ray's actor table, no per-call record on this path); metrics vs the single-machine run "
        f"{'equal' if c.get('equal') else 'different'} (max abs difference {c.get('max_abs_metric_diff', math.nan):.3g})."
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        res = child(json.loads(Path(argv[1]).read_text()))
        Path(argv[2]).write_text(json.dumps(res))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="where ray_cluster.json and ray_cluster.md go")
    parser.add_argument("--keep-temp", action="store_true", help="keep the Ray temp dir (logs) and the run folders")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is stopped")
    parser.add_argument("--no-flwr-run", action="store_true", help="skip the `flwr run` path on the cluster")
    args = parser.parse_args(argv)
    rep = run(args.out, keep_temp=args.keep_temp, timeout=args.timeout, flwr_run_too=not args.no_flwr_run)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
