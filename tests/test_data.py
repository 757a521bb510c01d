"""Tests for flower_sparsepush.learn.data and the modules behind it: loaders on tiny files written here, partitions,
batches."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_sparsepush.learn import cifar, data, locate
from flower_sparsepush.learn.data import DataNotFoundError

# --------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.tobytes()


def _write_idx_folder(
    folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0, dot: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr)
        name = stem.replace("-idx", ".idx") if dot else stem  # train-images.idx3-ubyte
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """Keep the real environment out: no SPARSEPUSH_DATA, cache inside tmp_path."""
    monkeypatch.delenv("SPARSEPUSH_DATA", raising=False)
    monkeypatch.setenv("SPARSEPUSH_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_roundtrip(tmp_path, gz):
    arrays = _write_idx_folder(tmp_path / "fm", gz=gz)
    ds = data.load_dataset("fashion_mnist", tmp_path / "fm")
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (20, 1, 28, 28)
    assert ds.x_test.shape == (10, 1, 28, 28)
    assert ds.y_train.dtype == torch.int64
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10 and len(ds.mean) == 1 and ds.label == "Fashion-MNIST"


def test_idx_torchvision_root_and_mnist(tmp_path):
    _write_idx_folder(tmp_path / "root" / "FashionMNIST" / "raw", gz=False)
    _write_idx_folder(tmp_path / "root" / "MNIST" / "raw", gz=True, seed=1)
    assert data.find_data("fmnist", tmp_path / "root") == tmp_path / "root" / "FashionMNIST" / "raw"
    ds = data.load_dataset("mnist", tmp_path / "root")
    assert ds.name == "mnist" and ds.x_train.shape == (20, 1, 28, 28)


@pytest.mark.parametrize("dot", [False, True], ids=["dash", "dot"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "sub", ["", "FashionMNIST/raw", "fashion-mnist/data/fashion", "fashion_mnist"], ids=["base", "tv", "repo", "flat"]
)
def test_idx_naming_variants(tmp_path, dot, gz, sub):
    """Every accepted name (dash or dot before idx, gzipped or not) in every distribution's folder layout loads the
    bytes written; the folder is found from the base the user names."""
    arrays = _write_idx_folder(tmp_path / "root" / sub, gz=gz, dot=dot, seed=3)
    assert data.find_data("fashion_mnist", tmp_path / "root") == (tmp_path / "root" / sub if sub else tmp_path / "root")
    ds = data.load_dataset("fashion_mnist", tmp_path / "root")
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(ds.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_mixed_names_and_folder_per_file(tmp_path):
    """Names may differ file by file, and an archive layout that keeps each file in a folder of its own name
    (train-images.idx3-ubyte/train-images.idx3-ubyte) loads too; a torchvision dataset folder is found via raw/."""
    arrays = _write_idx_folder(tmp_path / "mix", gz=False, dot=True)
    (tmp_path / "mix" / "t10k-labels.idx1-ubyte").rename(tmp_path / "mix" / "t10k-labels-idx1-ubyte")
    ds = data.load_idx_dataset(tmp_path / "mix")
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    nested = tmp_path / "kaggle"
    arrays = _write_idx_folder(tmp_path / "flat", gz=False, dot=True, seed=5)
    for f in (tmp_path / "flat").iterdir():
        (nested / f.name).mkdir(parents=True)
        f.rename(nested / f.name / f.name)
    ds = data.load_dataset("mnist", nested)
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    _write_idx_folder(tmp_path / "tv" / "MNIST" / "raw")
    assert data.find_data("mnist", tmp_path / "tv" / "MNIST") == tmp_path / "tv" / "MNIST" / "raw"


def test_idx_not_found_says_what_it_looked_for_and_found(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "search_dirs", _only_tmp(tmp_path, data.search_dirs))
    _write_idx_folder(tmp_path / "part", dot=True)
    (tmp_path / "part" / "t10k-labels.idx1-ubyte.gz").unlink()
    (tmp_path / "part" / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError) as err:
        data.find_data("fashion_mnist", tmp_path / "part")
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "dot before idx" in msg and "FashionMNIST/raw/" in msg
    assert f"{tmp_path / 'part'}: 3 of the 4 IDX files, missing t10k-labels-idx1-ubyte" in msg
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "images.bin").write_text("x")
    with pytest.raises(DataNotFoundError, match=r"other: holds images\.bin"):
        data.find_data("mnist", tmp_path / "other")
    with pytest.raises(DataNotFoundError, match=r"missing: does not exist"):
        data.find_data("mnist", tmp_path / "missing")
    with pytest.raises(
        DataNotFoundError, match=r"no t10k-labels-idx1-ubyte \(looked for .*t10k-labels\.idx1-ubyte.*notes\.txt"
    ):
        data.load_idx_dataset(tmp_path / "part")


def test_idx_bad_magic_and_size(tmp_path):
    good = _idx_bytes(np.zeros((2, 3, 3), np.uint8))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad)
    trunc = tmp_path / "trunc.gz"
    trunc.write_bytes(gzip.compress(good[:-1]))
    with pytest.raises(ValueError, match="payload"):
        data.read_idx(trunc)
    labels = tmp_path / "labels"
    labels.write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="dims"):
        data.read_idx(labels, expect_ndim=3)
    assert data.read_idx(labels, expect_ndim=1).shape == (4,)


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar_pickle(folder: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {b"batch_label": name.encode(), b"data": x, b"labels": y, b"filenames": [b"f"] * per_batch},
                fh,
                protocol=2,
            )
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5])


def test_cifar_pickle(tmp_path):
    x, y = _write_cifar_pickle(tmp_path / "d" / "cifar-10-batches-py")
    ds = data.load_dataset("cifar10", tmp_path / "d")
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (4, 3, 32, 32)
    assert np.array_equal(ds.x_train.reshape(20, -1).numpy(), x)  # CHW order kept
    assert np.array_equal(ds.y_train.numpy(), y)
    assert ds.label == "CIFAR-10" and ds.augment == "crop_flip" and ds.classes[0] == "airplane"


def _png_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format=fmt)
    return buf.getvalue()


def _write_image_tar(path: Path, fmt: str = "PNG") -> dict[str, tuple[int, int, int]]:
    colors = {"cat": (200, 10, 10), "dog": (10, 200, 10), "airplane": (10, 10, 200)}
    ext = ".png" if fmt == "PNG" else ".jpg"
    with tarfile.open(path, "w:gz") as tf:
        for split, n in (("train", 2), ("test", 1)):
            for cls, col in colors.items():
                for i in range(n):
                    raw = _png_bytes(col, fmt)
                    info = tarfile.TarInfo(f"cifar/{split}/{cls}/{i:04d}{ext}")
                    info.size = len(raw)
                    tf.addfile(info, io.BytesIO(raw))
    return colors


def test_image_folder_tarball_and_cache(tmp_path, monkeypatch):
    tar = tmp_path / "cifar10-jpg.tar.gz"
    colors = _write_image_tar(tar)
    ds = data.load_cifar10(tar)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (3, 3, 32, 32)
    assert ds.classes == ("airplane", "cat", "dog")  # sorted class folders -> label ids
    for x, y in zip(ds.x_train, ds.y_train, strict=True):
        assert tuple(x[:, 0, 0].tolist()) == colors[ds.classes[int(y)]]  # PNG: lossless
    cache = list((tmp_path / "cache").glob("*.npz"))
    assert len(cache) == 1
    # second load comes from the cache, even if PIL would fail now
    monkeypatch.setattr(cifar, "_decode", lambda b: (_ for _ in ()).throw(AssertionError("decoded")))
    ds2 = data.load_cifar10(tar)
    assert torch.equal(ds2.x_train, ds.x_train) and torch.equal(ds2.y_test, ds.y_test)


def test_loaders_find_cifar_through_data_find_data(tmp_path, monkeypatch):
    """load_dataset and load_cifar10 locate the files with data.find_data, so replacing it there redirects them."""
    _, y = _write_cifar_pickle(tmp_path / "elsewhere")
    monkeypatch.setattr(data, "find_data", lambda name, path=None: tmp_path / "elsewhere")
    assert np.array_equal(data.load_dataset("cifar10", tmp_path / "ignored").y_train.numpy(), y)


def test_image_folder_jpeg_tree_label(tmp_path):
    tar = tmp_path / "cifar10-jpg.tar.gz"
    _write_image_tar(tar, fmt="JPEG")
    ds = data.load_cifar10(tar)
    assert ds.label == "CIFAR-10 (JPEG q75 copy)"
    # extracted tree works too
    with tarfile.open(tar) as tf:
        tf.extractall(tmp_path / "tree", filter="data")
    ds2 = data.load_cifar10(tmp_path / "tree" / "cifar")
    assert torch.equal(ds2.x_train, ds.x_train)


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(locate, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(data, "search_dirs", _only_tmp(tmp_path, data.search_dirs))
    with pytest.raises(DataNotFoundError) as err:
        data.load_dataset("fashion_mnist", tmp_path / "empty")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(tmp_path / "empty") in msg and str(tmp_path / "no-debian") in msg
    assert str(tmp_path / "cache") in msg
    assert "sudo apt-get install -y dataset-fashion-mnist" in msg
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        data.find_data("cifar10", tmp_path / "empty")


def _only_tmp(tmp_path, orig):
    """search_dirs without the machine's real shared folders (which may hold data)."""

    def wrapped(name, path=None):
        return [p for p in orig(name, path) if str(p).startswith(str(tmp_path))]

    return wrapped


