"""Model, data and the local train/test loops of the example (plain PyTorch, nothing Flower-specific)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

# Defaults of the run config (pyproject.toml [tool.flwr.app.config]); a run's own values override them.
DEFAULTS = {
    "num-server-rounds": 5,
    "num-nodes": 4,
    "local-epochs": 1,
    "lr": 0.05,
    "batch-size": 32,
    "dataset": "synthetic",
}


def run_config(context_config) -> dict:
    return {**DEFAULTS, **dict(context_config)}


class Net(nn.Module):
    """A tiny MLP: flattened input -> 32 hidden units -> 10 classes."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@lru_cache(maxsize=2)
def load_all(dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), float32 inputs, int64 labels."""
    if dataset == "fashion_mnist":
        from flower_sparsepush.learn.data import load_dataset, normalize  # local IDX files only, no download

        ds = load_dataset("fashion_mnist")
        xt, xs = normalize(ds.x_train, ds.mean, ds.std), normalize(ds.x_test, ds.mean, ds.std)
        return xt, ds.y_train.long(), xs, ds.y_test.long()
    if dataset != "synthetic":
        raise ValueError(f"dataset must be 'synthetic' or 'fashion_mnist', got {dataset!r}")
    rng = np.random.default_rng(0)  # 10 Gaussian clusters in 20 dimensions
    centers = rng.normal(size=(10, 20)) * 1.5
    y = rng.integers(0, 10, size=3000)
    x = (centers[y] + rng.normal(size=(3000, 20))).astype(np.float32)
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    return x[:2400], y[:2400], x[2400:], y[2400:]


def in_features(dataset: str) -> int:
    return int(np.prod(load_all(dataset)[0].shape[1:]))


def load_partition(dataset: str, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, ...]:
    """This node's slice of the training set (an IID split) and the whole test set."""
    x, y, xt, yt = load_all(dataset)
    idx = torch.arange(partition_id, len(y), num_partitions)
    return x[idx], y[idx], xt, yt


def train(net: Net, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    """Plain SGD for ``epochs`` passes over (x, y); returns the mean training loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    losses = []
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def test(net: Net, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on (x, y)."""
    net.eval()
    out = net(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
