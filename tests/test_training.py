"""Local training step and the in-process loop: optimizer math, determinism, sampler, mass conservation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flower_sparsepush.learn.models import flat_params
from flower_sparsepush.learn.seeds import generator
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import batch_indices, local_sgd, node_batch
from flower_sparsepush.run.schedule import lr_at
from flower_sparsepush.run.setup import get_setup

BASE = {
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 4,
    "graph": "exponential",
    "num-rounds": 6,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "seed": 1,
}


def test_local_sgd_matches_torch_sgd():
    cfg = validate(BASE | {"momentum": 0.9, "nesterov": True, "weight-decay": 1e-3, "local-steps": 3})
    setup = get_setup(cfg)
    ref = copy.deepcopy(setup.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    aug = generator(cfg.seed, 2, "aug", 5)
    for step in range(3):
        xb, yb = node_batch(setup, 2, 5, step, aug)
        opt.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        opt.step()
    z, buf, loss = local_sgd(setup, setup.x0, None, node=2, rnd=5)
    np.testing.assert_allclose(z.numpy(), flat_params(ref).numpy(), atol=1e-6)
    assert buf is not None and loss > 0


def test_sampler_is_stateless_and_covers_each_epoch():
    n_i, b = 37, 8
    stream = torch.cat([batch_indices(n_i, 0, 3, s * b, b) for s in range(10)])
    for e in range(2):
        assert sorted(stream[e * n_i : (e + 1) * n_i].tolist()) == list(range(n_i))
    assert torch.equal(batch_indices(n_i, 0, 3, 40, 8), stream[40:48])
    assert not torch.equal(batch_indices(n_i, 0, 4, 0, 8), batch_indices(n_i, 0, 3, 0, 8))


def test_lr_schedules():
    cfg = validate(BASE | {"num-rounds": 10, "lr-schedule": "step:0.5,0.8"})
    assert [lr_at(cfg, r) for r in (0, 5, 8)] == pytest.approx([0.1, 0.01, 0.001])
    cfg = validate(BASE | {"num-rounds": 10, "lr-schedule": "cosine"})
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 5) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "extra",
    [
        {"strategy": "sgp"},
        {"compressor": "topk:0.1+q:4", "gamma": 0.3, "form": "ref"},
        {"compressor": "randk:0.2", "gamma": 0.3, "form": "ef"},
    ],
)
def test_inprocess_deterministic_and_conserves_mass(extra):
    cfg = validate(BASE | extra)
    a, b = run_inprocess(cfg), run_inprocess(cfg)
    for sa, sb in zip(a.states, b.states):
        assert torch.equal(sa.x, sb.x) and sa.y == sb.y
    from flower_sparsepush.core.codec import decode

    y_mail = sum(decode(d).y for box in a.mailboxes for d in box)
    assert sum(s.y for s in a.states) + y_mail == pytest.approx(cfg.num_nodes, abs=1e-12)
    assert sum(a.bits_sent) == sum(a.bits_received) + sum(8 * len(d) for box in a.mailboxes for d in box)
    c = run_inprocess(validate(BASE | extra | {"seed": 2}))
    assert not torch.equal(a.states[0].x, c.states[0].x)


def test_inprocess_learns_and_reaches_consensus():
    cfg = validate(BASE | {"strategy": "sgp", "num-rounds": 30, "model": "logreg"})
    res = run_inprocess(cfg, eval_every=30)
    m = res.history[-1]
    assert m["acc_consensus"] > 0.6  # 10 classes, chance 0.1
    assert m["consensus_distance"] < 1.0


def test_node_evaluation_subset_covers_every_class_of_a_class_sorted_test_set():
    """Test sets read from image folders come sorted by class; a node's subset must not be the first N samples."""
    from flower_sparsepush.learn.evaluate import eval_subset

    labels = torch.arange(10).repeat_interleave(1000)  # 10,000 samples sorted by class
    idx = eval_subset(len(labels), 1000)
    counts = torch.bincount(labels[idx], minlength=10)
    assert len(idx) == 1000 and len(torch.unique(idx)) == 1000
    assert counts.min() >= 60  # about 100 per class
    assert torch.equal(idx, eval_subset(len(labels), 1000))  # the same subset in every process
    assert torch.equal(eval_subset(50, 0), torch.arange(50))


def test_save_nodes_in_process_writes_every_node_model(tmp_path):
    """save-nodes works in-process as on Flower: nodes.npz holds z_i of every node, the models the loop ended with."""
    from flower_sparsepush.run.inprocess import train_inprocess

    cfg = validate(BASE | {"out-dir": str(tmp_path), "run-name": "s", "save-nodes": True, "eval-every": 6})
    summary = train_inprocess(cfg, echo=None)
    nodes = np.load(tmp_path / "s" / "nodes.npz")
    ref = run_inprocess(cfg).states
    assert sorted(nodes.files) == [f"z{i}" for i in range(cfg.num_nodes)]
    for i, state in enumerate(ref):
        np.testing.assert_array_equal(nodes[f"z{i}"], state.z.numpy())
    assert np.abs(nodes["z0"] - nodes["z1"]).max() > 1e-6  # the nodes' own models, not one average
    assert summary["final"]["acc_node_mean"] > 0
    assert not (tmp_path / "s2").exists()
    train_inprocess(cfg.replace(run_name="s2", save_nodes=False), echo=None)
    assert not (tmp_path / "s2" / "nodes.npz").exists()


def test_fedavg_entry_point_writes_its_rows(tmp_path):
    """``python -m flower_sparsepush.run.inprocess strategy=fedavg`` runs and writes every metrics field."""
    import subprocess
    import sys

    from flower_sparsepush.run.results import METRIC_FIELDS, read_metrics

    args = [f"{k}={v}" for k, v in (BASE | {"strategy": "fedavg", "out-dir": tmp_path, "run-name": "f"}).items()]
    proc = subprocess.run(
        [sys.executable, "-m", "flower_sparsepush.run.inprocess", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(tmp_path / "f" / "metrics.jsonl")
    assert rows and all(k in row for row in rows for k in METRIC_FIELDS)
    assert rows[-1]["epoch"] > 0 and rows[-1]["bits_received_per_node"] == rows[-1]["bits_sent_per_node"] > 0
