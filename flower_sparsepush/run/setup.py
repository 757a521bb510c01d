"""One run as every node sees it: the validated config, its typed training schedule, and the data, partition,
model and graph every process builds once (:func:`get_setup`), plus the push-sum rule of a node and round, the
failure model and the reply checks the relay applies."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.guard import ReplyChecks, message_size_limit
from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.core.topology import make_graph
from flower_sparsepush.learn import data, models
from flower_sparsepush.learn.seeds import seed_for
from flower_sparsepush.run.config import RunConfig
from flower_sparsepush.run.schedule import compressor_at, gamma_at


def make_rule(
    compressor, segments, seed: int, node: int, rnd: int, gamma: float, form: str, ref_init, bound: float | None = None
) -> PushSum:
    """The push-sum rule of one node and round: a compressor spec is built with a ``(seed, node, round)`` generator
    (random-k draws), a compressor object is used as it is; ``bound`` is the value bound (core/bounds.py). The native
    run (:meth:`Setup.rule`) and the drop-in strategy both build their rules here."""
    if isinstance(compressor, str):
        compressor = make_compressor(compressor, segments=segments, seed=seed_for(seed, node, "compress", rnd))
    return PushSum(compressor, gamma=gamma, form=form, ref_init=ref_init, bound=bound)


@dataclass(frozen=True)
class Schedule:
    """How every node trains: rounds, local steps, batches and the SGD rule (typed, from the run config)."""

    num_rounds: int
    final_gossip_rounds: int
    local_steps: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    qgm: bool
    seed: int

    @classmethod
    def of(cls, cfg: RunConfig) -> Schedule:
        return cls(
            cfg.num_rounds,
            cfg.final_gossip_rounds,
            cfg.local_steps,
            cfg.batch_size,
            cfg.lr,
            cfg.momentum,
            cfg.nesterov,
            cfg.weight_decay,
            cfg.qgm,
            cfg.seed,
        )

    def trains(self, rnd: int) -> bool:
        """Whether round ``rnd`` trains (rounds from ``num-rounds`` on are the final gossip-only phase)."""
        return rnd < self.num_rounds


@dataclass(frozen=True)
class RunData:
    """What a run's nodes share and every process builds once: data, partition, model architecture, initial model,
    graph. Cached per process by :func:`get_setup` (keyed by the config fields that decide it)."""

    ds: Any
    shards: list[tuple[torch.Tensor, torch.Tensor]]
    model: torch.nn.Module  # scratch module: parameters are loaded from a flat vector before every use
    x0: torch.Tensor
    segments: list[int]
    graph: Any
    train_size: int
    val: tuple[torch.Tensor, torch.Tensor] | None = None  # the held-out validation split (val-split > 0)
    eval_cache: dict = field(default_factory=dict)

    @cached_property
    def log_label_freq(self) -> torch.Tensor:
        """``(nodes, classes)``: the log of each node's label frequencies in its shard, add-one smoothed (a class it
        has no example of gets a large finite value, not -inf); run-config ``logit-adjust`` reads it every step."""
        k = self.ds.num_classes
        counts = torch.stack([torch.bincount(y.to(torch.int64), minlength=k) for _, y in self.shards]).to(torch.float32)
        return torch.log((counts + 1) / (counts.sum(1, keepdim=True) + k))


@dataclass(frozen=True)
class Setup:
    """One run as every node sees it: the validated config (read-only), its typed training schedule, and the shared
    :class:`RunData`. Immutable: :func:`get_setup` returns a new one per config, sharing the cached data."""

    cfg: RunConfig
    schedule: Schedule
    data: RunData

    ds = property(lambda self: self.data.ds)
    shards = property(lambda self: self.data.shards)
    model = property(lambda self: self.data.model)
    x0 = property(lambda self: self.data.x0)
    segments = property(lambda self: self.data.segments)
    graph = property(lambda self: self.data.graph)
    train_size = property(lambda self: self.data.train_size)
    val = property(lambda self: self.data.val)
    eval_cache = property(lambda self: self.data.eval_cache)

    @property
    def n(self) -> int:
        return self.cfg.num_nodes

    def rule(self, node: int, rnd: int) -> PushSum:
        """The push-sum rule for one node and round (random-k draws from a (seed, node, round) generator)."""
        cfg = self.cfg
        return make_rule(
            compressor_at(cfg, rnd),
            self.segments,
            cfg.seed,
            node,
            rnd,
            gamma_at(cfg, rnd),
            cfg.form,
            self.x0,
            cfg.value_bound,
        )

    def epoch(self, rnd: int) -> float:
        """Epochs of the whole training set seen after ``rnd`` rounds (all nodes together)."""
        return rnd * self.schedule.local_steps * self.schedule.batch_size * self.n / self.train_size


_DATA_CACHE: dict[tuple, RunData] = {}


_DATA_FIELDS = (
    "dataset",
    "data_dir",
    "image_column",
    "label_column",
    "partition",
    "num_nodes",
    "seed",
    "model",
    "norm",
    "graph",
    "val_split",
)


def load_data(cfg: RunConfig):

    if cfg.dataset == "synthetic":
        return data.make_synthetic(num_train=2000, num_test=500, num_classes=10, shape=(32,), seed=cfg.seed)
    cols = {}
    if data.is_hf(cfg.dataset):  # a Hugging Face dataset: its image and label columns (docs/data.md)
        cols = {"image_column": cfg.image_column, "label_column": cfg.label_column}
    return data.load_dataset(cfg.dataset, path=cfg.data_dir or None, **cols)


def validation_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) positions of the training set: ``fraction`` of every class held out, drawn by a generator
    seeded by ``(seed, "val")``, so each seed has its own split and the same split in every process."""
    rng = np.random.default_rng([seed, 0x7A1])
    y = labels.numpy()
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        held.append(rng.choice(idx, size=int(round(fraction * len(idx))), replace=False))
    mask = np.zeros(len(y), dtype=bool)
    mask[np.concatenate(held)] = True
    return torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask))


