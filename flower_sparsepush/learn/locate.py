"""Where a dataset's files are: its names, the folders searched, the file layouts that count as the dataset, and
the error that says what was searched when nothing was found."""

from __future__ import annotations

import os
from pathlib import Path

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_REPO_ROOT = Path(__file__).resolve().parents[2]

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
DATASET_ALIASES: dict[str, str] = {
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


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder: argument, else ``$SPARSEPUSH_CACHE``, else ``~/.cache/flower_sparsepush``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SPARSEPUSH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flower_sparsepush"


def canonical_name(name: str) -> str:
    """The dataset's canonical name (``fmnist`` -> ``fashion_mnist``); ValueError for an unknown one."""
    key = name.strip().lower()
    if key not in DATASET_ALIASES:
        raise ValueError(f"unknown dataset {name!r}; valid names: fashion_mnist (fmnist), mnist, cifar10, synthetic")
    return DATASET_ALIASES[key]


def search_dirs(name: str, path: str | os.PathLike | None = None) -> list[Path]:
    """Base locations searched for dataset ``name``, in order (see :func:`find_data`)."""
    name = canonical_name(name)
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


# --------------------------------------------------------------------------- file layouts

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_NAMING = "each with a dash or a dot before idx (train-images.idx3-ubyte), gzipped (.gz) or not"


def idx_names(stem: str) -> tuple[str, ...]:
    """The file names accepted for one IDX file, in order of preference: ``train-images-idx3-ubyte``,
    ``train-images-idx3-ubyte.gz``, ``train-images.idx3-ubyte`` and ``train-images.idx3-ubyte.gz``."""
    return tuple(name + gz for name in (stem, stem.replace("-idx", ".idx")) for gz in ("", ".gz"))


def idx_file(folder: Path, stem: str) -> Path | None:
    """The file of ``folder`` that holds IDX file ``stem`` under one of its :func:`idx_names`, or None."""
    for name in idx_names(stem):
        cand = folder / name
        if cand.is_file():
            return cand
        if (cand / name).is_file():  # some archives hold each file in a folder of the same name
            return cand / name
    return None


def is_idx_folder(folder: Path) -> bool:
    return folder.is_dir() and all(idx_file(folder, s) is not None for s in IDX_STEMS)


def is_cifar_pickle(folder: Path) -> bool:
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


def first_match(name: str, base: Path) -> Path | None:
    """The folder (or tarball) of dataset ``name`` (canonical) under ``base``, or None. For CIFAR-10 the official
    pickle folder wins over an image tree, which wins over a tarball."""
    cands = _candidates(name, base)
    if name in ("fashion_mnist", "mnist"):
        checks = (is_idx_folder,)
    else:
        checks = (is_cifar_pickle, _is_image_tree, _is_tarball)
    for check in checks:
        for c in cands:
            if check(c):
                return c
    return None


# --------------------------------------------------------------------------- the not-found message


def folder_listing(folder: Path, limit: int = 8) -> str:
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
            n = sum(idx_file(c, s) is not None for s in IDX_STEMS) if c.is_dir() else 0
            if n > have:
                best, have = c, n
        if best is not None:
            missing = [s for s in IDX_STEMS if idx_file(best, s) is None]
            return f"{best}: {have} of the 4 IDX files, missing {', '.join(missing)}"
    return f"{base}: {folder_listing(base)}"


def not_found_error(name: str, bases: list[Path]) -> DataNotFoundError:
    """The error for dataset ``name`` (canonical) found under none of ``bases``: what was looked for, every base
    with what it holds (or which IDX files are missing), and the command that fixes it."""
    rel = [str(c.relative_to(bases[0])) for c in _candidates(name, bases[0])[1:]]
    subs = ", ".join(r if _is_tarball_name(r) else r + "/" for r in rel)
    wanted = (
        f"the four IDX files {', '.join(IDX_STEMS)} ({IDX_NAMING})"
        if name in ("fashion_mnist", "mnist")
        else "cifar-10-batches-py/ (data_batch_1..5, test_batch), an image tree train/<class>/, test/<class>/, "
        "or a .tar.gz of that tree"
    )
    where = "\n  ".join(_describe(name, b) for b in bases)
    return DataNotFoundError(
        f"{name} not found. Looked for {wanted}\n"
        f"in these folders (and under each: {subs}):\n  {where}\n"
        f"Fix: {_FIX_COMMANDS[name]}\n"
        "(or name the folder or tarball: --data-dir DIR, the run-config key data-dir=DIR, path=DIR in Python; "
        "or set SPARSEPUSH_DATA=DIR)"
    )
