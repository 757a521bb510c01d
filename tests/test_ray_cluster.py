"""simulations/ray_cluster*.py: the cheap parts (commands and ports, placement and comparison logic, cleanup by PID)
and one real run: two Ray nodes on this machine, the Flower simulation attached to them, compared with a
single-machine run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flower_sparsepush.simulations import ray_cluster as rc
from flower_sparsepush.simulations import ray_cluster_procs as rcp
from flower_sparsepush.simulations import ray_cluster_runs as rcr


def test_commands_start_two_one_cpu_nodes_without_a_shared_port(tmp_path):
    taken: set[int] = set()
    head_ports = rcp.pick_ports(rcp.HEAD_PORT_NAMES, taken)
    worker_ports = rcp.pick_ports(rcp.WORKER_PORT_NAMES, taken)
    ports = list(head_ports.values()) + list(worker_ports.values())
    assert len(set(ports)) == len(ports) == len(taken)  # no port used twice on the one host
    head, worker = rcp.node_commands(str(tmp_path), head_ports, worker_ports)
    assert head[1:3] == ["start", "--head"] and "--address={address}" in worker and "--head" not in worker
    for cmd, named in ((head, head_ports), (worker, worker_ports)):
        assert "--num-cpus=1" in cmd and f"--temp-dir={tmp_path}" in cmd and "--disable-usage-stats" in cmd
        assert all(f"--{k}={v}" in cmd for k, v in named.items())
    assert "--include-dashboard=false" in head
    assert f"--port={head_ports['port']}" in head


def _rec(node, actor, part):
    return {"ray_node_id": node, "actor_id": actor, "pid": 1, "type": "train", "partition": part}


def test_placement_counts_nodes_calls_and_actors():
    records = [_rec("n1", "a1", 0), _rec("n1", "a1", 1), _rec("n2", "a2", 1), _rec("n1", "a3", 2)]
    p = rcr.placement(records, {"n1": "head", "n2": "worker"})
    assert p["nodes_used"] == 2 and p["calls"] == 4
    assert p["per_node"]["n1"] == {"role": "head", "calls": 3, "actors": 2, "partitions": [0, 1, 2]}
    assert p["per_node"]["n2"] == {"role": "worker", "calls": 1, "actors": 1, "partitions": [1]}
    assert rcr.placement([])["nodes_used"] == 0
    assert rcr.placement([_rec("n3", "a", 0)])["per_node"]["n3"]["role"] == "unknown"


def _run_dir(path: Path, rows: list[dict], bits=(10, 20), z=0.5) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"bits_sent_by_node": list(bits), "bits_received_by_node": [1, 2]}))
    np.savez(path / "nodes.npz", z0=np.full(3, z, np.float32), z1=np.ones(3, np.float32))
    return path


ROWS = [
    {"round": 2, "acc_consensus": 0.5, "acc_node_mean": 0.6366666666666666, "loss": 1.25, "wall_s": 3.0},
    {"round": 4, "acc_consensus": 0.75, "acc_node_mean": 0.7, "loss": 1.0, "wall_s": 6.0},
]


def test_comparison_ignores_clock_fields_and_reports_what_differs(tmp_path):
    a = _run_dir(tmp_path / "a", ROWS)
    same = _run_dir(tmp_path / "b", [r | {"wall_s": r["wall_s"] * 7} for r in ROWS])  # only the clock differs
    c = rcr.compare_runs(a, same)
    assert c["equal"] and c["metrics_bitwise_equal"] and c["max_abs_metric_diff"] == 0.0 and c["differing_fields"] == {}
    assert c["models_bitwise_equal"] and c["max_abs_model_diff"] == 0.0 and "wall_s" not in c["fields"]
    ulp = _run_dir(tmp_path / "c", [ROWS[0] | {"acc_node_mean": 0.6366666666666667}, ROWS[1]])
    c = rcr.compare_runs(a, ulp)  # one unit in the last place: equal within the tolerance, not bit-for-bit
    assert c["equal"] and not c["metrics_bitwise_equal"] and set(c["differing_fields"]) == {"acc_node_mean"}
    assert 0 < c["max_abs_metric_diff"] < 1e-15
    far = _run_dir(tmp_path / "d", [ROWS[0], ROWS[1] | {"loss": 1.001}], z=0.25)
    c = rcr.compare_runs(a, far)
    assert not c["equal"] and math.isclose(c["max_abs_metric_diff"], 0.001) and c["max_abs_model_diff"] == 0.25
    bits = _run_dir(tmp_path / "e", ROWS, bits=(10, 21))
    assert not rcr.compare_runs(a, bits)["equal"]  # same metrics, other bit counts
    short = _run_dir(tmp_path / "f", ROWS[:1])
    assert not rcr.compare_runs(a, short)["equal"]


def test_recorder_passes_the_message_through_and_records_the_ray_node(tmp_path, monkeypatch):
    import ray

    class Ctx:
        def get_node_id(self):
            return "node-x"

        def get_actor_id(self):
            return "actor-y"

    class Meta:
        message_type = "train"

    class Msg:
        metadata = Meta()

    class Context:
        node_config = {"partition-id": 3}

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Ctx())
    rec = rcr.NodeRecorder(str(tmp_path / "calls.jsonl"))
    msg, ctx, reply = Msg(), Context(), object()
    assert rec(msg, ctx, lambda m, c: reply if (m is msg and c is ctx) else None) is reply
    (line,) = rcr.read_records(tmp_path / "calls.jsonl")
    assert line == {"ray_node_id": "node-x", "actor_id": "actor-y", "pid": os.getpid(), "type": "train", "partition": 3}


def test_cleanup_stops_every_marked_process_and_its_children(tmp_path):
    procs = rcp.Processes()
    env = procs.env()
    assert env[rcp.MARKER] == procs.token and "RAY_ADDRESS" not in procs.env() and procs.env(RAY_ADDRESS="x")
    assert env[rcp.NODE_STORE_ENV].startswith(procs.temp_dir)  # the nodes' state files go with the temp dir
    # a shell with a child, and a process that ignores SIGTERM; both detached from this process like Ray's daemons
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], env=env, start_new_session=True)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
        env=env,
        start_new_session=True,
    )
    other = subprocess.Popen(["sleep", "60"])  # not marked: must survive
    try:
        end = time.time() + 10
        while len(rcp.marked_pids(procs.token)) < 3 and time.time() < end:
            time.sleep(0.1)
        found = rcp.marked_pids(procs.token, procs.temp_dir)
        assert {shell.pid, stubborn.pid} <= set(found) and other.pid not in found and len(found) == 3
        t0 = time.time()
        left = procs.cleanup(grace=1.0)
        assert left == [] and procs.stopped == 3 and time.time() - t0 < 10
        for p in (shell, stubborn):
            p.wait(timeout=5)
        assert other.poll() is None and not os.path.exists(procs.temp_dir)
    finally:
        other.kill()
        other.wait()
        for p in (shell, stubborn):
            if p.poll() is None:
                p.kill()


def test_report_renders_also_after_a_failure():
    rep = {"command": "python -m x", "when": "now", "machine": {"cores": 2}, "error": "RuntimeError: boom"}
    rep |= {"processes_stopped": 4, "leftover_pids": []}
    md = rc.render_md(rep)
    assert "**Failed**: `RuntimeError: boom`" in md and "left running: none" in md


def _ray_start_available() -> bool:
    return Path(sys.executable).with_name("ray").exists()


@pytest.mark.skipif(not _ray_start_available(), reason="the ray CLI is not installed next to this Python")
def test_two_ray_nodes_host_client_apps_and_metrics_equal_one_machine(tmp_path, fresh_ray):
    """The real thing, small: 4 virtual nodes, 2 rounds. Both Ray nodes run ClientApp calls, the metrics equal the
    single-machine run's, and no process of it is left."""
    rep = rc.run(
        tmp_path, overrides={"num-nodes": 4, "num-rounds": 2}, command="pytest", timeout=300, flwr_run_too=False
    )
    assert "error" not in rep, rep.get("error")
    assert rep["nodes_used"] == 2 and {v["role"] for v in rep["cluster_run"]["per_node"].values()} == {
        "head",
        "worker",
    }
    assert rep["cluster_run"]["calls_ran_on_cluster_nodes"] and rep["single_run"]["nodes_used"] == 1
    assert rep["metrics_equal"] and rep["comparison"]["max_abs_metric_diff"] <= rcr.TOLERANCE
    assert rep["comparison"]["models_bitwise_equal"] and rep["comparison"]["bits_equal"]
    assert rep["leftover_pids"] == [] and rep["ok"]
    assert json.loads((tmp_path / "ray_cluster.json").read_text())["nodes_used"] == 2
    assert "Ray nodes that hosted ClientApp actors: **2**" in (tmp_path / "ray_cluster.md").read_text()
