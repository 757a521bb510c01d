"""Synthetic Gaussian class clusters, deterministic by seed, for fast tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flower_sparsepush.learn.dataset import Dataset


def make_synthetic(
    num_train: int = 2000,
    num_test: int = 500,
    num_classes: int = 10,
    shape: Sequence[int] = (32,),
    separation: float = 3.0,
    class_probs: Sequence[float] | None = None,
    seed: int = 0,
) -> Dataset:
    """Gaussian class clusters (float32, deterministic by ``seed``) for fast tests.

    Class ``c`` has a random mean of norm ``separation`` and unit isotropic noise, so
    a linear model separates it well when ``separation`` is large. ``class_probs``
    sets global label frequencies (default uniform); per-node label skew comes from
    :func:`partition` (e.g. ``"skew:0.8"``).
    """
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2")
    gen = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    dim = int(np.prod(shape))
    centers = gen.standard_normal((num_classes, dim))
    centers *= separation / np.linalg.norm(centers, axis=1, keepdims=True)
    p = None if class_probs is None else np.asarray(class_probs, float) / np.sum(class_probs)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if p is None:
            y = np.arange(n) % num_classes
            gen.shuffle(y)
        else:
            y = gen.choice(num_classes, size=n, p=p)
        x = centers[y] + gen.standard_normal((n, dim))
        return (torch.from_numpy(x.reshape((n,) + shape).astype(np.float32)), torch.from_numpy(y.astype(np.int64)))

    xtr, ytr = draw(num_train)
    xte, yte = draw(num_test)
    c = shape[0] if len(shape) == 3 else 1
    return Dataset(
        name="synthetic",
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        num_classes=num_classes,
        mean=(0.0,) * c,
        std=(1.0,) * c,
        classes=tuple(str(i) for i in range(num_classes)),
        label=f"synthetic (Gaussian clusters, sep={separation}, seed={seed})",
        augment="none",
        source="synthetic",
    )
