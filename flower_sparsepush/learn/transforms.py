"""Per-batch transforms, vectorized over the whole batch: normalization and the crop-and-flip augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (scaled to [0, 1]) or float batch -> float32 ``(x - mean) / std`` per channel."""
    xf = x.float()
    if x.dtype == torch.uint8:
        xf = xf.mul_(1.0 / 255.0)
    if x.dim() == 4:
        m = torch.tensor(mean, dtype=xf.dtype, device=xf.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=xf.dtype, device=xf.device).view(1, -1, 1, 1)
    else:
        m = torch.tensor(mean[0], dtype=xf.dtype, device=xf.device)
        s = torch.tensor(std[0], dtype=xf.dtype, device=xf.device)
    return (xf - m) / s


def random_crop_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding ``pad`` plus random horizontal flip, whole batch at once.

    ``x`` is ``[B, C, H, W]`` of any dtype; returns the same shape and dtype. Each
    image gets its own offsets in ``[0, 2*pad]`` and a flip with probability 1/2, drawn
    from ``generator`` (CPU), then one gather builds the batch (no per-image loop).
    """
    if x.dim() != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if b == 0:
        return x.clone()
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    fl = (torch.rand(b, generator=generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    rows = oy[:, None] + ar_h[None, :]  # [B, H]
    cols = ox[:, None] + torch.where(fl[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])  # [B, W]
    dev = x.device
    rows, cols = rows.to(dev), cols.to(dev)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
