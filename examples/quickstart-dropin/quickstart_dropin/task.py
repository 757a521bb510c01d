"""Model, data and the local train/test loops (plain PyTorch, as in Flower's quickstart-pytorch), plus the ServerApp
body that both server files share (they differ in the strategy line only).

Data: CIFAR-10 (JPEG q75 copy) from local files (``flower_sparsepush.learn.data.load_cifar10``, nothing is
downloaded). A fixed subset (seed 0): ``train-size`` training images (split IID over the nodes), ``val-size`` further
training images held out for validation, and ``test-size`` images of the test set (a seed-0 sample: the files
are sorted by class). ``eval-split`` says
which of val/test the nodes and the ServerApp evaluate on.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid
from torch import nn

# Defaults of the run config (pyproject.toml [tool.flwr.app.config]); a run's own values override them.
DEFAULTS = {
    "num-server-rounds": 20,
    "num-nodes": 8,
    "local-epochs": 2,
    "lr": 0.05,
    "momentum": 0.9,
    "batch-size": 32,
    "train-size": 5000,
    "val-size": 1000,
    "test-size": 2000,
    "eval-split": "test",
    "seed": 0,  # the model's initialisation and the batch order (the data subset is always seed 0's)
    "results-file": "",
}


ENV_CONFIG = "QUICKSTART_DROPIN_CONFIG"


def run_config(context_config) -> dict:
    """DEFAULTS, then the run's config, then ``$QUICKSTART_DROPIN_CONFIG`` (a JSON object: ``run_simulation`` takes
    no run config, so ``compare.py`` passes its keys this way; the Ray workers inherit the environment)."""
    return {**DEFAULTS, **dict(context_config), **json.loads(os.environ.get(ENV_CONFIG) or "{}")}


class Net(nn.Module):
    """quickstart-pytorch's CNN (LeNet-5 style): conv 6, pool, conv 16, pool, 120, 84, 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@lru_cache(maxsize=2)
def load_subset(train_size: int, val_size: int, test_size: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val, x_test, y_test): normalized float32 images, int64 labels; seed-0 subset."""
    from flower_sparsepush.learn.data import load_cifar10, normalize  # local files only, no download

    ds = load_cifar10()
    perm = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:train_size], perm[train_size : train_size + val_size]
    te = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(0))[:test_size]  # files are by class

    def norm(x: torch.Tensor) -> torch.Tensor:
        return normalize(x, ds.mean, ds.std)

    return (
        norm(ds.x_train[tr]),
        ds.y_train[tr].long(),
        norm(ds.x_train[va]),
        ds.y_train[va].long(),
        norm(ds.x_test[te]),
        ds.y_test[te].long(),
    )


def load_partition(cfg: dict, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, ...]:
    """This node's IID slice of the training subset and the whole evaluation split (val or test)."""
    x, y, xv, yv, xt, yt = load_subset(int(cfg["train-size"]), int(cfg["val-size"]), int(cfg["test-size"]))
    idx = torch.arange(partition_id, len(y), num_partitions)
    xe, ye = (xv, yv) if cfg["eval-split"] == "val" else (xt, yt)
    return x[idx], y[idx], xe, ye


def train(net: Net, x, y, epochs: int, lr: float, momentum: float, batch_size: int, seed: int) -> float:
    """SGD (a fresh optimizer per call, as in quickstart-pytorch) for ``epochs`` passes; returns the mean loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    losses = []
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def test(net: Net, x, y) -> tuple[float, float]:
    """(loss, accuracy) on (x, y)."""
    net.eval()
    out = torch.cat([net(xb) for xb in x.split(1000)])
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def serve(grid: Grid, context: Context, strategy) -> None:
    """The ServerApp's body: start ``strategy`` from a model initialised with ``seed``, evaluate what it returns
    each round on the evaluation split, and write the per-round metrics to ``results-file`` (when set) and the model
    to final_model.pt."""
    cfg = run_config(context.run_config)
    torch.manual_seed(int(cfg["seed"]))
    net = Net()
    initial = ArrayRecord(net.state_dict())
    _, _, xe, ye = load_partition(cfg, 0, 1)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = test(net, xe, ye)
        return MetricRecord({"central_loss": loss, "central_acc": acc})

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
    if cfg["results-file"]:
        params = sum(a.numpy().size for a in initial.values())
        rounds = {
            "central": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
            "nodes": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
            "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        }
        out = {"strategy": type(strategy).__name__, "params": int(params), "config": cfg, "rounds": rounds}
        Path(cfg["results-file"]).write_text(json.dumps(out, default=float))
