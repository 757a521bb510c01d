"""The runs of the Ray cluster experiment (:mod:`ray_cluster`) and the evidence they leave: the child process that
runs one config (:func:`child`, started by :func:`run_child`), the client mod that records where each ClientApp
call ran (:class:`NodeRecorder`), Ray's node and actor tables, where the calls ran (:func:`placement`) and the
comparison of two runs' results (:func:`compare_runs`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.simulations.ray_cluster_procs import Processes

TIME_FIELDS = ("wall_s",)  # metric fields that are clock readings, not results
TOLERANCE = 1e-6


# --------------------------------------------------------------------------- inside a run (child process, actors)


class NodeRecorder:
    """A Flower client mod that records where each ClientApp call ran and changes nothing: one JSON line per call
    (Ray node id, actor id, PID, message type, partition id) appended to ``path``. The ClientApp actors pickle it;
    ``path`` must be on a filesystem every Ray node can write (here: one machine)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, msg, context, call_next):
        import ray

        ctx = ray.get_runtime_context()
        rec = {
            "ray_node_id": ctx.get_node_id(),
            "actor_id": ctx.get_actor_id(),
            "pid": os.getpid(),
            "type": msg.metadata.message_type,
            "partition": int(context.node_config.get("partition-id", -1)),
        }
        reply = call_next(msg, context)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return reply


