"""Datasets, partitions and per-node tensors for decentralized training.

Everything is read from local files (nothing is downloaded at run time):

* Fashion-MNIST / MNIST from the four IDX files (gzipped or not), e.g. Debian's
  ``dataset-fashion-mnist`` package or a torchvision root ``<root>/FashionMNIST/raw``;
* CIFAR-10 from the official python-pickle folder ``cifar-10-batches-py/``, from an
  ImageFolder tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``) or from a
  ``.tar.gz`` of that tree (decoded once into a uint8 ``.npz`` cache);
* synthetic Gaussian class clusters for fast tests.

Per-node data stays in memory as uint8 tensors; normalization and augmentation are
applied per batch, vectorized over the whole batch (see :class:`NodeData`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_CLASSES",
    "DataNotFoundError",
    "Dataset",
    "NodeData",
    "class_histogram",
    "default_cache_dir",
    "find_data",
    "idx_names",
    "is_hf",
    "load_cifar10",
    "load_dataset",
    "load_hf_dataset",
    "load_idx_dataset",
    "make_node_data",
    "make_synthetic",
    "normalize",
    "partition",
    "random_crop_flip",
    "read_idx",
    "save_partition_report",
    "search_dirs",
]

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
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_REPO_ROOT = Path(__file__).resolve().parent.parent
_CACHE_VERSION = 1

_FIX_COMMANDS: dict[str, str] = {
    "fashion_mnist": "sudo apt-get install -y dataset-fashion-mnist",
    "mnist": (
        "export SPARSEPUSH_DATA=/dir/holding/mnist   # a folder with train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
    ),
    "cifar10": (
        "mkdir -p ~/.cache/flower_sparsepush && curl -L "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz | tar xz -C ~/.cache/flower_sparsepush"
        "   # or: export SPARSEPUSH_DATA=/dir/holding/cifar10-jpg.tar.gz"
    ),
}
_ALIASES: dict[str, str] = {
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "synthetic": "synthetic",
}


class DataNotFoundError(ValueError):
    """A dataset's files were not found in any searched location."""


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


# --------------------------------------------------------------------------- locations


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder: argument, else ``$SPARSEPUSH_CACHE``, else ``~/.cache/flower_sparsepush``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SPARSEPUSH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flower_sparsepush"


def _canonical(name: str) -> str:
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; valid names: fashion_mnist (fmnist), mnist, cifar10, synthetic")
    return _ALIASES[key]


def search_dirs(name: str, path: str | os.PathLike | None = None) -> list[Path]:
    """Base locations searched for dataset ``name``, in order (see :func:`find_data`)."""
    name = _canonical(name)
    out: list[Path] = []
    if path is not None:
        out.append(Path(path).expanduser())
    env = os.environ.get("SPARSEPUSH_DATA")
    if env:
        out.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    out.append((_REPO_ROOT / ".." / "shared" / "data").resolve())
    out.append(Path("/work/shared/data"))
    if name == "fashion_mnist":
        out.append(DEBIAN_FASHION_MNIST)
    out.append(default_cache_dir())
    seen: set[Path] = set()
    uniq = []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_NAMING = "each with a dash or a dot before idx (train-images.idx3-ubyte), gzipped (.gz) or not"


def idx_names(stem: str) -> tuple[str, ...]:
    """The file names accepted for one IDX file, in order of preference: ``train-images-idx3-ubyte``,
    ``train-images-idx3-ubyte.gz``, ``train-images.idx3-ubyte`` and ``train-images.idx3-ubyte.gz``."""
    return tuple(name + gz for name in (stem, stem.replace("-idx", ".idx")) for gz in ("", ".gz"))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in idx_names(stem):
        cand = folder / name
        if cand.is_file():
            return cand
        if (cand / name).is_file():  # some archives hold each file in a folder of the same name
            return cand / name
    return None


