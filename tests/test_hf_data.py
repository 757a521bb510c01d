"""Bring your own data the Flower way: dataset=hf:<folder saved with the `datasets` library> (offline), loaded with
`datasets`, partitioned by the same flwr-datasets partitioners, trained through the native Flower mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from flower_sparsepush.learn import data, hf  # noqa: E402
from flower_sparsepush.learn.data import DataNotFoundError  # noqa: E402
from flower_sparsepush.learn.models import SmallCNN  # noqa: E402
from flower_sparsepush.run.config import ConfigError, validate  # noqa: E402
from flower_sparsepush.run.preflight import model_size, preflight  # noqa: E402

CLASSES = ["circle", "square", "cross", "line"]


def _images(n: int, side: int, seed: int, rgb: bool = False):
    """Class c is bright in quadrant c: learnable in a few steps. Returns (PIL images, labels, uint8 arrays)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    x = rng.integers(0, 60, (n, side, side), dtype=np.uint8)
    h = side // 2
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, r * h : (r + 1) * h, col * h : (col + 1) * h] += 150
    if rgb:
        x = np.stack([x, x // 2, 255 - x], axis=-1)
    return [Image.fromarray(a) for a in x], y.tolist(), x


def _save_image_dict(folder, n_train=160, n_test=40, side=16, rgb=False, column="image", label="label"):
    feats = datasets.Features({column: datasets.Image(), label: datasets.ClassLabel(names=CLASSES)})
    tr_img, tr_y, tr_x = _images(n_train, side, 0, rgb)
    te_img, te_y, _ = _images(n_test, side, 1, rgb)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({column: tr_img, label: tr_y}, features=feats),
            "test": datasets.Dataset.from_dict({column: te_img, label: te_y}, features=feats),
        }
    )
    dd.save_to_disk(str(folder))
    return tr_x, np.array(tr_y)


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "shapes"
    x, y = _save_image_dict(folder)
    return folder, x, y


def test_saved_dataset_dict_loads_with_detected_columns(saved):
    folder, x, y = saved
    ds = data.load_dataset(f"hf:{folder}")
    assert ds.x_train.dtype.is_floating_point is False and tuple(ds.x_train.shape) == (160, 1, 16, 16)
    assert np.array_equal(ds.x_train[:, 0].numpy(), x) and np.array_equal(ds.y_train.numpy(), y)
    assert tuple(ds.x_test.shape) == (40, 1, 16, 16) and ds.classes == tuple(CLASSES) and ds.num_classes == 4
    assert "image column 'image', label column 'label'" in ds.source
    assert 0 < ds.mean[0] < 1 and ds.std[0] > 0  # [0, 1] scale, as the built-in datasets


def test_columns_by_type_or_by_key_and_no_test_split(tmp_path):
    folder = tmp_path / "rgb"
    x, _ = _save_image_dict(folder, rgb=True, column="picture", label="kind")
    ds = data.load_hf_dataset(f"hf:{folder}")  # an Image and a ClassLabel feature: found by their types
    assert tuple(ds.x_train.shape) == (160, 3, 16, 16) and "'picture'" in ds.source and "'kind'" in ds.source
    assert np.array_equal(ds.x_train.numpy().transpose(0, 2, 3, 1), x)
    # one split of number columns and string labels: the columns are named by keys; 10% of every class is held out
    rng = np.random.default_rng(0)
    feats = rng.random((60, 5)).astype(np.float32)
    kinds = ["b", "a", "c"] * 20
    flat = f"hf:{tmp_path / 'flat'}"
    datasets.Dataset.from_dict({"measurements": feats.tolist(), "kinds": kinds}).save_to_disk(str(tmp_path / "flat"))
    with pytest.raises(DataNotFoundError, match=r"which column holds the images \(columns: measurements, kinds\)"):
        data.load_hf_dataset(flat, label_column="kinds")
    with pytest.raises(DataNotFoundError, match=r"which column holds the labels .*; set label-column=NAME"):
        data.load_hf_dataset(flat, image_column="measurements")
    a = data.load_hf_dataset(flat, image_column="measurements", label_column="kinds")
    assert a.classes == ("a", "b", "c") and tuple(a.x_train.shape) == (54, 5) and tuple(a.x_test.shape) == (6, 5)
    assert np.bincount(a.y_test.numpy()).tolist() == [2, 2, 2]
    rows = {tuple(r) for r in a.x_train.numpy().round(6)} | {tuple(r) for r in a.x_test.numpy().round(6)}
    assert len(rows) == 60  # train and test are disjoint and cover every row
    hf._HF_CACHE.clear()
    b = data.load_hf_dataset(flat, image_column="measurements", label_column="kinds")
    assert np.array_equal(a.x_test.numpy(), b.x_test.numpy())  # the same test set every time