def test_env_var_search(tmp_path, monkeypatch):
    _write_idx_folder(tmp_path / "shared" / "fashion-mnist")
    monkeypatch.setenv("SPARSEPUSH_DATA", str(tmp_path / "shared"))
    assert data.find_data("fashion-mnist") == tmp_path / "shared" / "fashion-mnist"
    with pytest.raises(ValueError, match="valid names"):
        data.find_data("imagenet")


def test_real_fashion_mnist():
    if not locate.is_idx_folder(locate.DEBIAN_FASHION_MNIST):
        pytest.skip("Debian Fashion-MNIST not installed (sudo apt-get install -y dataset-fashion-mnist)")
    ds = data.load_idx_dataset(locate.DEBIAN_FASHION_MNIST, "fashion_mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    assert abs(ds.mean[0] - 0.286) < 0.01 and abs(ds.std[0] - 0.353) < 0.01


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic():
    a = data.make_synthetic(200, 50, num_classes=4, shape=(8,), seed=3)
    b = data.load_dataset("synthetic", num_train=200, num_test=50, num_classes=4, shape=(8,), seed=3)
    c = data.make_synthetic(200, 50, num_classes=4, shape=(8,), seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.equal(torch.bincount(a.y_train), torch.full((4,), 50))
    img = data.make_synthetic(40, 10, shape=(3, 8, 8), class_probs=[1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert img.x_train.shape == (40, 3, 8, 8) and set(img.y_train.tolist()) <= {0, 9}


# --------------------------------------------------------------------------- partitions

LABELS = np.repeat(np.arange(10), 400)  # 4000 samples, 10 balanced classes
SCHEMES = ["iid", "skew:0", "skew:0.5", "skew:1", "dirichlet:0.3", "classes:2"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_disjoint_cover_reproducible(scheme):
    nodes = 10  # >= classes, so classes:K uses every class
    parts = data.partition(LABELS, nodes, scheme, seed=1)
    assert len(parts) == nodes
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS)  # sizes add up to N
    assert len(np.unique(allidx)) == len(LABELS)  # no sample in two nodes
    assert all(p.dtype == np.int64 for p in parts)
    again = data.partition(LABELS, nodes, scheme, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=8, max_size=300),
    nodes=st.integers(1, 8),
    s=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_skew_property(labels, nodes, s, seed):
    """Any labels/nodes/S: disjoint cover, near-equal sizes, deterministic."""
    y = np.array(labels)
    parts = data.partition(y, nodes, f"skew:{s!r}", seed=seed)
    allidx = np.sort(np.concatenate(parts))
    assert np.array_equal(allidx, np.arange(len(y)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = data.partition(y, nodes, f"skew:{s!r}", seed=seed)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


def test_skew0_is_iid_and_iid_balanced():
    glob = np.bincount(LABELS) / len(LABELS)
    for scheme in ("skew:0", "iid"):
        parts = data.partition(LABELS, 8, scheme, seed=0)
        hist = data.class_histogram(LABELS, parts, 10)
        frac = hist / hist.sum(1, keepdims=True)
        # 500 samples/node: binomial sd of a 0.1 proportion ~ 0.013; 0.06 is > 4 sd
        assert np.abs(frac - glob).max() < 0.06, scheme
        assert hist.sum(1).max() - hist.sum(1).min() <= 1


def test_skew1_classes_per_node():
    parts = data.partition(LABELS, 8, "skew:1", seed=0)
    hist = data.class_histogram(LABELS, parts, 10)
    present = (hist > 0).sum(1)
    assert present.max() <= 2 and present.min() >= 1
    # each node's data is 1.25 classes' worth: its top class holds >= 1/1.25*... of it
    top = hist.max(1) / hist.sum(1)
    assert top.min() >= 0.5
    sizes = hist.sum(1)
    assert sizes.max() - sizes.min() <= 1


def test_skew_half_exact_sizes():
    s = 0.5
    parts = data.partition(LABELS, 8, f"skew:{s}", seed=0)
    hist = data.class_histogram(LABELS, parts, 10)
    # every node gets a shuffled share (~all classes) plus a sorted share (<= 2 classes)
    assert (hist > 0).sum(1).min() >= 8
    assert np.all(np.abs(hist.sum(1) - len(LABELS) / 8) <= 1)


def test_dirichlet_seeds():
    a = data.partition(LABELS, 5, "dirichlet:0.5", seed=0)
    b = data.partition(LABELS, 5, "dirichlet:0.5", seed=0)
    c = data.partition(LABELS, 5, "dirichlet:0.5", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c, strict=True))

    # small alpha is more skewed than large alpha
    def skew(parts):
        h = data.class_histogram(LABELS, parts, 10)
        return (h.max(1) / h.sum(1)).mean()

    assert skew(data.partition(LABELS, 5, "dirichlet:0.05", seed=0)) > skew(
        data.partition(LABELS, 5, "dirichlet:100", seed=0)
    )


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
@pytest.mark.parametrize("k", [1, 3])
def test_classes_k_exact(k):
    parts = data.partition(LABELS, 7, f"classes:{k}", seed=2)
    hist = data.class_histogram(LABELS, parts, 10)
    assert np.all((hist > 0).sum(1) == k)
    assert len(np.unique(np.concatenate(parts))) == len(np.concatenate(parts))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "iid:1",
        "skew",
        "skew:1.5",
        "skew:-0.1",
        "dirichlet:0",
        "dirichlet:-1",
        "classes:0",
        "classes:2.5",
        "classes:11",
        "foo:1",
    ],
)
def test_partition_bad_scheme(bad):
    with pytest.raises(ValueError, match="valid forms"):
        data.partition(LABELS, 4, bad, seed=0)


def test_partition_bad_nodes():
    with pytest.raises(ValueError):
        data.partition(LABELS, 0, "iid")


def test_partition_report(tmp_path):
    parts = data.partition(LABELS, 4, "skew:1", seed=0)
    hist = data.class_histogram(LABELS, parts, 10)
    assert hist.shape == (4, 10) and hist.sum() == len(LABELS)
    j, p = data.save_partition_report(tmp_path / "rep", hist, "skew:1, 4 nodes")
    info = json.loads(j.read_text())
    assert info["histogram"] == hist.tolist() and info["title"] == "skew:1, 4 nodes"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- batches


def test_crop_flip_shape_dtype_and_seed():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8).to(torch.uint8)
    a = data.random_crop_flip(x, torch.Generator().manual_seed(0))
    b = data.random_crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    xf = torch.randn(16, 3, 8, 8)
    assert data.random_crop_flip(xf, torch.Generator().manual_seed(1)).dtype == torch.float32


def test_crop_flip_matches_reference():
    """Compare with a per-image reference using the same random draws."""
    x = torch.randint(0, 256, (64, 3, 10, 12), dtype=torch.uint8)
    out = data.random_crop_flip(x, torch.Generator().manual_seed(5), pad=4)
    g = torch.Generator().manual_seed(5)
    oy = torch.randint(0, 9, (64,), generator=g)
    ox = torch.randint(0, 9, (64,), generator=g)
    fl = torch.rand(64, generator=g) < 0.5
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flipped = 0
    for i in range(64):
        ref = xp[i, :, oy[i] : oy[i] + 10, ox[i] : ox[i] + 12]
        if fl[i]:
            ref = ref.flip(-1)
            flipped += 1
        assert torch.equal(out[i], ref)
    assert 0 < flipped < 64
    # pad=0, no flip is the identity
    assert torch.equal(data.random_crop_flip(x, None, pad=0, flip=False), x)


def test_pure_flip_and_pure_shift():
    x = torch.randint(0, 256, (32, 1, 5, 5), dtype=torch.uint8)
    out = data.random_crop_flip(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    for i in range(32):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


def test_normalize():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = data.normalize(x, (0.5, 0.5, 0.0), (0.5, 0.25, 1.0))
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.ones(1)) and torch.allclose(out[:, 1], torch.full((1,), 2.0))
    assert torch.allclose(out[:, 2], torch.ones(1))


def test_node_data_epochs_and_determinism():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.arange(10)
    nd = data.NodeData(x, y, (0.0,), (1.0,))
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([nd.next_batch(4, g)[1] for _ in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert nd.epoch == 1
    nd2 = data.NodeData(x, y, (0.0,), (1.0,))
    g2 = torch.Generator().manual_seed(0)
    seen2 = torch.cat([nd2.next_batch(4, g2)[1] for _ in range(5)])
    assert torch.equal(seen, seen2)
    xb, yb = nd.next_batch(3, g)
    assert torch.equal(xb[:, 0], yb.float())  # x and y stay aligned


def test_make_node_data_cifar_like():
    ds = data.make_synthetic(80, 20, num_classes=4, shape=(3, 8, 8), seed=0)
    ds.x_train = (ds.x_train.clamp(-3, 3) * 40 + 128).to(torch.uint8)
    ds.mean, ds.std, ds.augment = (0.5,) * 3, (0.25,) * 3, "crop_flip"
    parts = data.partition(ds.y_train, 4, "skew:1", seed=0)
    nodes = data.make_node_data(ds, parts)
    assert [len(n) for n in nodes] == [len(p) for p in parts]
    g = torch.Generator().manual_seed(0)
    xb, yb = nodes[1].next_batch(8, g)
    assert xb.shape == (8, 3, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert set(yb.tolist()) <= set(ds.y_train[parts[1]].tolist())
    with pytest.raises(ValueError):
        data.NodeData(ds.x_train, ds.y_train, ds.mean, ds.std, augment="bogus")
