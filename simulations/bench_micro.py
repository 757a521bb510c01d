# ruff: noqa: B023  (the timed lambdas are called at once, inside the loop that defines them)
"""The benchmark's sections that time pieces of the code on their own, in this process with one torch thread:
``wire`` (bits of a real message against its entropy bound), ``codec`` (selection, encode, decode, add),
``topk`` (the top-k compressor against one memory pass), ``store`` (writing one node's state) and ``data`` (the
loader against model steps). Each figure is a median over repeats that interleave the things compared, so that a
change of the machine's load hits them alike."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from flower_sparsepush.simulations.bench_measure import stats, timeit
from flower_sparsepush.simulations.bench_worker import bench_cfg

FRACTIONS = (0.1, 0.01, 0.001)


def trained_difference(dim_model: str = "resnet20", steps: int = 10, dataset: str = "fashion_mnist"):
    """ResNet-20 parameters after ``steps`` SGD steps minus its initialisation (a realistic update), float32."""
    import torch
    import torch.nn.functional as F

    from flower_sparsepush.learn import models

    try:
        from flower_sparsepush.learn.data import load_dataset

        ds = load_dataset(dataset)
        x, y = ds.x_train[: 32 * steps].float(), ds.y_train[: 32 * steps]
        x = (x - x.mean()) / (x.std() + 1e-8)
        in_ch, shape = ds.in_channels, ds.input_shape
    except Exception:  # noqa: BLE001 - no data set here: random images still give a realistic update structure
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32 * steps, 1, 28, 28, generator=g), torch.randint(0, 10, (32 * steps,), generator=g)
        in_ch, shape = 1, (1, 28, 28)
    model = models.build_model(dim_model, 10, in_ch, "group", input_shape=shape, seed=0)
    x0 = models.flat_params(model).clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[32 * s : 32 * s + 32]), y[32 * s : 32 * s + 32]).backward()
        opt.step()
    return (models.flat_params(model) - x0).float()


def wire_ratio(v, spec: str) -> dict[str, float]:
    """Bits of one real encoded message of ``v`` under compressor ``spec`` vs its entropy bound."""
    from flower_sparsepush.core import codec
    from flower_sparsepush.core.compression import make_compressor

    c = make_compressor(spec)(v)
    data = codec.encode(codec.Message(0, 0, 0.5, 0.5, c))
    bits = 8 * len(data)
    value_bits = c.k * (c.bits if c.codes is not None else 8 * c.values.dtype.itemsize) + (
        32 if c.codes is not None else 0
    )
    pos_bound = codec.entropy_bits(c.dim, c.k, 0)
    index_bits = min(codec.index_bits(c.indices, c.dim).values()) if c.indices is not None else 0
    return {
        "bits": bits,
        "entropy_bits": codec.message_entropy_bits(data),
        "k": c.k,
        "dim": c.dim,
        "ratio": bits / codec.message_entropy_bits(data),
        "index_ratio": index_bits / pos_bound if pos_bound else float("nan"),
        "value_bits": value_bits,
        "header_bits": 8 * codec.HEADER.size,
        "coding": codec.CODING_NAMES[(data[3] >> 1) & 3] if c.indices is not None else "dense",
    }


def section_wire(vectors: dict[str, Any], log) -> dict[str, Any]:
    out = {}
    for name, v in vectors.items():
        for frac in FRACTIONS:
            for spec in (f"topk:{frac:g}", f"topk:{frac:g}+q:4"):
                r = wire_ratio(v, spec)
                out[f"{name}|{spec}"] = r
                log(
                    f"wire {name} {spec}: {r['bits']} bits, ratio {r['ratio']:.4f}, index part "
                    f"{r['index_ratio']:.4f} ({r['coding']})"
                )
    return out


def section_codec(dims: dict[str, int], repeat: dict[str, int], log, fractions=FRACTIONS) -> dict[str, Any]:
    """torch.topk alone vs selection (TopK compressor), encode, decode, add_to_ on Gaussian vectors."""
    import torch

    from flower_sparsepush.core import codec
    from flower_sparsepush.core.compression import TopK

    out = {}
    for label, d in dims.items():
        v = torch.randn(d, generator=torch.Generator().manual_seed(1))
        mag = v.abs()
        target = torch.zeros(d)
        for frac in fractions:
            comp = TopK(frac)
            k = comp.count(d)
            n = repeat[label]
            t_topk, t_sel, t_enc, t_dec, t_add = [], [], [], [], []
            for _ in range(n):  # interleaved, so that load changes hit every part alike
                t_topk += timeit(lambda: torch.topk(mag, k, sorted=False), 1)[0]
                ts, c = timeit(lambda: comp(v), 1)
                t_sel += ts
                msg = codec.Message(0, 0, 0.5, 0.5, c)
                te, data = timeit(lambda: codec.encode(msg), 1)
                t_enc += te
                td, m2 = timeit(lambda: codec.decode(data, expected_dim=d), 1)
                t_dec += td
                t_add += timeit(lambda: m2.payload.add_to_(target), 1)[0]
            topk_med = statistics.median(t_topk)
            row = {
                "k": k,
                "topk_s": stats(t_topk),
                "select_s": stats(t_sel),
                "encode_s": stats(t_enc),
                "decode_s": stats(t_dec),
                "add_to_s": stats(t_add),
                "encdec_vs_topk": (statistics.median(t_enc) + statistics.median(t_dec)) / topk_med,
                "encdec_vs_topk_per_run": stats([(e + dd) / t for e, dd, t in zip(t_enc, t_dec, t_topk)]),
                "pipeline_vs_topk": (
                    statistics.median(t_sel)
                    + statistics.median(t_enc)
                    + statistics.median(t_dec)
                    + statistics.median(t_add)
                )
                / topk_med,
            }
            out[f"{label}|{frac:g}"] = row
            log(
                f"codec {label} top-{frac:g}: topk {topk_med * 1e3:.2f} ms, select {row['select_s']['median'] * 1e3:.2f}"
                f", encode {row['encode_s']['median'] * 1e3:.2f}, decode {row['decode_s']['median'] * 1e3:.2f} ms; "
                f"(enc+dec)/topk {row['encdec_vs_topk']:.3f}, pipeline/topk {row['pipeline_vs_topk']:.2f}"
            )
    return out


def _torch_topk_path(v, k: int):
    """Top-k selection through ``torch.topk``, the reference the TopK compressor is timed against: torch.topk on |v|,
    the positions sorted, their values."""
    import torch

    from flower_sparsepush.core.compression import sorted_indices

    idx = sorted_indices(torch.topk(v.abs(), k, sorted=False).indices.numpy(), len(v))
    return idx, v.numpy()[idx].copy()


def section_topk(dims: dict[str, int], repeat: dict[str, int], log, fractions=FRACTIONS) -> dict[str, Any]:
    """``TopK(frac)(v)`` (selection + values) vs the torch.topk path vs one ``v.abs().sum()`` pass, float32
    Gaussian vectors; the three are timed one after the other in every repeat, so load changes hit them alike."""
    import numpy as np
    import torch

    from flower_sparsepush.core.compression import TopK

    out = {}
    for label, d in dims.items():
        v = torch.randn(d, generator=torch.Generator().manual_seed(2))
        for frac in fractions:
            comp = TopK(frac)
            k = comp.count(d)
            t_new, t_old, t_pass = [], [], []
            for _ in range(repeat[label]):
                ts, c = timeit(lambda: comp(v), 1)
                t_new += ts
                ts, (old_idx, _) = timeit(lambda: _torch_topk_path(v, k), 1)
                t_old += ts
                t_pass += timeit(lambda: v.abs().sum(), 1)[0]
            new, old, mem = (statistics.median(t) for t in (t_new, t_old, t_pass))
            row = {
                "k": k,
                "dim": d,
                "topk_s": stats(t_new),
                "torch_topk_path_s": stats(t_old),
                "abs_sum_pass_s": stats(t_pass),
                "topk_vs_pass": new / mem,
                "torch_topk_vs_pass": old / mem,
                "speedup_vs_torch_topk": old / new,
                "topk_vs_pass_per_run": stats([a / b for a, b in zip(t_new, t_pass)]),
                "same_set_as_torch_topk": bool(np.array_equal(c.indices, old_idx)),
            }
            out[f"{label}|{frac:g}"] = row
            log(
                f"topk {label} top-{frac:g}: TopK {new * 1e3:.2f} ms, torch.topk path {old * 1e3:.2f} ms, abs().sum() "
                f"{mem * 1e3:.2f} ms; TopK/pass {row['topk_vs_pass']:.2f}, torch.topk/pass "
                f"{row['torch_topk_vs_pass']:.2f}, same set {row['same_set_as_torch_topk']}"
            )
    return out


def section_store(dims: dict[str, int], repeat: int, log) -> dict[str, Any]:
    """Writing one node's state (store.py) on the store's own filesystem: the store's save (safetensors written from
    the tensors' memory, in place over the older of two slots, CRC-32 included) vs ``torch.save`` to a temporary file renamed over the
    last one vs the CRC-32 alone vs one pickle round trip of the same state as a
    Flower ``ArrayRecord`` (what ``node-store=context`` pays in each direction of every message). The state is the
    shape a node holds in the overhead runs: x, momentum, 4 outgoing and 4 incoming references, y, one outbox."""
    import pickle
    import shutil

    import torch
    from flwr.app import Array, ArrayRecord

    from flower_sparsepush.flower.store import NodeStore, checksum, default_root

    out = {}
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=_mkdir(default_root())))
    try:
        for label, d in dims.items():
            g = torch.Generator().manual_seed(3)
            names = ["x", "m", *(f"ro.{j}" for j in (1, 2, 4, 8)), *(f"ri.{j}" for j in (15, 14, 12, 8))]
            flat = {n: torch.randn(d, generator=g) for n in names}
            flat |= {
                "y": torch.ones(1, dtype=torch.float64),
                "out.5": torch.randint(0, 255, (1636,), dtype=torch.uint8),
            }
            store = NodeStore(root, f"bench-{label}")
            pt_path = root / f"torch-{label}.pt"
            rec = ArrayRecord({k: Array(v.numpy()) for k, v in flat.items()})

            def torch_save_rename():
                tmp = pt_path.with_suffix(".tmp")
                torch.save({"flat": flat, "round": 1, "checksum": checksum(flat)}, tmp)
                os.replace(tmp, pt_path)

            t_new, t_old, t_crc, t_ctx = [], [], [], []
            for i in range(repeat):  # interleaved: load changes hit all four alike
                t_new += timeit(lambda: store.save(0, i, flat), 1)[0]
                t_old += timeit(torch_save_rename, 1)[0]
                t_crc += timeit(lambda: checksum(flat), 1)[0]
                t_ctx += timeit(lambda: pickle.loads(pickle.dumps(rec)), 1)[0]
            NodeStore.forget()
            row = {
                "dim": d,
                "state_mb": sum(v.numel() * v.element_size() for v in flat.values()) / 1e6,
                "store_save_s": stats(t_new),
                "torch_save_rename_s": stats(t_old),
                "checksum_s": stats(t_crc),
                "arrayrecord_pickle_round_trip_s": stats(t_ctx),
            }
            row["torch_save_rename_vs_store"] = row["torch_save_rename_s"]["median"] / row["store_save_s"]["median"]
            out[label] = row
            ms = lambda k: row[k]["median"] * 1e3  # noqa: E731
            log(
                f"store {label} ({row['state_mb']:.1f} MB): store save {ms('store_save_s'):.2f} ms (CRC "
                f"{ms('checksum_s'):.2f}), torch.save + rename {ms('torch_save_rename_s'):.2f} ms, ArrayRecord "
                f"pickle round trip {ms('arrayrecord_pickle_round_trip_s'):.2f} ms"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def section_data(models_: tuple[str, ...], dataset: str, batches: int, log) -> dict[str, Any]:
    """Loader batches/s (node_train.node_batch, data.NodeData) vs model steps/s at batch 32."""
    import torch
    import torch.nn.functional as F

    from flower_sparsepush.learn import data
    from flower_sparsepush.learn.seeds import generator
    from flower_sparsepush.run.node_train import node_batch
    from flower_sparsepush.run.setup import get_setup

    out = {}
    for model in models_:
        cfg = bench_cfg(model, 16, 1, 1, dataset, tempfile.gettempdir())
        setup = get_setup(cfg)
        aug = generator(0, 0, "aug", 0)
        t_nb, _ = timeit(lambda: [node_batch(setup, 0, r, 0, aug) for r in range(batches)], 3)
        x, y = setup.shards[0]
        nd = data.NodeData(x, y, setup.ds.mean, setup.ds.std, setup.ds.augment)
        g = torch.Generator().manual_seed(0)
        t_nd, _ = timeit(lambda: [nd.next_batch(32, g) for _ in range(batches)], 3)
        xb, yb = node_batch(setup, 0, 0, 0, aug)
        m = setup.model
        m.train()

        def step():
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), yb).backward()

        steps = max(3, batches // 10)
        t_step, _ = timeit(lambda: [step() for _ in range(steps)], 3)
        row = {
            "node_batch_per_s": stats([batches / t for t in t_nb]),
            "nodedata_batch_per_s": stats([batches / t for t in t_nd]),
            "model_steps_per_s": stats([steps / t for t in t_step]),
        }
        row["loader_vs_step_speed"] = row["node_batch_per_s"]["median"] / row["model_steps_per_s"]["median"]
        row["loader_share_of_step"] = 1 / (1 + row["loader_vs_step_speed"])
        out[model] = row
        log(
            f"data {model}: node_batch {row['node_batch_per_s']['median']:.0f}/s, NodeData "
            f"{row['nodedata_batch_per_s']['median']:.0f}/s, model steps {row['model_steps_per_s']['median']:.1f}/s"
        )
    return out
