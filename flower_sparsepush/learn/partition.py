"""Partitions: sample indices split among nodes by a scheme (``iid``, ``skew:S``, ``dirichlet:A``,
``classes:K``), and the per-node class histogram and its report."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flower_sparsepush.learn.locate import default_cache_dir

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
    if cache.is_file():  # same labels, scheme, nodes and seed: the split is stored
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


def _flwr_partitioner(n: int, num_nodes: int, kind: str, v: float | None, seed: int):
    """The flwr-datasets partitioner for ``kind`` (``iid``, ``dirichlet`` or ``classes``) over ``n`` rows."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if kind == "iid":
        return IidPartitioner(num_partitions=num_nodes)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_nodes,
            partition_by="label",
            alpha=float(v),
            min_partition_size=min(10, n // num_nodes),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_nodes,
        partition_by="label",
        num_classes_per_partition=int(v),
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )


def _flwr_partition(y: np.ndarray, num_nodes: int, kind: str, v: float | None, seed: int) -> list[np.ndarray]:
    """iid, dirichlet:A and classes:K through flwr-datasets' partitioners (see :func:`partition`)."""
    import datasets  # lazy: slow import, only needed here

    n = len(y)
    # IidPartitioner takes contiguous shards, so for iid the rows are shuffled (by seed) first
    rows = np.random.default_rng(seed).permutation(n) if kind == "iid" else np.arange(n, dtype=np.int64)
    part = _flwr_partitioner(n, num_nodes, kind, v, seed)
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


def _partition_summary(hist: np.ndarray, title: str, names: list[str]) -> dict:
    """The histogram with per-node sizes, classes present and effective number of classes, for partition.json."""
    nodes, k = hist.shape
    frac = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    # effective number of classes per node: exp(entropy of its label distribution)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(frac > 0, frac * np.log(frac), 0.0), axis=1)
    return {
        "title": title,
        "num_nodes": nodes,
        "num_classes": k,
        "class_names": names,
        "histogram": hist.tolist(),
        "node_sizes": hist.sum(1).tolist(),
        "classes_present": (hist > 0).sum(1).tolist(),
        "effective_classes": [round(float(e), 3) for e in np.exp(ent)],
    }


def _plot_partition(path: Path, hist: np.ndarray, title: str, names: list[str]) -> None:
    """Stacked bars of the class counts per node, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes, k = hist.shape
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_partition_report(
    out_dir: str | os.PathLike, hist: np.ndarray, title: str, class_names: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Write ``partition.json`` (histogram + summary) and ``partition.png`` (stacked bars per node)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hist = np.asarray(hist, dtype=np.int64)
    _, k = hist.shape
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    jpath = out / "partition.json"
    jpath.write_text(json.dumps(_partition_summary(hist, title, names), indent=1))
    ppath = out / "partition.png"
    _plot_partition(ppath, hist, title, names)
    return jpath, ppath