def get_setup(cfg: RunConfig) -> Setup:
    """The setup of a validated config: a new, read-only :class:`Setup` per call, over data built once per process
    (the last data set only, for memory). Nothing a caller holds changes when another caller asks for another
    config."""
    key = tuple(getattr(cfg, name) for name in _DATA_FIELDS)
    data = _DATA_CACHE.get(key)
    if data is None:
        data = build_data(cfg)
        _DATA_CACHE.clear()  # keep one data set per process (memory)
        _DATA_CACHE[key] = data
    return Setup(cfg, Schedule.of(cfg), data)


def build_data(cfg: RunConfig) -> RunData:
    ds = load_data(cfg)
    x_train, y_train, val = ds.x_train, ds.y_train, None
    if cfg.val_split > 0:
        keep, held = validation_split(y_train, cfg.val_split, cfg.seed)
        val = (x_train[held], y_train[held])
        x_train, y_train = x_train[keep], y_train[keep]
    parts = data.partition(y_train, cfg.num_nodes, cfg.partition, seed=cfg.seed)
    shards = [(x_train[torch.as_tensor(p)], y_train[torch.as_tensor(p)]) for p in parts]
    model = models.build_model(
        cfg.model, ds.num_classes, ds.in_channels, cfg.norm, input_shape=ds.input_shape, seed=cfg.seed
    )
    return RunData(
        ds,
        shards,
        model,
        models.flat_params(model).float(),
        models.segment_sizes(model),
        make_graph(cfg.graph, cfg.num_nodes, cfg.seed),
        len(y_train),
        val=val,
    )


def network_of(cfg: RunConfig) -> Network:
    """The link/node failure model of a run (router.Network); seeded by the run seed, as in the Flower path."""
    return Network(drop=cfg.drop, link_down=cfg.link_down, down_span=cfg.down_span, churn=cfg.churn, seed=cfg.seed)


def make_router(cfg: RunConfig) -> Router:
    return Router(cfg.num_nodes, network_of(cfg), bounce=cfg.bounce)


def reply_checks(setup: Setup) -> ReplyChecks:
    """What the relay checks every reply of this run against: the graph, the model size and form, the longest
    message the compressor of each round makes, the repeat-offender policy (``exclude-after``) and the consensus step
    size of each round (the weight ledger's share rule)."""
    dim = int(setup.x0.numel())
    return ReplyChecks(
        graph=setup.graph,
        dim=dim,
        form=setup.cfg.form,
        value_bound=setup.cfg.value_bound,  # core/bounds.py
        max_message_bytes=lambda rnd: message_size_limit(setup.rule(0, rnd).compressor, dim, setup.x0.dtype),
        exclude_after=setup.cfg.exclude_after,
        gamma=lambda rnd: gamma_at(setup.cfg, rnd),
    )