def _is_idx_folder(folder: Path) -> bool:
    return folder.is_dir() and all(_idx_file(folder, s) is not None for s in _IDX_STEMS)


def _listing(folder: Path, limit: int = 8) -> str:
    """Up to ``limit`` entries of ``folder`` (folders end in /), for error messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not names:
        return "empty"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "holds " + ", ".join(names[:limit]) + more


def _describe(name: str, base: Path) -> str:
    """What one searched base holds, for the not-found message: its best candidate folder and its entries."""
    if not base.exists():
        return f"{base}: does not exist"
    if not base.is_dir():
        return f"{base}: a file, not a folder"
    if name in ("fashion_mnist", "mnist"):
        best, have = None, 0
        for c in _candidates(name, base):
            n = sum(_idx_file(c, s) is not None for s in _IDX_STEMS) if c.is_dir() else 0
            if n > have:
                best, have = c, n
        if best is not None:
            missing = [s for s in _IDX_STEMS if _idx_file(best, s) is None]
            return f"{best}: {have} of the 4 IDX files, missing {', '.join(missing)}"
    return f"{base}: {_listing(base)}"


def _is_cifar_pickle(folder: Path) -> bool:
    return folder.is_dir() and (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file()


def _is_image_tree(folder: Path) -> bool:
    return folder.is_dir() and (folder / "train").is_dir() and (folder / "test").is_dir()


def _is_tarball_name(name: str) -> bool:
    return name.endswith((".tar.gz", ".tgz", ".tar"))


def _is_tarball(p: Path) -> bool:
    return p.is_file() and _is_tarball_name(p.name)


def _candidates(name: str, base: Path) -> list[Path]:
    """Concrete places under ``base`` where dataset ``name`` may live: the base itself and the folders that common
    distributions create (torchvision ``<root>/FashionMNIST/raw``, the Fashion-MNIST repository's ``data/fashion``,
    Keras' ``fashion-mnist``, ``raw`` when ``base`` is a torchvision dataset folder)."""
    if name == "fashion_mnist":
        subs = [
            "",
            "fashion-mnist",
            "fashion_mnist",
            "FashionMNIST/raw",
            "FashionMNIST",
            "raw",
            "data/fashion",
            "fashion-mnist/data/fashion",
            "fashion",
        ]
    elif name == "mnist":
        subs = ["", "mnist", "MNIST/raw", "MNIST", "raw", "mnist/raw"]
    else:
        subs = [
            "",
            "cifar-10-batches-py",
            "cifar10",
            "cifar10-jpg",
            "cifar10-jpg.tar.gz",
            "cifar-10-jpg.tar.gz",
            "cifar10.tar.gz",
        ]
    return [base / s if s else base for s in subs]


def find_data(name: str, path: str | os.PathLike | None = None) -> Path:
    """Locate the files of dataset ``name`` and return the folder (or tarball) to load.

    Search order: ``path`` argument, ``$SPARSEPUSH_DATA`` (``os.pathsep``-separated),
    ``<repo>/../shared/data``, ``/work/shared/data``, the Debian path (Fashion-MNIST
    only), then the cache folder (``$SPARSEPUSH_CACHE`` or ``~/.cache/flower_sparsepush``).
    Under each base it also tries the usual sub-folders (``fashion-mnist``,
    ``FashionMNIST/raw``, ``raw``, ``data/fashion``, ``cifar-10-batches-py``, ``cifar10-jpg.tar.gz``...).
    IDX files may be named with a dash or a dot before ``idx`` (``train-images-idx3-ubyte``,
    ``train-images.idx3-ubyte``), gzipped or not (:func:`idx_names`).
    For CIFAR-10 the official pickle folder wins over an image tree, which wins over a tarball,
    within the same base. Raises :class:`DataNotFoundError` naming what it looked for, every
    place searched with what it holds (or which IDX files are missing), and the command that fixes it.
    """
    name = _canonical(name)
    if name == "synthetic":
        raise ValueError("synthetic data has no files; use make_synthetic()")
    for base in search_dirs(name, path):
        cands = _candidates(name, base)
        if name in ("fashion_mnist", "mnist"):
            for c in cands:
                if _is_idx_folder(c):
                    return c
        else:
            for check in (_is_cifar_pickle, _is_image_tree, _is_tarball):
                for c in cands:
                    if check(c):
                        return c
    bases = search_dirs(name, path)
    rel = [str(c.relative_to(bases[0])) for c in _candidates(name, bases[0])[1:]]
    subs = ", ".join(r if _is_tarball_name(r) else r + "/" for r in rel)
    wanted = (
        f"the four IDX files {', '.join(_IDX_STEMS)} ({IDX_NAMING})"
        if name in ("fashion_mnist", "mnist")
        else "cifar-10-batches-py/ (data_batch_1..5, test_batch), an image tree train/<class>/, test/<class>/, "
        "or a .tar.gz of that tree"
    )
    where = "\n  ".join(_describe(name, b) for b in bases)
    raise DataNotFoundError(
        f"{name} not found. Looked for {wanted}\n"
        f"in these folders (and under each: {subs}):\n  {where}\n"
        f"Fix: {_FIX_COMMANDS[name]}\n"
        "(or name the folder or tarball: --data-dir DIR, the run-config key data-dir=DIR, path=DIR in Python; "
        "or set SPARSEPUSH_DATA=DIR)"
    )


# --------------------------------------------------------------------------- IDX


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


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std on the [0, 1] scale of uint8 ``[N, C, H, W]`` images."""
    c = x.shape[1]
    means, stds = [], []
    for ch in range(c):
        v = x[:, ch].astype(np.float64) / 255.0
        means.append(round(float(v.mean()), 4))
        stds.append(round(float(v.std()), 4))
    return tuple(means), tuple(stds)


def load_idx_dataset(folder: str | os.PathLike, name: str = "fashion_mnist") -> Dataset:
    """Load MNIST-layout IDX files from ``folder`` into a uint8 :class:`Dataset` ``[N,1,28,28]``."""
    folder = Path(folder)
    files = {}
    for stem in _IDX_STEMS:
        f = _idx_file(folder, stem)
        if f is None:
            raise DataNotFoundError(
                f"{folder}: no {stem} (looked for {', '.join(idx_names(stem))}); the folder {_listing(folder)}"
            )
        files[stem] = f
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
    mean, std = _channel_stats(xtr)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    canon = _ALIASES.get(name, name)
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


# --------------------------------------------------------------------------- CIFAR-10


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


_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")


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


def load_cifar10(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load CIFAR-10 from a pickle folder, an ImageFolder tree or a tarball of that tree.

    Image trees/tarballs are decoded once with PIL into a uint8 ``.npz`` in ``cache_dir``
    (default :func:`default_cache_dir`) keyed by the source's path, size and mtime;
    later calls read the cache. Decoded (JPEG) copies are labelled
    ``"CIFAR-10 (JPEG q75 copy)"``; the lossless pickle release is labelled ``"CIFAR-10"``.
    """
    src = find_data("cifar10", path)
    if _is_cifar_pickle(src):
        xtr, ytr, xte, yte = _load_cifar_pickle(src)
        classes: tuple[str, ...] = CIFAR10_CLASSES
        pretty = "CIFAR-10"
    else:
        cache = _cache_file(src, default_cache_dir(cache_dir))
        if cache.is_file():
            with np.load(cache) as z:
                xtr, ytr, xte, yte, cls, jpeg = (
                    z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes", "jpeg")
                )
        else:
            entries = _tar_entries(src) if src.is_file() else _dir_entries(src)
            xtr, ytr, xte, yte, cls = _decode_image_tree(entries, str(src))
            jpeg = np.array(any(n.lower().endswith((".jpg", ".jpeg")) for n, _ in entries))
            del entries
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
            np.savez(tmp, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=cls, jpeg=jpeg)
            os.replace(tmp, cache)
        classes = tuple(str(c) for c in cls)
        jpeg = bool(jpeg)
        if not jpeg:
            pretty = "CIFAR-10 (image folder)"
        elif "cifar10-jpg" in str(src).lower():
            pretty = "CIFAR-10 (JPEG q75 copy)"
        else:
            pretty = "CIFAR-10 (JPEG copy)"
    mean, std = _channel_stats(xtr)
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


# --------------------------------------------------------------------------- synthetic


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


# --------------------------------------------------------------------------- Hugging Face datasets (dataset=hf:...)

HF_PREFIX = "hf:"
_HF_LABEL_NAMES = ("label", "labels", "fine_label", "target", "targets", "y", "class")
_HF_IMAGE_NAMES = ("image", "img", "image_data", "pixel_values", "pixels", "x", "features")
_HF_TEST_SPLITS = ("test", "validation", "valid", "val")
HF_HELD_OUT = 0.1  # test fraction held out (per class, seed 0) when a dataset has no test split
_HF_CACHE: dict[tuple, Dataset] = {}


def is_hf(name: str) -> bool:
    """True for a ``hf:<hub name or local folder>`` dataset spec."""
    return str(name).startswith(HF_PREFIX)


def _hf_offline_hint(target: str) -> str:
    return (
        f"On a machine with internet: python -c \"import datasets; datasets.load_dataset('{target}')"
        ".save_to_disk('DIR')\", copy DIR here and use dataset=hf:DIR (docs/data.md)"
    )


def _hf_open(spec: str):
    """The ``datasets`` object (a DatasetDict or a Dataset) behind ``hf:<target>`` and a description of its source.

    A target that exists on disk is read with ``datasets.load_from_disk`` when it holds a ``save_to_disk`` folder
    (``dataset_dict.json`` or ``state.json``), else with ``datasets.load_dataset(folder)`` (parquet, csv, json or an
    image folder); a target that starts like a path but does not exist is an error; anything else is a Hub name
    for ``datasets.load_dataset`` (which uses the Hugging Face cache, and the network when it is there).
    """
    import datasets

    target = spec[len(HF_PREFIX) :].strip()
    if not target:
        raise DataNotFoundError(
            "dataset 'hf:' names no dataset; use hf:<Hub name> or hf:<folder saved with save_to_disk>"
        )
    local = Path(target).expanduser()
    if local.exists():
        saved = (local / "dataset_dict.json").is_file() or (local / "state.json").is_file()
        try:
            obj = datasets.load_from_disk(str(local)) if saved else datasets.load_dataset(str(local))
        except Exception as err:  # noqa: BLE001 - datasets raises many types; one message for all
            how = "load_from_disk" if saved else "load_dataset"
            raise DataNotFoundError(
                f"hf:{target}: datasets.{how} could not read this folder ({type(err).__name__}: {err}). "
                "Save a dataset with Dataset.save_to_disk / DatasetDict.save_to_disk, or give a folder of "
                f"parquet/csv/json files or images; the folder {_listing(local)}"
            ) from None
        return obj, str(local)
    if target.startswith(("/", "./", "../", "~")):
        raise DataNotFoundError(f"hf:{target}: no such folder (a path; a Hub name looks like owner/name)")
    try:
        obj = datasets.load_dataset(target)
    except Exception as err:  # noqa: BLE001 - offline: ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError
        raise DataNotFoundError(
            f"hf:{target}: not a local folder, and datasets.load_dataset({target!r}) failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). {_hf_offline_hint(target)}"
        ) from None
    return obj, f"Hugging Face Hub {target}"


def _hf_splits(obj, spec: str, seed: int = 0):
    """(train, test, note): the train split and a test split (``test``, ``validation``...), or 10% of the only
    split held out per class with seed 0 (the same test set for every run seed)."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if "train" not in obj:
            raise DataNotFoundError(f"{spec}: no 'train' split (splits: {', '.join(obj)})")
        test = next((obj[s] for s in _HF_TEST_SPLITS if s in obj), None)
        if test is not None:
            return obj["train"], test, ""
        obj = obj["train"]
    if not isinstance(obj, datasets.Dataset):
        raise DataNotFoundError(f"{spec}: expected a Dataset or DatasetDict, got {type(obj).__name__}")
    return obj, None, f"{HF_HELD_OUT:.0%} of train held out as test"


def _hf_column(features, given: str, kind: str, spec: str) -> str:
    """The image (``kind="image"``) or label column: ``given`` if set, else detected from the features' types and
    the usual names; one error that lists the columns otherwise."""
    import datasets

    cols = list(features)
    key = f"{kind}-column"
    if given:
        if given not in features:
            raise DataNotFoundError(f"{spec}: run-config {key}={given!r} is not a column (columns: {', '.join(cols)})")
        return given
    typed = datasets.ClassLabel if kind == "label" else datasets.Image
    found = [c for c in cols if isinstance(features[c], typed)]
    if not found:
        names = _HF_LABEL_NAMES if kind == "label" else _HF_IMAGE_NAMES
        found = [c for c in names if c in features]
    if not found:
        raise DataNotFoundError(
            f"{spec}: cannot tell which column holds the {kind}s (columns: {', '.join(cols)}); set {key}=NAME"
        )
    return found[0]


def _hf_images(ds, col: str, spec: str) -> np.ndarray:
    """The image column as an array: uint8 ``[N, C, H, W]`` from images (grayscale stays one channel), or the
    numbers of an array column (``[N, H, W]`` gets a channel axis, ``[N, H, W, C]`` with C in 1, 3, 4 becomes CHW,
    flat vectors stay ``[N, D]``)."""
    import datasets

    if isinstance(ds.features[col], datasets.Image):
        mode, out = None, []
        for batch in ds.select_columns([col]).iter(batch_size=1000):
            for im in batch[col]:
                if mode is None:
                    mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
                out.append(arr[None] if mode == "L" else arr.transpose(2, 0, 1))
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            raise ValueError(
                f"{spec}: images of different sizes in column {col!r} ({', '.join(map(str, sorted(shapes)[:3]))}); "
                "resize them to one size first (e.g. with Dataset.map)"
            )
        return np.stack(out) if out else np.zeros((0, 1, 1, 1), np.uint8)
    try:
        x = np.asarray(ds.with_format("numpy")[col])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{spec}: column {col!r} is not an image or an array of numbers ({err})") from None
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{spec}: column {col!r} holds {x.dtype} values, not images or numbers of one shape")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 2 and x.ndim != 4:
        raise ValueError(f"{spec}: column {col!r} has examples of shape {x.shape[1:]}; expected [D], [H, W] or images")
    return np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32))


def _float_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if x.ndim == 4:
        axes = (0, 2, 3)
        m, s = x.mean(axis=axes, dtype=np.float64), x.std(axis=axes, dtype=np.float64)
    else:
        m, s = np.array([x.mean(dtype=np.float64)]), np.array([x.std(dtype=np.float64)])
    return tuple(round(float(v), 4) for v in m), tuple(round(max(float(v), 1e-6), 4) for v in s)


def load_hf_dataset(spec: str, image_column: str = "", label_column: str = "") -> Dataset:
    """A Hugging Face dataset (``hf:<Hub name or local folder>``) as a :class:`Dataset` in memory.

    Splits: ``train`` and the first of ``test``, ``validation``, ``valid``, ``val``; without one, 10% of every class
    of the single split is held out as the test set (seed 0). Columns: ``image_column`` / ``label_column`` or
    detected (a ``datasets.Image`` / ``datasets.ClassLabel`` feature, else the usual names such as ``image``, ``img``,
    ``label``). Labels become 0..K-1 (ClassLabel ids as they are; other values in sorted order, so string labels
    work). Images of one size become uint8 ``[N, C, H, W]`` (normalized per channel like the built-in datasets);
    array columns keep their numbers (float32). No augmentation. One process keeps the last loaded dataset.
    """
    key = (spec, image_column, label_column)
    if key in _HF_CACHE:
        return _HF_CACHE[key]
    obj, source = _hf_open(spec)
    train, test, note = _hf_splits(obj, spec)
    img = _hf_column(train.features, image_column, "image", spec)
    lab = _hf_column(train.features, label_column, "label", spec)
    if img == lab:
        raise DataNotFoundError(f"{spec}: image and label column are both {img!r}; set image-column and label-column")
    import datasets

    feat = train.features[lab]
    y_all = [np.asarray(train[lab])] + ([np.asarray(test[lab])] if test is not None else [])
    if isinstance(feat, datasets.ClassLabel):
        classes = tuple(feat.names)
        ys = [y.astype(np.int64) for y in y_all]
    else:
        values = np.unique(np.concatenate(y_all))
        if values.dtype.kind == "f" and not np.all(values == np.round(values)):
            raise ValueError(f"{spec}: label column {lab!r} holds non-integer numbers; pick a class column")
        classes = tuple(str(v) for v in values)
        ys = [np.searchsorted(values, y).astype(np.int64) for y in y_all]
    if len(classes) < 2:
        raise ValueError(f"{spec}: label column {lab!r} has {len(classes)} class; at least 2 are needed")
    x_train = _hf_images(train, img, spec)
    if test is not None:
        x_test, y_train, y_test = _hf_images(test, img, spec), ys[0], ys[1]
    else:
        rng = np.random.default_rng(0)
        held = np.concatenate(
            [
                rng.permutation(np.flatnonzero(ys[0] == c))[: int(round(HF_HELD_OUT * (ys[0] == c).sum()))]
                for c in np.unique(ys[0])
            ]
        )
        mask = np.zeros(len(ys[0]), dtype=bool)
        mask[held] = True
        x_train, x_test, y_train, y_test = x_train[~mask], x_train[mask], ys[0][~mask], ys[0][mask]
    if len(y_test) == 0 or len(y_train) == 0:
        raise ValueError(f"{spec}: {len(y_train)} training and {len(y_test)} test examples; both must be > 0")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"{spec}: train examples have shape {x_train.shape[1:]}, test examples {x_test.shape[1:]}")
    mean, std = _channel_stats(x_train) if x_train.dtype == np.uint8 and x_train.ndim == 4 else _float_stats(x_train)
    if x_train.dtype == np.uint8 and x_train.ndim != 4:  # flat uint8 features: use them as numbers
        x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
        mean, std = _float_stats(x_train)
    ds = Dataset(
        name=spec,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(y_test),
        num_classes=len(classes),
        mean=mean,
        std=std,
        classes=classes,
        label=f"{spec}" + (f" ({note})" if note else ""),
        augment="none",
        source=f"{source}; image column {img!r}, label column {lab!r}",
    )
    _HF_CACHE.clear()  # one dataset per process (memory)
    _HF_CACHE[key] = ds
    return ds


def load_dataset(
    name: str,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    image_column: str = "",
    label_column: str = "",
    **synthetic_kwargs,
) -> Dataset:
    """Load ``fashion_mnist``/``mnist``/``cifar10`` from local files, a Hugging Face dataset ``hf:<Hub name or
    local folder>`` (:func:`load_hf_dataset`, with its image and label columns), or make ``synthetic`` data."""
    if is_hf(name):
        return load_hf_dataset(name, image_column, label_column)
    canon = _canonical(name)
    if canon == "synthetic":
        return make_synthetic(**synthetic_kwargs)
    if synthetic_kwargs:
        raise TypeError(f"unexpected arguments for {canon}: {sorted(synthetic_kwargs)}")
    if canon == "cifar10":
        return load_cifar10(path, cache_dir)
    return load_idx_dataset(find_data(canon, path), canon)


# --------------------------------------------------------------------------- per-batch ops


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


# --------------------------------------------------------------------------- partitions

_SCHEMES_HELP = (
    "valid forms: 'iid', 'skew:S' with 0 <= S <= 1, 'dirichlet:A' with A > 0, "
    "'classes:K' with K an integer, 1 <= K <= number of classes"
)


def _parse_scheme(scheme: str) -> tuple[str, float | None]:
    s = str(scheme).strip().lower()
    if s == "iid":
        return "iid", None
    m = re.fullmatch(r"(skew|dirichlet|classes)\s*[:=]\s*([0-9.eE+-]+)", s)
    if not m:
        raise ValueError(f"bad partition scheme {scheme!r}; {_SCHEMES_HELP}")
    kind, val = m.group(1), m.group(2)
    try:
        v = float(val)
    except ValueError:
        raise ValueError(f"bad partition scheme {scheme!r}; {_SCHEMES_HELP}") from None
    if kind == "skew" and not (0.0 <= v <= 1.0):
        raise ValueError(f"bad partition scheme {scheme!r}: S out of range; {_SCHEMES_HELP}")
    if kind == "dirichlet" and not (v > 0 and np.isfinite(v)):
        raise ValueError(f"bad partition scheme {scheme!r}: A must be > 0; {_SCHEMES_HELP}")
    if kind == "classes" and (v != int(v) or v < 1):
        raise ValueError(f"bad partition scheme {scheme!r}: K must be a positive integer; {_SCHEMES_HELP}")
    return kind, v


def _skew_partition(labels: np.ndarray, num_nodes: int, s: float, seed: int) -> list[np.ndarray]:
    """Sparse-Push label skew: per class, fraction ``s`` to a label-sorted pool, rest shuffled."""
    rng = np.random.default_rng(seed)
    sorted_pool, mixed_pool = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(s * len(idx)))
        sorted_pool.append(idx[:k])
        mixed_pool.append(idx[k:])
    sp = np.concatenate(sorted_pool)
    mp = np.concatenate(mixed_pool)
    rng.shuffle(mp)
    sp_parts = np.array_split(sp, num_nodes)
    mp_parts = np.array_split(mp, num_nodes)
    out = []
    for i in range(num_nodes):
        part = np.concatenate([sp_parts[i], mp_parts[-1 - i]])  # reversed: balances remainders
        rng.shuffle(part)
        out.append(part.astype(np.int64))
    return out


def partition(
    labels: np.ndarray | torch.Tensor | Sequence[int], num_nodes: int, scheme: str, seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices among ``num_nodes`` nodes; same seed -> same split.

    Schemes: ``iid``; ``skew:S`` (Sparse-Push label skew, see docs/data.md);
    ``dirichlet:A`` (per-class Dirichlet(A) proportions, flwr-datasets
    ``DirichletPartitioner``); ``classes:K`` (K classes per node, flwr-datasets
    ``PathologicalPartitioner``). Returns one int64 index array per node; the arrays
    are disjoint and cover every sample (``classes:K`` may leave classes unused when
    ``num_nodes * K`` is smaller than the number of classes).
    """
    kind, v = _parse_scheme(scheme)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).ravel()
    n = len(y)
    if not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if num_nodes > n:
        raise ValueError(f"num_nodes={num_nodes} exceeds the number of samples {n}")
    if kind == "skew":
        return _skew_partition(y, num_nodes, float(v), seed)
    num_classes = len(np.unique(y))
    if kind == "classes" and int(v) > num_classes:
        raise ValueError(f"bad partition scheme {scheme!r}: K={int(v)} > {num_classes} classes; {_SCHEMES_HELP}")

    cache = _partition_cache_file(y, num_nodes, scheme, seed)
    if cache.is_file():  # same labels, scheme, nodes and seed: the split computed before
        with np.load(cache) as z:
            return [z[f"p{i}"] for i in range(num_nodes)]
    out = _flwr_partition(y, num_nodes, kind, v, seed)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **{f"p{i}": p for i, p in enumerate(out)})
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the recomputation
    return out


