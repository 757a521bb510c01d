"""CIFAR-10 readers: the official pickle batches, an ImageFolder tree, or a tarball of that tree (decoded once
into a uint8 ``.npz`` cache)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from flower_sparsepush.learn.dataset import Dataset, channel_stats
from flower_sparsepush.learn.locate import DataNotFoundError, default_cache_dir, is_cifar_pickle

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CACHE_VERSION = 1
_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")


def _load_cifar_pickle(folder: Path) -> tuple[np.ndarray, ...]:
    """Read the official ``cifar-10-batches-py`` batches (keys ``b"data"``, ``b"labels"``)."""

    def one(p: Path) -> tuple[np.ndarray, np.ndarray]:
        with open(p, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        if b"data" not in d or b"labels" not in d:
            raise ValueError(f"{p}: not a CIFAR-10 batch (keys {sorted(d)[:5]})")
        x = np.asarray(d[b"data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072:
            raise ValueError(f"{p}: data has shape {x.shape}, expected [N, 3072]")
        y = np.asarray(d[b"labels"], dtype=np.int64)
        if len(y) != len(x):
            raise ValueError(f"{p}: {len(x)} images but {len(y)} labels")
        return x.reshape(-1, 3, 32, 32), y

    train_files = sorted(folder.glob("data_batch_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    if not train_files:
        raise DataNotFoundError(f"{folder}: no data_batch_* files")
    parts = [one(p) for p in train_files]
    xte, yte = one(folder / "test_batch")
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    return xtr, ytr, xte, yte


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return arr.transpose(2, 0, 1)


def _collect_images(entries: list[tuple[str, bytes]], split: str) -> tuple[list[str], list[tuple[str, str, bytes]]]:
    """Pick ``<split>/<class>/<file>`` entries (any leading folder allowed)."""
    out = []
    for name, data in entries:
        parts = Path(name).parts
        if len(parts) >= 3 and parts[-3] == split and name.lower().endswith(_IMG_EXT):
            out.append((parts[-2], name, data))
    classes = sorted({c for c, _, _ in out})
    return classes, sorted(out, key=lambda t: (t[0], t[1]))


def _decode_image_tree(entries: list[tuple[str, bytes]], src: str) -> tuple[np.ndarray, ...]:
    """Decode ImageFolder-style entries (name, bytes) into uint8 arrays."""
    cls_tr, tr = _collect_images(entries, "train")
    cls_te, te = _collect_images(entries, "test")
    if not tr or not te:
        raise DataNotFoundError(f"{src}: no images under train/<class>/ and test/<class>/")
    if cls_tr != cls_te:
        raise ValueError(f"{src}: train classes {cls_tr} differ from test classes {cls_te}")
    index = {c: i for i, c in enumerate(cls_tr)}
    arrays = []
    for items in (tr, te):
        imgs = [_decode(d) for _, _, d in items]
        shapes = {im.shape for im in imgs}
        if len(shapes) != 1:
            raise ValueError(f"{src}: images have different sizes {sorted(shapes)[:3]}")
        arrays.append(np.stack(imgs))
        arrays.append(np.array([index[c] for c, _, _ in items], dtype=np.int64))
    arrays.append(np.array(cls_tr))
    return tuple(arrays)


def _tar_entries(path: Path) -> list[tuple[str, bytes]]:
    """Read every regular file of a tarball into memory (no extraction to disk)."""
    out = []
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if m.isfile() and m.name.lower().endswith(_IMG_EXT):
                fh = tf.extractfile(m)
                if fh is not None:
                    out.append((m.name, fh.read()))
    return out


def _dir_entries(root: Path) -> list[tuple[str, bytes]]:
    return [
        (str(p.relative_to(root)), p.read_bytes())
        for p in root.rglob("*")
        if p.is_file() and p.name.lower().endswith(_IMG_EXT)
    ]


def _cache_file(src: Path, cache_dir: Path) -> Path:
    st = src.stat()
    key = f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}|v{_CACHE_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9]+", "-", src.name).strip("-")
    return cache_dir / f"cifar10-{stem}-{digest}.npz"


def _image_arrays(src: Path, cache: Path) -> tuple[np.ndarray, ...]:
    """``x_train, y_train, x_test, y_test, classes, jpeg`` of an image tree or tarball: read from ``cache``, or
    decoded with PIL and written there."""
    if cache.is_file():
        with np.load(cache) as z:
            return tuple(z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes", "jpeg"))
    entries = _tar_entries(src) if src.is_file() else _dir_entries(src)
    xtr, ytr, xte, yte, cls = _decode_image_tree(entries, str(src))
    jpeg = np.array(any(n.lower().endswith((".jpg", ".jpeg")) for n, _ in entries))
    del entries
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=cls, jpeg=jpeg)
    os.replace(tmp, cache)
    return xtr, ytr, xte, yte, cls, jpeg


def _image_copy_label(src: Path, jpeg: bool) -> str:
    if not jpeg:
        return "CIFAR-10 (image folder)"
    if "cifar10-jpg" in str(src).lower():
        return "CIFAR-10 (JPEG q75 copy)"
    return "CIFAR-10 (JPEG copy)"


def read_cifar10(src: Path, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 from ``src``, a pickle folder, an image tree or a tarball of that tree (see ``data.load_cifar10``)."""
    if is_cifar_pickle(src):
        xtr, ytr, xte, yte = _load_cifar_pickle(src)
        classes: tuple[str, ...] = CIFAR10_CLASSES
        pretty = "CIFAR-10"
    else:
        xtr, ytr, xte, yte, cls, jpeg = _image_arrays(src, _cache_file(src, default_cache_dir(cache_dir)))
        classes = tuple(str(c) for c in cls)
        pretty = _image_copy_label(src, bool(jpeg))
    mean, std = channel_stats(xtr)
    return Dataset(
        name="cifar10",
        x_train=torch.from_numpy(np.ascontiguousarray(xtr)),
        y_train=torch.from_numpy(np.asarray(ytr, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(xte)),
        y_test=torch.from_numpy(np.asarray(yte, dtype=np.int64)),
        num_classes=len(classes),
        mean=mean,
        std=std,
        classes=classes,
        label=pretty,
        augment="crop_flip",
        source=str(src),
    )
