"""Every training switch acts on the Flower path exactly as in-process: one Flower run with many switches on equals
the in-process run with the same switches (models bit for bit under the nodes' thread count, bits exactly), and
turning any one switch back to its default changes the in-process result. Together: no switch is silently ignored
on Flower (had Flower ignored switch K, it would equal the in-process run without K, which differs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flower_sparsepush.flower.launch import simulate
from flower_sparsepush.run.config import KEYS, validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import node_threads, torch_threads

BASE = {
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 4,
    "graph": "exponential",
    "num-rounds": 4,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "eval-every": 2,
    "save-nodes": True,
    "seed": 5,
    "strategy": "sparse-push",
    "gamma": 0.3,
}
# two sets of switches that can be on together; each key's partners are reset with it (they need it)
SETS = {
    "schedules-and-losses": {
        "compressor": "topk:0.2+q:4",
        "qgm": True,
        "final-gossip-rounds": 2,
        "sparsity-schedule": "lr",
        "gamma-warmup": 2,
        "gamma-schedule": "kept",
        "lr-schedule": "cosine",
        "partition": "skew:0.5",
        "link-down": 0.3,
        "down-span": 2,
        "drop": 0.2,
        "bounce": False,
        "eval-node-samples": 100,
    },
    "warmup-and-churn": {
        "compressor": "topk:0.1+q:4",
        "sparsity-warmup": 3,
        "sparsity-warmup-start": 0.5,
        "lr-schedule": "step:0.5",
        "partition": "dirichlet:0.5",
        "churn": 0.25,
        "update-tracking": 0.5,
        "logit-adjust": 1.0,
        "weight-decay": 0.01,
        "nesterov": False,
        "momentum": 0.5,
    },
}
PARTNERS = {
    "sparsity-schedule": ("gamma-schedule",),
    "link-down": ("down-span", "bounce"),
    "drop": ("bounce",),
    "sparsity-warmup": ("sparsity-warmup-start",),
}
# keys whose default would be refused beside their partners: changed to another value instead
OTHER_VALUE = {"sparsity-warmup-start": 0.3, "down-span": 4}
MEASURED_ONLY = {"eval-node-samples"}  # changes what is measured, not what is trained (tested below)


@pytest.fixture(scope="module", params=list(SETS))
def flower_run(request, tmp_path_factory):
    switches = SETS[request.param]
    tmp = tmp_path_factory.mktemp("sw")
    # the nodes keep their state files (and, with checkpoints, their copies) in this run's own node store
    store = {"node-store": str(tmp / "store"), "checkpoint-every": 2}
    cfg = validate(BASE | switches | store | {"out-dir": str(tmp), "run-name": request.param})
    return switches, cfg, simulate(cfg)


def _models(res) -> np.ndarray:
    return np.stack([s.z.to(torch.float32).numpy() for s in res.states])


def test_flower_equals_inprocess_with_the_switches_on(flower_run):
    switches, cfg, out = flower_run
    with torch_threads(node_threads()):  # the nodes' thread count: the same float order, bit for bit
        ref = run_inprocess(cfg)
    nodes = np.load(out / "nodes.npz")
    np.testing.assert_array_equal(np.stack([nodes[f"z{i}"] for i in range(cfg.num_nodes)]), _models(ref))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bits_sent_by_node"] == ref.bits_sent


def test_each_switch_changes_the_run(flower_run):
    switches, cfg, _ = flower_run
    on = run_inprocess(cfg)
    for key in switches:
        if key in MEASURED_ONLY or key == "compressor":
            continue
        off = {k: KEYS[k].default for k in (key, *PARTNERS.get(key, ())) if k in switches}
        off |= {key: OTHER_VALUE[key]} if key in OTHER_VALUE else {}
        res = run_inprocess(validate(cfg.as_dict() | off))
        changed = np.abs(_models(res) - _models(on)).max() > 1e-6 or res.bits_sent != on.bits_sent
        assert changed, f"{key}={switches[key]!r} did not change the run"


def test_node_store_holds_the_nodes_files(flower_run):
    _, cfg, _ = flower_run
    files = sorted(p.name for p in Path(cfg.node_store).rglob("*.safetensors"))
    assert len({f.split(".")[0] for f in files}) == cfg.num_nodes, files  # one state file (and copies) per node


def test_eval_node_samples_changes_what_is_reported():
    cfg = validate(BASE | SETS["schedules-and-losses"])
    full = run_inprocess(cfg.replace(eval_node_samples=0), eval_every=2).history
    part = run_inprocess(cfg, eval_every=2).history
    assert [r["acc_node_mean"] for r in full] != [r["acc_node_mean"] for r in part]