def _ray_nodes(expect: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Attach to the cluster in RAY_ADDRESS, wait until ``expect`` nodes are alive, list them, detach."""
    import ray

    ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        end = time.time() + timeout
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= expect or time.time() > end:
                break
            time.sleep(0.5)
        return [
            {
                "node_id": n["NodeID"],
                "role": "head" if "node:__internal_head__" in n["Resources"] else "worker",
                "cpus": n["Resources"].get("CPU"),
            }
            for n in alive
        ]
    finally:
        ray.shutdown()


def _actor_table() -> list[dict[str, Any]]:
    """Ray's actor table (GCS, no dashboard needed; a debugging API): where each ClientAppActor lived."""
    import ray
    from ray._private import state

    ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        rows = state.actors()
        return [
            {"actor_id": a["ActorID"], "node_id": a["Address"]["NodeID"], "pid": a["Pid"], "state": a["State"]}
            for a in rows.values()
            if a["ActorClassName"].endswith("ClientAppActor")
        ]
    finally:
        ray.shutdown()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run (in its own process): optionally wait for the cluster's nodes, run, read the actor table.
    ``engine`` "simulate": :func:`launch.simulate` with the recorder mod; "flwr-run": :func:`launch.flwr_run` (a
    private ``flower-superlink --simulation`` that inherits RAY_ADDRESS, then ``flwr run``; the ClientApp is loaded
    from the project, so no mod: the actor table alone says where its actors lived)."""
    from flower_sparsepush.flower.launch import flwr_run, simulate

    out: dict[str, Any] = {"ray_address_env": os.environ.get("RAY_ADDRESS")}
    before: set[str] = set()
    if spec["cluster"]:
        out["ray_nodes"] = _ray_nodes(spec["expect_nodes"])
        if spec.get("engine") == "flwr-run":
            before = {a["actor_id"] for a in _actor_table()}  # actors of earlier runs on this cluster
    t0 = time.time()
    if spec.get("engine") == "flwr-run":
        flwr_run(spec["cfg"])
    else:
        simulate(spec["cfg"], client_mods=[NodeRecorder(spec["record"])])
    out["run_s"] = round(time.time() - t0, 2)
    if spec["cluster"]:
        try:
            out["gcs_actors"] = [a for a in _actor_table() if a["actor_id"] not in before]
        except Exception as err:  # noqa: BLE001 - a cross-check only; the recorder's lines are the evidence
            out["gcs_actors_error"] = repr(err)
    return out


def run_child(
    procs: Processes, spec: dict[str, Any], env: dict[str, str], timeout: float, quiet: bool = False
) -> dict[str, Any]:
    """Run :func:`child` in a subprocess (its output to this terminal, or with ``quiet`` to a log file shown only
    when it fails); stopped when it passes ``timeout`` seconds."""
    spec_path = Path(procs.temp_dir) / f"{spec['name']}.spec.json"
    out_path = Path(procs.temp_dir) / f"{spec['name']}.out.json"
    log_path = Path(procs.temp_dir) / f"{spec['name']}.log"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "flower_sparsepush.simulations.ray_cluster", "--child", str(spec_path), str(out_path)]
    t0 = time.time()
    sink = open(log_path, "w") if quiet else None
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sink, stderr=sink and subprocess.STDOUT)
    finally:
        if sink:
            sink.close()
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        raise
    if rc != 0 or not out_path.exists():
        where = f"its log:\n{log_path.read_text()[-3000:]}" if quiet else "see its output above"
        raise RuntimeError(f"the {spec['name']} run failed (exit {rc}); {where}")
    res = json.loads(out_path.read_text())
    res["wall_s"] = round(time.time() - t0, 2)
    return res


# --------------------------------------------------------------------------- evidence


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def placement(records: list[dict[str, Any]], roles: dict[str, str] | None = None) -> dict[str, Any]:
    """Distinct Ray nodes that ran ClientApp calls, and per node: calls, actors, partitions (by role when known)."""
    per: dict[str, dict[str, Any]] = {}
    for r in records:
        n = per.setdefault(r["ray_node_id"], {"calls": 0, "actors": set(), "partitions": set()})
        n["calls"] += 1
        n["actors"].add(r["actor_id"])
        n["partitions"].add(r["partition"])
    roles = roles or {}
    nodes = {
        node: {
            "role": roles.get(node, "unknown"),
            "calls": v["calls"],
            "actors": len(v["actors"]),
            "partitions": sorted(v["partitions"]),
        }
        for node, v in sorted(per.items(), key=lambda kv: (roles.get(kv[0], "~"), kv[0]))
    }
    return {"nodes_used": len(per), "calls": len(records), "per_node": nodes}


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Every numeric metric of every evaluation row (clock fields excluded), the summary's bit counts and the final
    node models of two run folders: max absolute difference and whether all are bit-for-bit equal."""
    import numpy as np

    from flower_sparsepush.run.results import read_metrics

    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    out: dict[str, Any] = {"rows": [len(ra), len(rb)], "fields": []}
    diffs: list[float] = []
    differing: dict[str, float] = {}
    exact = len(ra) == len(rb) and len(ra) > 0
    for x, y in zip(ra, rb):
        for k in sorted(set(x) | set(y)):
            if k in TIME_FIELDS:
                continue
            vx, vy = x.get(k), y.get(k)
            if k not in out["fields"]:
                out["fields"].append(k)
            if isinstance(vx, (int, float)) and isinstance(vy, (int, float)):
                d = abs(float(vx) - float(vy)) if not (math.isnan(vx) and math.isnan(vy)) else 0.0
                diffs.append(d)
                if d > 0:
                    differing[k] = max(differing.get(k, 0.0), d)
                exact = exact and (vx == vy or (math.isnan(vx) and math.isnan(vy)))
            else:
                exact = exact and vx == vy
                if vx != vy:
                    diffs.append(math.inf)
                    differing[k] = math.inf
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    bits_equal = all(sa.get(k) == sb.get(k) for k in ("bits_sent_by_node", "bits_received_by_node"))
    out["max_abs_metric_diff"] = max(diffs) if diffs else math.inf
    out["metrics_bitwise_equal"] = exact
    out["differing_fields"] = differing  # field -> max abs difference, for the fields not bit-for-bit equal
    out["bits_equal"] = bits_equal
    if (a / "nodes.npz").exists() and (b / "nodes.npz").exists():
        na, nb = np.load(a / "nodes.npz"), np.load(b / "nodes.npz")
        same_keys = sorted(na.files) == sorted(nb.files)
        out["max_abs_model_diff"] = (
            max(float(np.abs(na[k] - nb[k]).max()) for k in na.files) if same_keys and na.files else math.inf
        )
        out["models_bitwise_equal"] = same_keys and all(np.array_equal(na[k], nb[k]) for k in na.files)
    out["equal"] = out["max_abs_metric_diff"] <= TOLERANCE and bits_equal and len(ra) == len(rb) > 0
    return out
