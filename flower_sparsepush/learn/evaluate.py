"""Evaluation of flat model vectors: accuracy and loss on the test set or the validation split, one model or many
at once, and the consensus metrics of a set of nodes (the nodes' average model and each node's own).

``setup`` is the run's setup (``run.setup.Setup``): anything with ``ds`` (the dataset), ``val`` (the validation
split or None), ``model`` (a scratch module of the architecture) and ``eval_cache`` (a dict).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flower_sparsepush.learn.models import load_flat_params_
from flower_sparsepush.learn.transforms import normalize

Setup = Any  # run.setup.Setup, read by duck typing: learn/ does not import run/


def load_flat(model: torch.nn.Module, vec: torch.Tensor) -> None:
    load_flat_params_(model, vec.to(torch.float32))


def eval_subset(n: int, limit: int) -> torch.Tensor:
    """Indices of the test samples a node evaluates on: all of them, or ``limit`` drawn without replacement by a
    fixed seed (the same subset in every process), in increasing order."""
    if limit <= 0 or limit >= n:
        return torch.arange(n)
    return torch.from_numpy(np.sort(np.random.default_rng(0).permutation(n)[:limit]))


def eval_data(setup: Setup, limit: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized inputs and labels of the ``test`` set or the ``val`` split (``limit`` > 0: a fixed subset)."""
    ds = setup.ds
    key = (split, limit)
    if key not in setup.eval_cache:
        x, y = (ds.x_test, ds.y_test) if split == "test" else setup.val
        idx = eval_subset(len(y), limit)
        setup.eval_cache[key] = (normalize(x[idx], ds.mean, ds.std), y[idx])
    return setup.eval_cache[key]


@torch.no_grad()
def evaluate(setup: Setup, z: torch.Tensor, limit: int = 0, split: str = "test") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of model ``z`` on the test set (or the ``val`` split), or on ``limit`` of its
    samples when > 0 (a fixed random subset, :func:`eval_subset`: test sets read from image folders are sorted by
    class)."""
    xt, yt = eval_data(setup, limit, split)
    model = setup.model
    load_flat(model, z)
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(yt), 1000):
        out = model(xt[i : i + 1000])
        loss += float(F.cross_entropy(out, yt[i : i + 1000], reduction="sum"))
        correct += int((out.argmax(1) == yt[i : i + 1000]).sum())
    return correct / len(yt), loss / len(yt)


@torch.no_grad()
def evaluate_many(setup: Setup, engine, zs: torch.Tensor, limit: int, split: str = "test") -> list[tuple[float, float]]:
    """:func:`evaluate` of every row of ``zs`` at once on ``engine`` (batched.BatchedSGD)."""
    xt, yt = eval_data(setup, limit, split)
    zs = zs.to(engine.device, torch.float32)
    correct = torch.zeros(len(zs), device=engine.device)
    loss = torch.zeros(len(zs), device=engine.device, dtype=torch.float64)
    for i in range(0, len(yt), 500):
        xb, yb = xt[i : i + 500].to(engine.device), yt[i : i + 500].to(engine.device)
        out = engine.logits(zs, xb)
        correct += (out.argmax(2) == yb).sum(1)
        per_sample = F.cross_entropy(out.flatten(0, 1), yb.repeat(len(zs)), reduction="none")  # one call, no syncs
        loss += per_sample.view(len(zs), -1).sum(1).double()
    return [(float(c) / len(yt), float(lo) / len(yt)) for c, lo in zip(correct.cpu(), loss.cpu())]


def consensus_metrics(setup: Setup, zs: list[torch.Tensor], node_limit: int, engine=None) -> dict[str, float]:
    """Consensus-model accuracy/loss (whole test set), per-node accuracy mean/min, and mean_i ||z_i - z_bar||^2.

    With a validation split the same numbers on it are added as ``val_acc_consensus``, ``val_acc_node_mean`` and
    ``val_acc_node_min`` (the nodes on ``node_limit`` samples of it). With ``engine`` every model is evaluated in one batch."""
    zbar = torch.stack([z.to(torch.float64) for z in zs]).mean(0)
    dist = float(np.mean([float(((z.to(torch.float64) - zbar) ** 2).sum()) for z in zs]))
    splits = [("", "test", node_limit)] + ([("val_", "val", node_limit)] if setup.val is not None else [])
    out = {"consensus_distance": dist}
    for prefix, split, limit in splits:
        if engine is not None:
            acc_c, loss_c = evaluate_many(setup, engine, zbar[None], 0, split)[0]
            node_acc = [a for a, _ in evaluate_many(setup, engine, torch.stack(zs), limit, split)]
        else:
            acc_c, loss_c = evaluate(setup, zbar, 0, split)
            node_acc = [evaluate(setup, z, limit, split)[0] for z in zs]
        out |= {
            f"{prefix}acc_consensus": acc_c,
            f"{prefix}loss": loss_c,
            f"{prefix}acc_node_mean": float(np.mean(node_acc)),
            f"{prefix}acc_node_min": float(np.min(node_acc)),
        }
    return out
