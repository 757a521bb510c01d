"""IDX files (MNIST, Fashion-MNIST): parse one file, load a folder's four files as a :class:`Dataset`."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from flower_sparsepush.learn.dataset import Dataset, channel_stats
from flower_sparsepush.learn.locate import (
    DATASET_ALIASES,
    IDX_STEMS,
    DataNotFoundError,
    folder_listing,
    idx_file,
    idx_names,
)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzipped if its name ends in ``.gz`` or it starts with the gzip magic).

    Validates the magic number (two zero bytes, a type code, the number of dims),
    the expected number of dims and that the payload size matches the header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
            "(expected 0x0000 + type code + ndim, e.g. 0x00000803 images, 0x00000801 labels)"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dims, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX payload is {len(raw) - header} bytes but header dims {dims} need {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_files(folder: Path) -> dict[str, Path]:
    """The four IDX files of ``folder`` by stem; DataNotFoundError naming the first one missing."""
    files = {}
    for stem in IDX_STEMS:
        f = idx_file(folder, stem)
        if f is None:
            raise DataNotFoundError(
                f"{folder}: no {stem} (looked for {', '.join(idx_names(stem))}); the folder {folder_listing(folder)}"
            )
        files[stem] = f
    return files


def load_idx_dataset(folder: str | os.PathLike, name: str = "fashion_mnist") -> Dataset:
    """Load MNIST-layout IDX files from ``folder`` into a uint8 :class:`Dataset` ``[N,1,28,28]``."""
    folder = Path(folder)
    files = _idx_files(folder)
    xtr = read_idx(files["train-images-idx3-ubyte"], 3)
    ytr = read_idx(files["train-labels-idx1-ubyte"], 1)
    xte = read_idx(files["t10k-images-idx3-ubyte"], 3)
    yte = read_idx(files["t10k-labels-idx1-ubyte"], 1)
    for xs, ys, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if xs.dtype != np.uint8 or ys.dtype != np.uint8:
            raise ValueError(f"{folder}: {split} IDX files must hold unsigned bytes")
        if len(xs) != len(ys):
            raise ValueError(f"{folder}: {split} has {len(xs)} images but {len(ys)} labels")
    xtr, xte = xtr[:, None], xte[:, None]
    mean, std = channel_stats(xtr)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    canon = DATASET_ALIASES.get(name, name)
    pretty = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}.get(canon, canon)
    classes = FASHION_MNIST_CLASSES if canon == "fashion_mnist" else tuple(str(i) for i in range(10))
    return Dataset(
        name=canon,
        x_train=torch.from_numpy(np.ascontiguousarray(xtr)),
        y_train=torch.from_numpy(ytr.astype(np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(xte)),
        y_test=torch.from_numpy(yte.astype(np.int64)),
        num_classes=num_classes,
        mean=mean,
        std=std,
        classes=classes[:num_classes],
        label=pretty,
        augment="none",
        source=str(folder),
    )