def test_bad_sources_get_one_clear_error(tmp_path, saved):
    folder, _, _ = saved
    with pytest.raises(DataNotFoundError, match="no such folder"):
        data.load_hf_dataset(f"hf:{tmp_path / 'nothing'}")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataNotFoundError, match=r"could not read this folder.*holds notes\.bin"):
        data.load_hf_dataset(f"hf:{tmp_path / 'junk'}")
    with pytest.raises(DataNotFoundError, match=r"label-column='kind' is not a column \(columns: image, label\)"):
        data.load_hf_dataset(f"hf:{folder}", label_column="kind")
    datasets.Dataset.from_dict({"x": [[1.0]] * 4, "label": [0] * 4}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(ValueError, match="at least 2"):
        data.load_hf_dataset(f"hf:{tmp_path / 'one'}")


def test_config_keys_and_preflight(saved, tmp_path):
    folder, _, _ = saved
    for bad, match in (
        ({"dataset": "hf:"}, "allowed values are .*hf:<"),
        ({"dataset": "imagenet"}, "allowed values are .*hf:<"),
        ({"image-column": "img"}, "only for dataset=hf"),
        ({"label-column": "y", "dataset": "cifar10"}, "only for dataset=hf"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate(bad)
    cfg = validate({"dataset": f"hf:{folder}", "model": "cnn", "out-dir": str(tmp_path)})
    d, _ = model_size(cfg)  # the model is sized from the data: 16x16, 1 channel, 4 classes
    assert d == sum(p.numel() for p in SmallCNN(4, 1, "group", 16).parameters())
    preflight(cfg)
    with pytest.raises(ConfigError, match=r"run-config dataset='hf:.*'.*label-column='nope' is not a column"):
        preflight(validate({"dataset": f"hf:{folder}", "label-column": "nope", "out-dir": str(tmp_path)}))


def test_partitioned_by_the_same_partitioners(saved):
    folder, _, y = saved
    ds = data.load_dataset(f"hf:{folder}")
    parts = data.partition(ds.y_train, 4, "classes:1", seed=0)  # flwr-datasets PathologicalPartitioner
    assert [len(np.unique(ds.y_train.numpy()[p])) for p in parts] == [1, 1, 1, 1]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))


def test_short_run_through_the_native_flower_mode(saved, tmp_path):
    """A few rounds of Sparse-Push on the saved dataset through Flower's simulation engine (native mode: node states
    in the ClientApps), label-skewed by flwr-datasets' Dirichlet partitioner; the nodes learn the 4 classes."""
    from flower_sparsepush.flower.launch import simulate

    folder, _, _ = saved
    cfg = {
        "dataset": f"hf:{folder}",
        "model": "cnn",
        "num-nodes": 4,
        "num-rounds": 6,
        "local-steps": 4,
        "batch-size": 16,
        "lr": 0.05,
        "eval-every": 6,
        "partition": "dirichlet:1.0",
        "compressor": "topk:0.1+q:4",
        "gamma": 0.3,
        "out-dir": str(tmp_path / "runs"),
        "run-name": "hf",
    }
    out = simulate(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["round"] == 6 and summary["bits_sent_per_node"] > 0
    assert summary["final"]["acc_node_mean"] > 0.5  # chance is 0.25
    assert json.loads((out / "config.json").read_text())["dataset"] == f"hf:{folder}"
