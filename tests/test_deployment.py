"""Deployment Engine end to end: a SuperLink and 4 SuperNodes on loopback, `flwr run`, then every process gone.

Every SuperNode runs with its node worker (`sparsepush node`, executor mode: the worker runs the SuperNode's tasks,
no process per message); tests/test_node_worker.py covers link mode and a killed worker. Slow (Flower start-up and
polling: a few minutes on 2 shared cores); loopback only, ports from the OS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flower_sparsepush.cli import build_parser
from flower_sparsepush.deploy.local import DeploymentError, LocalDeployment, cmd_deploy_local, deploy_run
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import node_threads, torch_threads
from flower_sparsepush.run.processes import pid_alive
from flower_sparsepush.run.results import METRIC_FIELDS, read_metrics
from flower_sparsepush.run.setup import get_setup

pytestmark = pytest.mark.skipif(
    not Path(sys.executable).with_name("flower-superlink").exists() and not shutil.which("flower-superlink"),
    reason="flower-superlink is not installed",
)

NODES = 4
TINY = {
    "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4",
    "gamma": 0.3,
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": NODES,
    "graph": "exponential",
    "num-rounds": 3,
    "merge-every": 2,  # an 8-bit global merge after round 2, computed by the deployed nodes
    "merge-bits": 8,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "eval-every": 1,
    "save-nodes": True,
    "seed": 3,
    "run-name": "deploy",
}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    cfg = validate(TINY | {"out-dir": str(tmp_path_factory.mktemp("runs"))})
    out, dep = deploy_run(cfg, log_dir=tmp_path_factory.mktemp("logs"), timeout=600)
    return cfg, out, dep


def test_results_files_as_in_simulation(deployed):
    cfg, out, _ = deployed
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png", "nodes.npz"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(cfg.as_dict()))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(METRIC_FIELDS) | {"y_nodes", "y_mailboxes"} <= set(r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["round"] == 3 and summary["bits_sent_per_node"] > 0
    status = json.loads((out / "status.json").read_text())  # written by the ServerApp's process
    assert (status["done"], status["total"], status["finished"]) == (3, 3, True)


def test_mass_conserved(deployed):
    _, out, _ = deployed
    for r in read_metrics(out / "metrics.jsonl"):
        # the merge after round 2 absorbed what was in flight; the other rounds' messages wait in the mailboxes
        assert (r["y_mailboxes"] == 0) if r["round"] == 2 else (r["y_mailboxes"] > 0)
        assert r["y_nodes"] + r["y_mailboxes"] == pytest.approx(NODES, abs=1e-9)
    mass = json.loads((out / "summary.json").read_text())["mass"]
    assert mass["y_nodes"] + mass["y_mailboxes"] == pytest.approx(NODES, abs=1e-9)


def test_node_state_persists_across_rounds(deployed):
    """Each message runs in a fresh ClientApp process; the SuperNode keeps context.state between them, so the
    deployed nodes end exactly where the in-process reference loop does (a lost state would restart from x0), the
    8-bit merge after round 2 included."""
    cfg, out, _ = deployed
    with torch_threads(node_threads()):  # the nodes' thread count: the same float order, bit for bit
        ref = run_inprocess(cfg)
    nodes = np.load(out / "nodes.npz")
    x0 = get_setup(cfg).x0.numpy()
    for i, state in enumerate(ref.states):
        np.testing.assert_array_equal(nodes[f"z{i}"], state.z.to(torch.float32).numpy())
        assert np.abs(nodes[f"z{i}"] - x0).max() > 1e-3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bits_sent_by_node"] == ref.bits_sent


def test_every_message_ran_in_the_node_workers(deployed):
    _, _, dep = deployed
    for i in range(NODES):
        log = (dep.log_dir / f"supernode-{i}.log").read_text()
        # 3 rounds, plus the merge's give, reduce and take (4 tensors, one owned by each of the 4 nodes)
        assert log.count("task train:") == 3 + 3 and log.count("task evaluate:") == 3, log[-2000:]


def test_every_process_stopped(deployed):
    _, _, dep = deployed
    assert len(dep.seen_pids) >= NODES + 2  # SuperLink, SuperNodes, flwr run (+ SuperExecs, ServerApp, ClientApps)
    assert [p for p in dep.seen_pids if pid_alive(p)] == []


def test_cleanup_when_a_supernode_dies(tmp_path):
    cfg = validate(TINY | {"num-nodes": 2, "out-dir": str(tmp_path)})
    dep = LocalDeployment(2, log_dir=tmp_path / "logs")
    with pytest.raises(DeploymentError, match="supernode-1 exited"):
        with dep:
            os.kill(dep.procs["supernode-1"].pid, signal.SIGKILL)
            dep.run(cfg.as_dict(), timeout=120)
    assert dep.seen_pids and [p for p in dep.seen_pids if pid_alive(p)] == []


def test_cleanup_when_flwr_run_fails(tmp_path):
    with LocalDeployment(2, log_dir=tmp_path / "logs") as dep:
        rc = dep.run({"no-such-key": 1}, timeout=120)  # refused by flwr run: exits non-zero
    assert rc != 0
    assert [p for p in dep.seen_pids if pid_alive(p)] == []


def test_cli_registered_and_bad_config_starts_nothing(capsys, monkeypatch):
    started = []
    monkeypatch.setattr(LocalDeployment, "__enter__", lambda self: started.append(self) or self)
    args = build_parser().parse_args(["deploy-local", "--nodes", "4", "--rounds", "2", "--gamma", "5"])
    assert args.func is cmd_deploy_local
    assert args.func(args) == 2
    assert "gamma" in capsys.readouterr().err
    # what only the pre-start checks see (here: a key the Flower path refuses) also stops it before any process
    args = build_parser().parse_args(["deploy-local", "--nodes", "4", "--rounds", "2", "--device", "cuda"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "device" in err and err.count("\n") == 1, err
    assert started == []


def test_a_supernode_killed_and_restarted_mid_run_continues_with_its_state(tmp_path):
    """SuperNode 1 is killed (SIGKILL, as a crash) after round 1 and started again: it reconnects with a new node
    id, the ServerApp gives it its partition back, its node continues from its stored state, and push-sum mass is
    exact in every row (a node that started again from x0 and y = 1 would change the total weight: after round 1
    it holds 1 - a, its fresh self 1)."""
    cfg = validate(
        TINY | {"num-nodes": 2, "num-rounds": 4, "round-timeout": 15.0, "out-dir": str(tmp_path), "run-name": "re"}
    )
    restarted = []

    def restart_after_round_1(dep, done):
        if done >= 1 and not restarted:
            dep.restart_supernode(1)
            restarted.append(done)

    dep = LocalDeployment(2, log_dir=tmp_path / "logs")
    with dep:
        assert dep.run(cfg.as_dict(), timeout=600, on_poll=restart_after_round_1) == 0
    assert restarted and [p for p in dep.seen_pids if pid_alive(p)] == []
    summary = json.loads((tmp_path / "re" / "summary.json").read_text())
    assert [e["partition"] for e in summary["reconnected_nodes"]] == [1]
    assert summary["final"]["round"] == 4 and summary["nodes_not_returned"] == []
    rows = read_metrics(tmp_path / "re" / "metrics.jsonl")
    assert rows[-1]["num_evaluated"] == 2
    for r in rows:  # a row where the dead node could not report covers the other node only
        if r["num_evaluated"] == 2:
            assert r["y_nodes"] + r["y_pending"] + r["y_mailboxes"] == pytest.approx(2, abs=1e-9)
