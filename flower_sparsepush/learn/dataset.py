"""The in-memory :class:`Dataset` every loader returns, and the per-channel statistics they compute."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flower_sparsepush.learn.transforms import normalize


@dataclass
class Dataset:
    """A whole dataset in memory.

    ``x_*`` are uint8 ``[N, C, H, W]`` (synthetic data: float32, any shape ``[N, ...]``),
    ``y_*`` are int64 ``[N]``. ``mean``/``std`` are per-channel statistics in the units
    used by :func:`normalize` (``[0, 1]`` pixel scale for uint8 data).
    ``label`` is the human-readable name to print next to results.
    ``augment`` names the per-batch training augmentation (``"crop_flip"`` or ``"none"``).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    label: str = ""
    augment: str = "none"
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(3, 32, 32)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def in_channels(self) -> int:
        """Number of input channels (1 for flat synthetic features)."""
        return int(self.x_train.shape[1]) if self.x_train.dim() == 4 else 1

    def test_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized, un-augmented test batches in order, for evaluation."""
        for i in range(0, len(self.y_test), batch_size):
            yield (
                normalize(self.x_test[i : i + batch_size], self.mean, self.std),
                self.y_test[i : i + batch_size],
            )


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std on the [0, 1] scale of uint8 ``[N, C, H, W]`` images."""
    c = x.shape[1]
    means, stds = [], []
    for ch in range(c):
        v = x[:, ch].astype(np.float64) / 255.0
        means.append(round(float(v.mean()), 4))
        stds.append(round(float(v.std()), 4))
    return tuple(means), tuple(stds)
