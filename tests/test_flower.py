"""Flower path (run_simulation, Ray) against the in-process reference loop, and end-to-end on Fashion-MNIST."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from flower_sparsepush.flower.launch import simulate
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import node_threads, torch_threads
from flower_sparsepush.run.results import METRIC_FIELDS, read_metrics
from flower_sparsepush.run.setup import get_setup

TINY = {
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 4,
    "graph": "exponential",
    "num-rounds": 3,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight-decay": 1e-4,
    "eval-every": 1,
    "save-nodes": True,
    "seed": 3,
}
CASES = {
    "sgp": {"strategy": "sgp"},
    "sparse-push": {"strategy": "sparse-push", "compressor": "topk:0.1+q:4", "gamma": 0.3, "form": "ref"},
    # the gradients read at the node's copies of its in-neighbours (kept in the node state the ClientApp restores)
    "lookahead": {"strategy": "sparse-push", "compressor": "topk:0.1+q:4", "gamma": 0.3, "gradient-lookahead": 0.8},
    # a validation split held out: the nodes train on the rest and report val_* as the in-process loop does
    "validation": {"strategy": "sparse-push", "compressor": "topk:0.1+q:4", "gamma": 0.3, "val-split": 0.2},
}
VAL_KEYS = ("val_acc_consensus", "val_loss", "val_acc_node_mean", "val_acc_node_min")


@pytest.fixture(scope="module", params=list(CASES))
def tiny_run(request, tmp_path_factory):
    cfg = validate(
        TINY | CASES[request.param] | {"out-dir": str(tmp_path_factory.mktemp("runs")), "run-name": request.param}
    )
    out = simulate(cfg)
    return cfg, out


def test_flower_equals_inprocess(tiny_run):
    cfg, out = tiny_run
    with torch_threads(node_threads()):  # the nodes' thread count: the same float order, bit for bit
        ref = run_inprocess(cfg)
    nodes = np.load(out / "nodes.npz")
    assert sorted(nodes.files) == [f"z{i}" for i in range(cfg.num_nodes)]
    for i, state in enumerate(ref.states):
        np.testing.assert_array_equal(nodes[f"z{i}"], state.z.to(torch.float32).numpy())
    # the models trained and differ between nodes (equal untrained models would prove nothing)
    x0 = get_setup(cfg).x0.numpy()
    assert all(np.abs(nodes[f"z{i}"] - x0).max() > 1e-3 for i in range(cfg.num_nodes))
    assert np.abs(nodes["z0"] - nodes["z1"]).max() > 1e-4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bits_sent_by_node"] == ref.bits_sent
    assert summary["bits_received_by_node"] == ref.bits_received


def test_validation_metrics_through_flower(tiny_run):
    """With val-split the Flower rows carry the in-process loop's val_* (the claims choose settings by them); without
    it they carry none."""
    cfg, out = tiny_run
    rows = read_metrics(out / "metrics.jsonl")
    if not cfg.val_split:
        assert not any(k in row for row in rows for k in VAL_KEYS)
        return
    ref = run_inprocess(cfg, eval_every=1).history
    assert [r["round"] for r in rows] == [r["round"] for r in ref]
    for a, b in zip(rows, ref):
        for key in VAL_KEYS:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert 0 < rows[-1]["val_acc_node_min"] <= rows[-1]["val_acc_node_mean"] <= 1


def test_mass_conserved_through_flower(tiny_run):
    cfg, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    mass = summary["mass"]
    assert mass["y_mailboxes"] > 0  # the last round's messages are still in the mailboxes
    assert mass["y_nodes"] + mass["y_mailboxes"] == pytest.approx(cfg.num_nodes, abs=1e-9)
    for row in read_metrics(out / "metrics.jsonl"):
        assert row["y_nodes"] + row["y_mailboxes"] == pytest.approx(cfg.num_nodes, abs=1e-9)


def test_fedavg_through_flower_equals_inprocess(tmp_path):
    """FedAvg on the Flower path (CountingFedAvg, the ServerApp's rows and summary) gives the in-process FedAvg's
    accuracy, loss and dense bits every round: the comparison rows of the claims stand on the same code."""
    cfg = validate(TINY | {"strategy": "fedavg", "out-dir": str(tmp_path), "run-name": "fedavg", "val-split": 0.2})
    out = simulate(cfg)
    fl = read_metrics(out / "metrics.jsonl")
    ref = run_inprocess(cfg.replace(run_name="fedavg-in"), eval_every=1).history
    assert [r["round"] for r in fl] == [r["round"] for r in ref] == [1, 2, 3]
    dense = 32 * get_setup(cfg).x0.numel()
    for a, b in zip(fl, ref):
        assert a["acc_consensus"] == pytest.approx(b["acc_consensus"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["bits_sent_per_node"] == b["bits_sent_per_node"] == a["bits_received_per_node"] == dense * a["round"]
        assert a["val_acc_consensus"] == a["val_acc_node_mean"] == pytest.approx(b["val_acc_consensus"], abs=1e-9)
        assert a["epoch"] == b["epoch"] and a["bits_received_per_node"] == b["bits_received_per_node"]
    assert json.loads((out / "summary.json").read_text())["final"]["acc_consensus"] == fl[-1]["acc_consensus"]


def test_status_file_follows_every_round(tmp_path, monkeypatch):
    """The ServerApp updates <run>/status.json after every round (Flower's evaluate_fn hook), not only on the
    evaluation rounds, and closes it at the end."""
    from flower_sparsepush.run.progress import Progress, read_status

    seen = []
    orig = Progress.update
    monkeypatch.setattr(Progress, "update", lambda self, done, note="": seen.append(done) or orig(self, done, note))
    cfg = validate(TINY | {"num-rounds": 4, "eval-every": 4, "out-dir": str(tmp_path), "run-name": "st"})
    out = simulate(cfg)
    assert seen == [1, 2, 3, 4]  # rounds 1-3 have no evaluation
    st = read_status(out / "status.json")
    assert (st["done"], st["total"], st["unit"], st["finished"]) == (4, 4, "rounds", True)


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(
    not os.path.isdir(FMNIST),
    reason=f"Fashion-MNIST not installed at {FMNIST} (sudo apt-get install dataset-fashion-mnist)",
)
def test_end_to_end_fashion_mnist(tmp_path):
    cfg = validate(
        {
            "dataset": "fashion_mnist",
            "model": "cnn",
            "num-nodes": 8,
            "graph": "exponential",
            "strategy": "sparse-push",
            "compressor": "topk:0.1",
            "gamma": 0.5,
            "num-rounds": 4,
            "local-steps": 5,
            "batch-size": 32,
            "lr": 0.05,
            "eval-every": 2,
            "eval-node-samples": 500,
            "out-dir": str(tmp_path),
            "run-name": "e2e",
        }
    )
    out = simulate(cfg)
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [2, 4]
    for r in rows:
        assert set(METRIC_FIELDS) <= set(r)
    last = rows[-1]
    assert last["acc_consensus"] > 0.3 and last["acc_node_mean"] > 0.3  # chance is 0.1
    summary = json.loads((out / "summary.json").read_text())
    sent, recv = summary["bits_sent_by_node"], summary["bits_received_by_node"]
    assert min(sent) > 0 and min(recv) > 0
    # every routed bit was either delivered or is still in a mailbox; all are whole bytes of encoded messages
    assert sum(sent) == sum(recv) + summary["mailbox_bits"]
    assert all(b % 8 == 0 for b in sent)
    assert last["bits_sent_per_node"] == pytest.approx(np.mean(sent))
    assert json.loads((out / "config.json").read_text())["strategy"] == "sparse-push"