def _partition_cache_file(y: np.ndarray, num_nodes: int, scheme: str, seed: int) -> Path:
    """Where :func:`partition` keeps a split made by flwr-datasets (seconds for 50k rows; milliseconds to read)."""
    key = hashlib.sha1(y.tobytes() + f"|{num_nodes}|{scheme}|{seed}".encode()).hexdigest()[:20]
    return default_cache_dir() / "partitions" / f"{key}.npz"


def _flwr_partition(y: np.ndarray, num_nodes: int, kind: str, v: float | None, seed: int) -> list[np.ndarray]:
    """iid, dirichlet:A and classes:K through flwr-datasets' partitioners (see :func:`partition`)."""
    import datasets  # lazy: slow import, only needed here
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = len(y)

    rows = np.arange(n, dtype=np.int64)
    if kind == "iid":
        # IidPartitioner takes contiguous shards, so the rows are shuffled (by seed) first
        rows = np.random.default_rng(seed).permutation(n)
        part = IidPartitioner(num_partitions=num_nodes)
    elif kind == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_nodes,
            partition_by="label",
            alpha=float(v),
            min_partition_size=min(10, n // num_nodes),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        part = PathologicalPartitioner(
            num_partitions=num_nodes,
            partition_by="label",
            num_classes_per_partition=int(v),
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    part.dataset = datasets.Dataset.from_dict({"label": y[rows], "idx": rows})
    first = part.load_partition(0)
    cached = getattr(part, "_partition_id_to_indices", None)
    if kind != "iid" and isinstance(cached, dict) and len(cached) == num_nodes:
        # fast path: row positions == sample indices here; avoids datasets' per-select
        # fingerprint hashing (seconds for 50k rows); same result as load_partition(i)["idx"]
        return [np.asarray(cached[i], dtype=np.int64) for i in range(num_nodes)]
    out = [np.asarray(first.with_format("numpy")[:]["idx"], dtype=np.int64)]
    for i in range(1, num_nodes):
        out.append(np.asarray(part.load_partition(i).with_format("numpy")[:]["idx"], dtype=np.int64))
    return out


def class_histogram(labels: np.ndarray | torch.Tensor, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Sample count per (node, class): int64 array ``[nodes, classes]``."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    return np.stack(
        [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes)[:num_classes] for p in parts]
    ).astype(np.int64)


