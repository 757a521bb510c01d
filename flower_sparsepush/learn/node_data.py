"""Per-node training shards in memory, each with a seeded, epoch-cycling batch sampler."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flower_sparsepush.learn.dataset import Dataset
from flower_sparsepush.learn.transforms import normalize, random_crop_flip


class NodeData:
    """One node's training shard in memory, with a seeded epoch-cycling batch sampler.

    ``next_batch`` draws batches from a random permutation of the shard; when the
    permutation is used up it draws a fresh one (a new epoch) from the same generator,
    so a run is reproducible from the generator's seed. Batches are augmented
    (``augment="crop_flip"``: pad-4 random crop + horizontal flip) and normalized.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: str = "none",
        device: torch.device | str | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if augment not in ("none", "crop_flip"):
            raise ValueError(f"augment must be 'none' or 'crop_flip', got {augment!r}")
        self.device = torch.device(device) if device is not None else x.device
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.augment = augment
        self._perm: torch.Tensor | None = None
        self._pos = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.y)

    def _next_indices(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        n = len(self.y)
        if n == 0:
            raise ValueError("this node has no training data")
        chunks = []
        need = batch_size
        while need > 0:
            if self._perm is None or self._pos >= n:
                if self._perm is not None:
                    self.epoch += 1
                self._perm = torch.randperm(n, generator=generator)
                self._pos = 0
            take = min(need, n - self._pos)
            chunks.append(self._perm[self._pos : self._pos + take])
            self._pos += take
            need -= take
        idx = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return idx.to(self.device)

    def next_batch(
        self, batch_size: int, generator: torch.Generator | None = None, train: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next ``(x float32 normalized, y int64)`` batch; augments when ``train``."""
        idx = self._next_indices(batch_size, generator)
        xb = self.x[idx]
        if train and self.augment == "crop_flip":
            xb = random_crop_flip(xb, generator)
        return normalize(xb, self.mean, self.std), self.y[idx]

    def reset(self) -> None:
        """Forget the current epoch position (the next batch starts a new permutation)."""
        self._perm, self._pos, self.epoch = None, 0, 0


def make_node_data(
    ds: Dataset,
    parts: Sequence[np.ndarray],
    device: torch.device | str | None = None,
    augment: str | None = None,
) -> list[NodeData]:
    """One :class:`NodeData` per index array in ``parts`` (uses ``ds.augment`` by default)."""
    aug = ds.augment if augment is None else augment
    out = []
    for idx in parts:
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        out.append(NodeData(ds.x_train[t], ds.y_train[t], ds.mean, ds.std, aug, device))
    return out
