"""Datasets by name: find their local files, load them, partition them among nodes and batch them.

The public entry points of the data modules beside this one (``locate``, ``idx``, ``cifar``, ``synthetic``, ``hf``,
``partition``, ``node_data``, ``transforms``), importable from here. Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from flower_sparsepush.learn.cifar import CIFAR10_CLASSES, read_cifar10
from flower_sparsepush.learn.dataset import Dataset
from flower_sparsepush.learn.hf import is_hf, load_hf_dataset
from flower_sparsepush.learn.idx import load_idx_dataset, read_idx
from flower_sparsepush.learn.locate import (
    DataNotFoundError,
    canonical_name,
    default_cache_dir,
    first_match,
    idx_names,
    not_found_error,
    search_dirs,
)
from flower_sparsepush.learn.node_data import NodeData, make_node_data
from flower_sparsepush.learn.partition import class_histogram, partition, save_partition_report
from flower_sparsepush.learn.synthetic import make_synthetic
from flower_sparsepush.learn.transforms import normalize, random_crop_flip

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

# find_data looks search_dirs up in this module, and the loaders look find_data up here, so that replacing either
# on this module (as tests do) changes where every loader searches.


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
    name = canonical_name(name)
    if name == "synthetic":
        raise ValueError("synthetic data has no files; use make_synthetic()")
    bases = search_dirs(name, path)
    for base in bases:
        found = first_match(name, base)
        if found is not None:
            return found
    raise not_found_error(name, bases)


def load_cifar10(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load CIFAR-10 from a pickle folder, an ImageFolder tree or a tarball of that tree.

    Image trees/tarballs are decoded once with PIL into a uint8 ``.npz`` in ``cache_dir``
    (default :func:`default_cache_dir`) keyed by the source's path, size and mtime;
    later calls read the cache. Decoded (JPEG) copies are labelled
    ``"CIFAR-10 (JPEG q75 copy)"``; the lossless pickle release is labelled ``"CIFAR-10"``.
    """
    return read_cifar10(find_data("cifar10", path), cache_dir)


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
    canon = canonical_name(name)
    if canon == "synthetic":
        return make_synthetic(**synthetic_kwargs)
    if synthetic_kwargs:
        raise TypeError(f"unexpected arguments for {canon}: {sorted(synthetic_kwargs)}")
    if canon == "cifar10":
        return load_cifar10(path, cache_dir)
    return load_idx_dataset(find_data(canon, path), canon)