def save_partition_report(
    out_dir: str | os.PathLike, hist: np.ndarray, title: str, class_names: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Write ``partition.json`` (histogram + summary) and ``partition.png`` (stacked bars per node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hist = np.asarray(hist, dtype=np.int64)
    nodes, k = hist.shape
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    frac = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    # effective number of classes per node: exp(entropy of its label distribution)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(frac > 0, frac * np.log(frac), 0.0), axis=1)
    info = {
        "title": title,
        "num_nodes": nodes,
        "num_classes": k,
        "class_names": names,
        "histogram": hist.tolist(),
        "node_sizes": hist.sum(1).tolist(),
        "classes_present": (hist > 0).sum(1).tolist(),
        "effective_classes": [round(float(e), 3) for e in np.exp(ent)],
    }
    jpath = out / "partition.json"
    jpath.write_text(json.dumps(info, indent=1))

    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * nodes + 2), 3.5))
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    bottom = np.zeros(nodes)
    for c in range(k):
        ax.bar(np.arange(nodes), hist[:, c], bottom=bottom, color=cmap(c % cmap.N), label=names[c])
        bottom += hist[:, c]
    ax.set_xlabel("node")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(np.arange(nodes))
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    ppath = out / "partition.png"
    fig.savefig(ppath, dpi=100)
    plt.close(fig)
    return jpath, ppath
