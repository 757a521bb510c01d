"""The checks of a validated run config that need more than its values (the graph over the run's rounds, the model
against the data, the files, the results folder, what the Flower path supports), run before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

from flower_sparsepush.run.config import ConfigError, RunConfig, field_name, total_rounds

# shape of one example and class count of each dataset, to size the model before any data is loaded
DATA_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "fashion_mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "synthetic": ((32,), 10),  # training.load_data: make_synthetic(shape=(32,), num_classes=10)
}
_SELECTORS = ("topk", "topk-layer", "randk")


def hf_dataset(cfg: RunConfig):
    """The ``dataset=hf:...`` data of a validated config (``data.load_hf_dataset``; errors as :class:`ConfigError`)."""
    from flower_sparsepush.learn import data

    try:
        return data.load_hf_dataset(cfg.dataset, cfg.image_column, cfg.label_column)
    except ValueError as err:  # DataNotFoundError included
        raise ConfigError(f"run-config dataset={cfg.dataset!r}: {err}") from None


def model_size(cfg: RunConfig) -> tuple[int, list[int]]:
    """(number of parameters, per-tensor sizes) of the run's model, built without loading the dataset."""
    from flower_sparsepush.learn.models import build_model, segment_sizes

    if cfg.dataset in DATA_SHAPES:
        shape, classes = DATA_SHAPES[cfg.dataset]
    else:  # hf:...: the shapes are in the data (loaded once per process, kept for the run)
        ds = hf_dataset(cfg)
        shape, classes = ds.input_shape, ds.num_classes
    in_ch = shape[0] if len(shape) == 3 else 1
    model = build_model(cfg.model, classes, in_ch, cfg.norm, input_shape=shape, seed=cfg.seed)
    sizes = segment_sizes(model)
    return sum(sizes), sizes


def preflight(cfg: RunConfig, flower: bool = False) -> None:
    """The checks of a validated config that need more than its values; raises one :class:`ConfigError`.

    - the graph is jointly strongly connected over its window, for the rounds of this run
      (``topology.check_strongly_connected``);
    - the model fits the data (conv models need image datasets) and a top-k / random-k *count* is at most the number
      of parameters ``d`` (a fraction is always within (0, d]);
    - the dataset's files are present (``data.find_data``); a ``hf:`` dataset loads, with its columns;
    - the results folder ``<out-dir>/<run-name>`` can be created or written (nothing is created here);
    - with ``flower``: no checkpoints with ``node-store=context``.

    ``sparsepush train``, :func:`launch.simulate` and the ServerApp call it before Ray starts / before any message.
    """
    from flower_sparsepush.core.topology import GraphError, check_strongly_connected, make_graph

    if flower and cfg.device != "cpu":
        raise ConfigError(
            f"run-config device={cfg.device!r}: on Flower every node trains in its own ClientApp on the CPU; the "
            "device key moves the in-process loop's batched local SGD (python -m flower_sparsepush.run.inprocess); "
            "set device=cpu on Flower"
        )
    if flower and cfg.node_store == "context" and (cfg.checkpoint_every or cfg.resume):
        key = "checkpoint-every" if cfg.checkpoint_every else "resume"
        raise ConfigError(
            f"run-config {key}={getattr(cfg, field_name(key))!r} with node-store=context: Flower's context.state does not outlive a run, "
            "so the nodes cannot keep checkpoints there; set node-store to a folder (docs/node-store.md)"
        )
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"run-config device={cfg.device!r}: torch sees no GPU here; use device=cpu or auto")
    if cfg.strategy != "fedavg":
        try:
            check_strongly_connected(make_graph(cfg.graph, cfg.num_nodes, cfg.seed), rounds=total_rounds(cfg))
        except GraphError as err:
            raise ConfigError(f"run-config graph={cfg.graph!r}: {err}") from None
    if cfg.dataset == "synthetic" and cfg.model in ("cnn", "resnet20", "vgg11"):
        raise ConfigError(f"run-config model={cfg.model!r}: the synthetic dataset has flat features; use mlp or logreg")
    d, _ = model_size(cfg)
    if cfg.strategy != "sgp":
        for part in cfg.compressor.split("+"):
            name, _, arg = part.partition(":")
            if name in _SELECTORS and arg and float(arg) >= 1 and float(arg) > d:
                raise ConfigError(
                    f"run-config compressor={cfg.compressor!r}: {name} keeps {int(float(arg))} entries "
                    f"but the {cfg.model} model on {cfg.dataset} has only d={d} parameters "
                    "(k must be in (0, d])"
                )
    if cfg.dataset != "synthetic":
        from flower_sparsepush.learn import data

        try:
            hf_dataset(cfg) if data.is_hf(cfg.dataset) else data.find_data(cfg.dataset, cfg.data_dir or None)
        except (data.DataNotFoundError, FileNotFoundError) as err:
            raise ConfigError(f"run-config dataset={cfg.dataset!r}: {err}") from None
    out = Path(cfg.out_dir) / cfg.run_name
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run-config out-dir={cfg.out_dir!r}: cannot write results to {out} "
            f"({probe} is {'not a folder' if not probe.is_dir() else 'not writable'})"
        )
