"""Hugging Face datasets (``dataset=hf:<Hub name or local folder>``) read with the ``datasets`` library into an
in-memory :class:`Dataset`: the source, its splits, its image and label columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flower_sparsepush.learn.dataset import Dataset, channel_stats
from flower_sparsepush.learn.locate import DataNotFoundError, folder_listing

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
                f"parquet/csv/json files or images; the folder {folder_listing(local)}"
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
        return _decoded_images(ds, col, spec)
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


def _decoded_images(ds, col: str, spec: str) -> np.ndarray:
    """An image column decoded to uint8 ``[N, C, H, W]``: grayscale when its first image is, else RGB."""
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


def _hf_labels(train, test, lab: str, spec: str) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """The class names and the labels as 0..K-1 of the train split (and of the test split when there is one):
    ClassLabel ids as they are, other values in sorted order."""
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
    return classes, ys


def _held_out(y: np.ndarray) -> np.ndarray:
    """The test rows of a dataset with one split, as a mask: ``HF_HELD_OUT`` of every class, drawn with seed 0."""
    rng = np.random.default_rng(0)
    held = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: int(round(HF_HELD_OUT * (y == c).sum()))] for c in np.unique(y)]
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    return mask


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
    classes, ys = _hf_labels(train, test, lab, spec)
    x_train = _hf_images(train, img, spec)
    if test is not None:
        x_test, y_train, y_test = _hf_images(test, img, spec), ys[0], ys[1]
    else:
        mask = _held_out(ys[0])
        x_train, x_test, y_train, y_test = x_train[~mask], x_train[mask], ys[0][~mask], ys[0][mask]
    if len(y_test) == 0 or len(y_train) == 0:
        raise ValueError(f"{spec}: {len(y_train)} training and {len(y_test)} test examples; both must be > 0")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"{spec}: train examples have shape {x_train.shape[1:]}, test examples {x_test.shape[1:]}")
    if x_train.dtype == np.uint8 and x_train.ndim == 4:
        mean, std = channel_stats(x_train)
    else:
        if x_train.dtype == np.uint8:  # flat uint8 features: use them as numbers
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
