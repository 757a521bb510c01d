"""A node's local training step and the in-process reference loop (no Flower imports).

Both the Flower ClientApp and :func:`run_inprocess` call :func:`node_round`, so the two paths run the same code on
the same numbers. Everything random is a pure function of ``(seed, node, round)`` or ``(seed, node, epoch)``:

- batches: node i's shard is visited in epochs; epoch e is a permutation drawn from a generator seeded by
  ``(seed, node, "epoch", e)``; the k-th local step of round t takes the next ``batch-size`` positions after
  ``(t * local_steps + k) * batch_size`` samples. No sampler state is kept between rounds, so a ClientApp that
  runs in any Ray actor draws exactly the batches the in-process loop draws;
- augmentation (CIFAR-10 crop/flip) and random-k compression: generators seeded by ``(seed, node, round)``.

Round t (0-based) of node i: absorb the messages sent to it in round t-1 (ordered by sender id), run ``local_steps``
SGD steps (momentum / Nesterov / weight decay, the momentum buffer kept flat in ``NodeState.momentum``) starting
from the de-biased model z, set ``x = y * z_new`` (``PushSum.local_update``), then send to
``graph.out_neighbours(t)[i]``. Messages sent in the last round stay undelivered (they are in the mailboxes).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.guard import BadReply, Guard, Outbox, message_size_limit
from flower_sparsepush.core.merge import correct_bias, correct_drift, merge, merge_bits
from flower_sparsepush.core.node import Node, RoundOut, state_from_flat, state_to_flat
from flower_sparsepush.core.pushsum import NodeState, PushSum
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.core.topology import make_graph
from flower_sparsepush.learn.batched import sgd_step_
from flower_sparsepush.run.config import parse_lr_schedule

_TAGS = {"batch": 1, "epoch": 2, "aug": 3, "compress": 4}


def seed_for(seed: int, node: int, tag: str, k: int) -> int:
    """A 63-bit seed that depends only on (seed, node, tag, k)."""
    return int(
        np.random.SeedSequence([seed, node, _TAGS[tag], k]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
        >> np.uint64(1)
    )


def generator(seed: int, node: int, tag: str, k: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed_for(seed, node, tag, k))
    return g


def lr_at(cfg: dict[str, Any], rnd: int) -> float:
    """Learning rate of round ``rnd`` (0-based) under ``lr-schedule``."""
    kind, fractions = parse_lr_schedule(cfg["lr-schedule"])
    lr, total = cfg["lr"], cfg["num-rounds"]
    if kind == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * rnd / total))
    if kind == "step":
        return lr * 0.1 ** sum(rnd >= f * total for f in fractions)
    return lr


def compressor_at(cfg: dict[str, Any], rnd: int) -> str:
    """The compressor spec of round ``rnd`` (0-based). With ``sparsity-warmup`` R > 0 the kept fraction of the
    selection ramps exponentially (as in Deep Gradient Compression, Lin et al. 2018) from ``sparsity-warmup-start``
    at round 0 to the spec's own fraction F at round R: ``f_t = f0 * (F / f0) ** (t / R)``; from round R on it is F.
    With ``sparsity-schedule=lr`` the kept fraction follows the learning rate, ``f_t = F * lr_t / mean(lr)`` (mean
    over the training rounds; floored at F/20, capped at 1; F in the gossip-only final rounds): a node moves in
    proportion to its step size, so that is where its neighbours' copies fall behind. The quantizer (``+q:B``) is
    unchanged. Bits are whatever the messages then take (counted as always)."""
    spec, warm = cfg["compressor"], cfg["sparsity-warmup"]
    by_lr = cfg["sparsity-schedule"] == "lr" and rnd < cfg["num-rounds"]
    if spec == "none" or not (by_lr or (warm and rnd < warm)):
        return spec
    sel, plus, rest = spec.partition("+")
    name, _, arg = sel.partition(":")
    if name not in ("topk", "topk-layer", "randk"):
        return spec
    target = float(arg)
    if by_lr:
        frac = min(1.0, max(target / 20, target * lr_at(cfg, rnd) / mean_lr(cfg)))
    else:
        start = cfg["sparsity-warmup-start"]
        frac = start * (target / start) ** (rnd / warm)
    return f"{name}:{frac:.6g}{plus}{rest}"


def mean_lr(cfg: dict[str, Any]) -> float:
    """The learning rate averaged over the training rounds (``lr-schedule``)."""
    return _mean_lr(cfg["lr-schedule"], cfg["lr"], cfg["num-rounds"])


@functools.lru_cache(maxsize=16)
def _mean_lr(schedule: str, lr: float, total: int) -> float:
    cfg = {"lr-schedule": schedule, "lr": lr, "num-rounds": total}
    return sum(lr_at(cfg, r) for r in range(total)) / total


def gamma_at(cfg: dict[str, Any], rnd: int) -> float:
    """The consensus step size of round ``rnd``: ``gamma``, ramped linearly from ``gamma / gamma-warmup`` over the
    first ``gamma-warmup`` rounds when that is > 0 (``gamma * (t + 1) / R``)."""
    warm = cfg["gamma-warmup"]
    if warm and rnd < warm:
        return cfg["gamma"] * (rnd + 1) / warm
    return cfg["gamma"]


def round_rule(compressor, segments, seed: int, node: int, rnd: int, gamma: float, form: str, ref_init) -> PushSum:
    """The push-sum rule of one node and round: a compressor spec is built with a ``(seed, node, round)`` generator
    (random-k draws), a compressor object is used as it is. The native run (:meth:`Setup.algo`) and the drop-in
    strategy both build their rules here."""
    if isinstance(compressor, str):
        compressor = make_compressor(compressor, segments=segments, seed=seed_for(seed, node, "compress", rnd))
    return PushSum(compressor, gamma=gamma, form=form, ref_init=ref_init)


# --------------------------------------------------------------------------- setup (data, model, graph)


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
    def of(cls, cfg: Mapping[str, Any]) -> Schedule:
        return cls(
            cfg["num-rounds"],
            cfg["final-gossip-rounds"],
            cfg["local-steps"],
            cfg["batch-size"],
            cfg["lr"],
            cfg["momentum"],
            cfg["nesterov"],
            cfg["weight-decay"],
            cfg["qgm"],
            cfg["seed"],
        )

    def trains(self, rnd: int) -> bool:
        """Whether round ``rnd`` trains (rounds from ``num-rounds`` on are the final gossip-only phase)."""
        return rnd < self.num_rounds


@dataclass(frozen=True)
class RunData:
    """What a run's nodes share and every process builds once: data, partition, model architecture, initial model,
    graph. Cached per process by :func:`get_setup` (keyed by the config keys that decide it)."""

    ds: Any
    shards: list[tuple[torch.Tensor, torch.Tensor]]
    model: torch.nn.Module  # scratch module: parameters are loaded from a flat vector before every use
    x0: torch.Tensor
    segments: list[int]
    graph: Any
    train_size: int
    val: tuple[torch.Tensor, torch.Tensor] | None = None  # the held-out validation split (val-split > 0)
    eval_cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """One run as every node sees it: the validated config (read-only), its typed training schedule, and the shared
    :class:`RunData`. Immutable: :func:`get_setup` returns a new one per config, sharing the cached data."""

    cfg: Mapping[str, Any]
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
        return self.cfg["num-nodes"]

    def algo(self, node: int, rnd: int) -> PushSum:
        """The push-sum rule for one node and round (random-k draws from a (seed, node, round) generator)."""
        cfg = self.cfg
        return round_rule(
            compressor_at(cfg, rnd), self.segments, cfg["seed"], node, rnd, gamma_at(cfg, rnd), cfg["form"], self.x0
        )

    def epoch(self, rnd: int) -> float:
        """Epochs of the whole training set seen after ``rnd`` rounds (all nodes together)."""
        return rnd * self.schedule.local_steps * self.schedule.batch_size * self.n / self.train_size


_DATA_CACHE: dict[tuple, RunData] = {}
_DATA_KEYS = (
    "dataset",
    "data-dir",
    "image-column",
    "label-column",
    "partition",
    "num-nodes",
    "seed",
    "model",
    "norm",
    "graph",
    "val-split",
)


def load_data(cfg: dict[str, Any]):
    from flower_sparsepush.learn import data

    if cfg["dataset"] == "synthetic":
        return data.make_synthetic(num_train=2000, num_test=500, num_classes=10, shape=(32,), seed=cfg["seed"])
    cols = {}
    if data.is_hf(cfg["dataset"]):  # a Hugging Face dataset: its image and label columns (docs/data.md)
        cols = {"image_column": cfg["image-column"], "label_column": cfg["label-column"]}
    return data.load_dataset(cfg["dataset"], path=cfg["data-dir"] or None, **cols)


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


def get_setup(cfg: Mapping[str, Any]) -> Setup:
    """The setup of a validated config: a new, read-only :class:`Setup` per call, over data built once per process
    (the last data set only, for memory). Nothing a caller holds changes when another caller asks for another
    config."""
    frozen = MappingProxyType(dict(cfg))
    key = tuple(cfg[k] for k in _DATA_KEYS)
    data = _DATA_CACHE.get(key)
    if data is None:
        data = build_data(frozen)
        _DATA_CACHE.clear()  # keep one data set per process (memory)
        _DATA_CACHE[key] = data
    return Setup(frozen, Schedule.of(frozen), data)


def build_data(cfg: Mapping[str, Any]) -> RunData:
    from flower_sparsepush.learn import data, models

    ds = load_data(cfg)
    x_train, y_train, val = ds.x_train, ds.y_train, None
    if cfg["val-split"] > 0:
        keep, held = validation_split(y_train, cfg["val-split"], cfg["seed"])
        val = (x_train[held], y_train[held])
        x_train, y_train = x_train[keep], y_train[keep]
    parts = data.partition(y_train, cfg["num-nodes"], cfg["partition"], seed=cfg["seed"])
    shards = [(x_train[torch.as_tensor(p)], y_train[torch.as_tensor(p)]) for p in parts]
    model = models.build_model(
        cfg["model"], ds.num_classes, ds.in_channels, cfg["norm"], input_shape=ds.input_shape, seed=cfg["seed"]
    )
    return RunData(
        ds,
        shards,
        model,
        models.flat_params(model).float(),
        models.segment_sizes(model),
        make_graph(cfg["graph"], cfg["num-nodes"], cfg["seed"]),
        len(y_train),
        val=val,
    )


# --------------------------------------------------------------------------- batches and local SGD


def batch_indices(n_i: int, seed: int, node: int, start: int, size: int) -> torch.Tensor:
    """Positions ``start .. start+size`` of node's epoch-cycling permutation stream (stateless)."""
    if n_i == 0:
        raise ValueError(f"node {node} has no training data")
    out, pos, need = [], start, size
    while need > 0:
        e, off = divmod(pos, n_i)
        perm = torch.randperm(n_i, generator=generator(seed, node, "epoch", e))
        take = min(need, n_i - off)
        out.append(perm[off : off + take])
        pos += take
        need -= take
    return out[0] if len(out) == 1 else torch.cat(out)


def node_batch(setup: Setup, node: int, rnd: int, step: int, aug_gen: torch.Generator):
    from flower_sparsepush.learn.data import normalize, random_crop_flip

    sch = setup.schedule
    x, y = setup.shards[node]
    b = sch.batch_size
    idx = batch_indices(len(y), sch.seed, node, (rnd * sch.local_steps + step) * b, b)
    xb = x[idx]
    if setup.ds.augment == "crop_flip":
        xb = random_crop_flip(xb, aug_gen)
    return normalize(xb, setup.ds.mean, setup.ds.std), y[idx]


def load_flat(model: torch.nn.Module, vec: torch.Tensor) -> None:
    from flower_sparsepush.learn.models import load_flat_params_

    load_flat_params_(model, vec.to(torch.float32))


def local_sgd(
    setup: Setup,
    z: torch.Tensor,
    momentum: torch.Tensor | None,
    node: int,
    rnd: int,
    qgm: bool = False,
    drift: torch.Tensor | None = None,
    grad_sum: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``local-steps`` SGD steps from ``z``; returns (z_new, momentum buffer, mean loss). Same math as torch SGD.

    With ``qgm`` the buffer is the quasi-global momentum m (updated once per round by :func:`qgm_update`, from the
    post-gossip model change): every step moves by ``lr * (g + momentum * m)`` and the buffer is returned unchanged.
    ``drift`` (merge.correct_drift) is subtracted from every gradient; ``grad_sum``, when given, gains
    ``lr * (g + weight_decay * z)`` of every step in place, with the gradient before that subtraction. With
    ``offset`` (gradient-lookahead, :meth:`PushSum.lookahead_offset`) the gradients, and the loss returned, are
    taken at ``z + offset``; the steps move ``z``.
    """
    sch = setup.schedule
    lr, mu, wd = lr_at(setup.cfg, rnd), sch.momentum, sch.weight_decay
    model = setup.model
    model.train()
    aug = generator(sch.seed, node, "aug", rnd)
    z = z.detach().to(torch.float32).clone()
    buf = None if mu == 0 else (torch.zeros_like(z) if momentum is None else momentum.to(torch.float32).clone())
    losses = []
    for step in range(sch.local_steps):
        load_flat(model, z if offset is None else z + offset)
        xb, yb = node_batch(setup, node, rnd, step, aug)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])
        if grad_sum is not None:
            grad_sum.add_(g.add(z, alpha=wd), alpha=lr)
        if drift is not None:
            g = g - drift
        sgd_step_(z, g, buf, lr, mu, wd, sch.nesterov, qgm)
        losses.append(float(loss.detach()))
    return z, buf, float(np.mean(losses))


def qgm_update(setup: Setup, state: NodeState, rnd: int) -> None:
    """Quasi-global momentum (Lin et al. 2021): ``m <- mu m + (1 - mu) (z_prev - z) / (H lr')`` at a round's start.

    ``z_prev`` (``state.anchor``) is the model at the start of the previous round and ``z`` the model now, after
    that round's ``H = local-steps`` steps and gossip, so the buffer follows the change of the model that gossip
    agreed on rather than the local gradient, which is biased under label skew. The change is per step (divided by
    H: with H > 1 the undivided buffer grows by ``mu + (1 - mu) H mu > 1`` per round and diverges) and in gradient
    units with ``lr' = max(lr of that round, lr / 10)``: gossip moves the model by amounts that do not shrink with
    the learning rate, so dividing by a cosine schedule's last, near-zero rates blows the buffer up (NaN models).
    """
    cfg = setup.cfg
    mu = cfg["momentum"]
    z = state.z.to(torch.float32)
    if state.anchor is not None and rnd > 0 and mu > 0:
        scale = cfg["local-steps"] * max(lr_at(cfg, rnd - 1), 0.1 * cfg["lr"])
        change = (state.anchor - z) / scale
        m = torch.zeros_like(z) if state.momentum is None else state.momentum
        state.momentum = m.mul_(mu).add_(change, alpha=1 - mu)
    state.anchor = z.clone()


def train(setup: Setup, state: NodeState, node: int, rnd: int) -> float:
    """This round's local SGD (quasi-global momentum first when on); returns the mean loss, NaN in the final
    gossip-only phase (rounds from ``num-rounds`` on), where nothing is trained."""
    if not setup.schedule.trains(rnd):
        return float("nan")
    qgm = setup.schedule.qgm
    if qgm:
        qgm_update(setup, state, rnd)
    if setup.cfg["drift-correction"] == "gradient" and state.grad_sum is None:
        state.grad_sum = torch.zeros_like(state.x, dtype=torch.float32)
    offset = PushSum.lookahead_offset(state, setup.cfg["gradient-lookahead"])
    z_new, state.momentum, loss = local_sgd(
        setup, state.z, state.momentum, node, rnd, qgm=qgm, drift=state.drift, grad_sum=state.grad_sum, offset=offset
    )
    PushSum.local_update(state, z_new)
    return loss


def make_node(setup: Setup, node: int, state: NodeState) -> Node:
    """The :class:`~flower_sparsepush.core.node.Node` ``node`` of this run, holding ``state``."""
    return Node(node, state, lambda rnd: setup.algo(node, rnd), lambda rnd: setup.graph.out_of(rnd, node))


def node_round(setup: Setup, state: NodeState, node: int, rnd: int, inbox: list, bounced: list = ()) -> RoundOut:
    """One training round of one node (:meth:`Node.round` with :func:`train`): take back ``bounced``, absorb
    ``inbox``, train, send. Mutates ``state``. Rounds from ``num-rounds`` on belong to the final gossip-only phase:
    absorb and send, no SGD (loss is NaN). The in-process loop and the ClientApp both call this."""
    return make_node(setup, node, state).round(rnd, inbox, bounced, lambda st: train(setup, st, node, rnd))


def train_batched(setup: Setup, engine, states: list[NodeState], nodes: list[int], rnd: int) -> list[float]:
    """:func:`train` for several nodes at once on ``engine`` (batched.BatchedSGD): same batches, same arithmetic."""
    cfg = setup.cfg
    if rnd >= cfg["num-rounds"] or not nodes:
        return [float("nan")] * len(nodes)
    if cfg["qgm"]:
        for state in states:
            qgm_update(setup, state, rnd)
    augs = [generator(cfg["seed"], i, "aug", rnd) for i in nodes]
    batches = []
    for step in range(cfg["local-steps"]):
        pairs = [node_batch(setup, i, rnd, step, aug) for i, aug in zip(nodes, augs)]
        batches.append((torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
    z = torch.stack([s.z.to(torch.float32) for s in states])
    mom = None
    if cfg["momentum"] and any(s.momentum is not None for s in states):
        mom = torch.stack([torch.zeros_like(z[0]) if s.momentum is None else s.momentum for s in states])
    hp = {k: cfg[k] for k in ("momentum", "weight-decay", "nesterov", "qgm")} | {"lr": lr_at(cfg, rnd)}
    drift = None
    if any(s.drift is not None for s in states):
        drift = torch.stack([torch.zeros_like(z[0]) if s.drift is None else s.drift.to(torch.float32) for s in states])
    gsum = None
    if cfg["drift-correction"] == "gradient":
        gsum = torch.stack([torch.zeros_like(z[0]) if s.grad_sum is None else s.grad_sum for s in states])
    offsets = [PushSum.lookahead_offset(s, cfg["gradient-lookahead"]) for s in states]
    offset = None
    if any(o is not None for o in offsets):
        offset = torch.stack([torch.zeros_like(z[0]) if o is None else o for o in offsets])
    z_new, mom_new, losses = engine.local_sgd(z, mom, batches, hp, drift, gsum, offset)
    if gsum is not None:
        for k, state in enumerate(states):
            state.grad_sum = gsum[k].cpu().clone()
    z_new = z_new.cpu()
    mom_new = None if mom_new is None else mom_new.cpu()
    for k, state in enumerate(states):
        state.momentum = None if mom_new is None else mom_new[k].clone()
        PushSum.local_update(state, z_new[k])
    return losses.cpu().tolist()


def merge_due(cfg: Mapping[str, Any], done: int, rounds: int) -> bool:
    """Whether a global merge follows the round that makes ``done`` rounds of ``rounds``: after the last one
    (``final-merge``) and after every ``merge-every``-th training round (none in the final gossip-only phase)."""
    every = cfg["merge-every"]
    periodic = bool(every) and done % every == 0 and done <= cfg["num-rounds"]
    return (cfg["final-merge"] and done == rounds) or periodic


def init_state(setup: Setup) -> NodeState:
    return NodeState(x=setup.x0.clone(), y=1.0)


# --------------------------------------------------------------------------- evaluation


def eval_subset(n: int, limit: int) -> torch.Tensor:
    """Indices of the test samples a node evaluates on: all of them, or ``limit`` drawn without replacement by a
    fixed seed (the same subset in every process), in increasing order."""
    if limit <= 0 or limit >= n:
        return torch.arange(n)
    return torch.from_numpy(np.sort(np.random.default_rng(0).permutation(n)[:limit]))


def eval_data(setup: Setup, limit: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized inputs and labels of the ``test`` set or the ``val`` split (``limit`` > 0: a fixed subset)."""
    from flower_sparsepush.learn.data import normalize

    ds = setup.ds
    key = (split, limit)
    if key not in setup.eval_cache:
        x, y = (ds.x_test, ds.y_test) if split == "test" else setup.val
        idx = eval_subset(len(y), limit)
        setup.eval_cache[key] = (normalize(x[idx], ds.mean, ds.std), y[idx])
    return setup.eval_cache[key]


@torch.no_grad()
def evaluate(setup: Setup, z: torch.Tensor, limit: int = 0, split: str = "test") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of model ``z`` on the test set (or the ``val`` split), or on ``limit`` of its
    samples when > 0 (a fixed random subset, :func:`eval_subset`: test sets read from image folders are sorted by
    class)."""
    xt, yt = eval_data(setup, limit, split)
    model = setup.model
    load_flat(model, z)
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(yt), 1000):
        out = model(xt[i : i + 1000])
        loss += float(F.cross_entropy(out, yt[i : i + 1000], reduction="sum"))
        correct += int((out.argmax(1) == yt[i : i + 1000]).sum())
    return correct / len(yt), loss / len(yt)


@torch.no_grad()
def evaluate_many(setup: Setup, engine, zs: torch.Tensor, limit: int, split: str = "test") -> list[tuple[float, float]]:
    """:func:`evaluate` of every row of ``zs`` at once on ``engine`` (batched.BatchedSGD)."""
    xt, yt = eval_data(setup, limit, split)
    zs = zs.to(engine.device, torch.float32)
    correct = torch.zeros(len(zs), device=engine.device)
    loss = torch.zeros(len(zs), device=engine.device, dtype=torch.float64)
    for i in range(0, len(yt), 500):
        xb, yb = xt[i : i + 500].to(engine.device), yt[i : i + 500].to(engine.device)
        out = engine.logits(zs, xb)
        correct += (out.argmax(2) == yb).sum(1)
        per_sample = F.cross_entropy(out.flatten(0, 1), yb.repeat(len(zs)), reduction="none")  # one call, no syncs
        loss += per_sample.view(len(zs), -1).sum(1).double()
    return [(float(c) / len(yt), float(lo) / len(yt)) for c, lo in zip(correct.cpu(), loss.cpu())]


def consensus_metrics(setup: Setup, zs: list[torch.Tensor], node_limit: int, engine=None) -> dict[str, float]:
    """Consensus-model accuracy/loss (whole test set), per-node accuracy mean/min, and mean_i ||z_i - z_bar||^2.

    With a validation split the same numbers on it are added as ``val_acc_consensus``, ``val_acc_node_mean`` and
    ``val_acc_node_min`` (the nodes on ``node_limit`` samples of it). With ``engine`` every model is evaluated in one batch."""
    zbar = torch.stack([z.to(torch.float64) for z in zs]).mean(0)
    dist = float(np.mean([float(((z.to(torch.float64) - zbar) ** 2).sum()) for z in zs]))
    splits = [("", "test", node_limit)] + ([("val_", "val", node_limit)] if setup.val is not None else [])
    out = {"consensus_distance": dist}
    for prefix, split, limit in splits:
        if engine is not None:
            acc_c, loss_c = evaluate_many(setup, engine, zbar[None], 0, split)[0]
            node_acc = [a for a, _ in evaluate_many(setup, engine, torch.stack(zs), limit, split)]
        else:
            acc_c, loss_c = evaluate(setup, zbar, 0, split)
            node_acc = [evaluate(setup, z, limit, split)[0] for z in zs]
        out |= {
            f"{prefix}acc_consensus": acc_c,
            f"{prefix}loss": loss_c,
            f"{prefix}acc_node_mean": float(np.mean(node_acc)),
            f"{prefix}acc_node_min": float(np.min(node_acc)),
        }
    return out


# --------------------------------------------------------------------------- in-process loop


def network_of(cfg: dict[str, Any]) -> Network:
    """The link/node failure model of a run (router.Network); seeded by the run seed, as in the Flower path."""
    return Network(
        drop=cfg["drop"], link_down=cfg["link-down"], down_span=cfg["down-span"], churn=cfg["churn"], seed=cfg["seed"]
    )


def make_router(cfg: dict[str, Any]) -> Router:
    return Router(cfg["num-nodes"], network_of(cfg), bounce=cfg["bounce"])


def relay_checks(setup: Setup) -> dict[str, Any]:
    """What the relay checks every reply against (guard.Guard): the graph, the model size and form, the longest
    message the compressor of each round makes, and the repeat-offender policy (``exclude-after``)."""
    dim = int(setup.x0.numel())
    return {
        "graph": setup.graph,
        "dim": dim,
        "form": setup.cfg["form"],
        "max_message_bytes": lambda rnd: message_size_limit(setup.algo(0, rnd).compressor, dim, setup.x0.dtype),
        "exclude_after": setup.cfg["exclude-after"],
    }


def relay(guard: Guard, node: int, rnd: int, messages: dict[int, bytes]) -> int:
    """Check ``node``'s messages of round ``rnd`` as the ServerApp does and post them to the router; a refused
    outbox is recorded and nothing of it is routed. Returns the bits routed."""
    try:
        guard.check(node, rnd, Outbox(rnd, list(messages.items())), 0)
    except BadReply as err:
        guard.reject(rnd + 1, node, err.kind, str(err))
        return 0
    guard.router.post(node, rnd, messages)
    return sum(8 * len(d) for d in messages.values())


@dataclass
class InProcessResult:
    states: list[NodeState]
    mailboxes: list[list[bytes]]
    bits_sent: list[int]
    bits_received: list[int]
    history: list[dict[str, float]]
    round_seconds: list[float]
    router: Router | None = None
    start_round: int = 0  # > 0 when the run was resumed from a checkpoint
    guard: Guard | None = None  # the relay's checks: refused outboxes, excluded nodes


# checkpoint.pt: torch.save of plain types (tensors, numbers, bytes, lists, dicts); loads with weights_only=True
# 2: node states in the flat form of node.state_to_flat; 3: on Flower, the nodes' copies are safetensors files of the
# node store (store.py), where version 2 left torch.save files that this code does not read
CHECKPOINT_VERSION = 3
_NOT_IDENTITY = (
    "resume",
    "checkpoint-every",
    "out-dir",
    "round-timeout",
    "eval-every",
    "eval-node-samples",
    "save-nodes",
)


def checkpoint_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config keys a checkpoint must agree on to be resumed (not the output or evaluation settings)."""
    return {k: v for k, v in cfg.items() if k not in _NOT_IDENTITY}


def checkpoint_path(cfg: dict[str, Any]):
    from flower_sparsepush.run.results import run_dir

    return run_dir(cfg) / "checkpoint.pt"


def write_checkpoint(cfg: dict[str, Any], engine: str, rnd: int, body: dict[str, Any]) -> None:
    """``<out-dir>/<run-name>/checkpoint.pt`` after round ``rnd`` of ``engine`` (``inprocess`` or ``flower``):
    ``body`` plus the version, engine, round and the config it belongs to. Written to a temporary file and renamed,
    so an interrupted write leaves the previous checkpoint intact."""
    import os

    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    ck = {"version": CHECKPOINT_VERSION, "engine": engine, "round": rnd, "config": checkpoint_identity(cfg)} | body
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)


def read_checkpoint(cfg: dict[str, Any], engine: str) -> dict[str, Any] | None:
    """The run's checkpoint written by ``engine``, or None if there is none; refuses (ConfigError) one of another
    engine, version or run."""
    from flower_sparsepush.run.config import ConfigError

    path = checkpoint_path(cfg)
    if not path.exists():
        return None
    ck = torch.load(path, weights_only=True)
    if ck.get("engine", "inprocess") != engine:
        raise ConfigError(
            f"{path} was written by the {ck.get('engine')} engine; resume it there or use another run-name"
        )
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{path}: checkpoint version {ck.get('version')!r}, this code reads {CHECKPOINT_VERSION}; start the run "
            f"again without resume (or use another run-name), or resume it with the version that wrote it"
        )
    mine = checkpoint_identity(cfg)
    diff = sorted(k for k in set(mine) | set(ck["config"]) if mine.get(k) != ck["config"].get(k))
    if diff:
        k = diff[0]
        raise ConfigError(
            f"run-config resume: {path} belongs to another run ({k}={ck['config'].get(k)!r} there, "
            f"{mine.get(k)!r} now); use another run-name or the same settings"
        )
    return ck


def save_checkpoint(
    cfg: dict[str, Any],
    rnd: int,
    states: list[NodeState],
    router: Router,
    sent: list[int],
    history: list[dict[str, float]],
    merge_base: torch.Tensor | None = None,
    owner_err: torch.Tensor | None = None,
) -> None:
    """Everything the in-process loop needs to continue after round ``rnd`` (RNGs are pure functions of (seed,
    node, round)); ``merge_base`` is the last merge's model (None before the first merge), ``owner_err`` the chunk
    owners' merge error feedback (merge-feedback)."""
    body = {
        "states": [state_to_flat(s) for s in states],
        "router": router.state_dict(),
        "bits_sent": list(sent),
        "history": [dict(h) for h in history],
    }
    if merge_base is not None:
        body["merge_base"] = merge_base
    if owner_err is not None:
        body["merge_owner_err"] = owner_err
    write_checkpoint(cfg, "inprocess", rnd, body)


def load_checkpoint(
    cfg: dict[str, Any], router: Router
) -> tuple[int, list[NodeState], list[int], list[dict], torch.Tensor | None, torch.Tensor | None] | None:
    """(round, states, bits sent, history, merge base or None, owners' merge error or None) from the run's
    checkpoint, restoring ``router``; None if there is none."""
    ck = read_checkpoint(cfg, "inprocess")
    if ck is None:
        return None
    router.load_state_dict(ck["router"])
    states = [state_from_flat(d) for d in ck["states"]]
    hist = [dict(h) for h in ck["history"]]
    return (
        int(ck["round"]),
        states,
        [int(b) for b in ck["bits_sent"]],
        hist,
        ck.get("merge_base"),
        ck.get("merge_owner_err"),
    )


def make_engine(setup: Setup):
    """The batched local-SGD engine for ``device`` (batched.BatchedSGD), or None to train node by node: on the CPU
    the per-node path is faster (vmap turns the convolutions into slow grouped ones there)."""
    if setup.cfg["device"] == "cpu":
        return None
    from flower_sparsepush.learn.batched import BatchedSGD, resolve_device

    dev = resolve_device(setup.cfg["device"])
    return BatchedSGD(setup.model, dev) if dev.type != "cpu" else None


def run_inprocess(
    cfg: dict[str, Any], num_rounds: int | None = None, eval_every: int | None = None, log=None
) -> InProcessResult:
    """The reference loop: the same :func:`node_round` for all nodes of a validated config, in this process.

    Each round, in the order of consensus.py: the online nodes (``churn``) collect their mailbox and bounced
    messages from the router, take the bounced mass back, absorb the inbox, train and send; the router decides which
    messages arrive (``drop``, ``link-down``; router.py). Offline nodes do nothing; their mail waits.
    With ``checkpoint-every`` N > 0 the loop writes ``<out-dir>/<run-name>/checkpoint.pt`` every N rounds; with
    ``resume`` it continues from that file (restored metrics rows are passed to ``log`` again).
    """
    if cfg["strategy"] == "fedavg":
        return run_fedavg_inprocess(cfg, num_rounds, eval_every, log)
    setup = get_setup(cfg)
    n = setup.n
    rounds = cfg["num-rounds"] + cfg["final-gossip-rounds"] if num_rounds is None else num_rounds
    router = make_router(cfg)
    guard = Guard(router, **relay_checks(setup))  # what the ServerApp checks, so a bad outbox is refused here too
    states = [init_state(setup) for _ in range(n)]
    sent = [0] * n
    history: list[dict[str, float]] = []
    secs: list[float] = []
    start = 0
    merged_base = None  # the last merge's model, shared by all nodes (None: they share only the initial model)
    # what the chunk owners' averaged merge messages rounded away (merge-feedback; each owner holds its chunk)
    owner_err = torch.zeros(setup.x0.numel(), dtype=torch.float64) if cfg["merge-feedback"] else None
    if cfg["resume"]:
        restored = load_checkpoint(cfg, router)
        if restored is not None:
            start, states, sent, history, merged_base, saved_err = restored
            owner_err = saved_err if saved_err is not None else owner_err
            for row in history:
                if log:
                    log(dict(row))
    every = cfg["checkpoint-every"]
    engine = make_engine(setup)
    merging = cfg["final-merge"] or cfg["merge-every"]
    one_merge_bits = merge_bits(setup.x0.numel(), cfg["merge-bits"], setup.segments) if merging else 0
    for t in range(start, rounds):
        t0 = time.perf_counter()
        online = [i for i in range(n) if router.network.online(t, i) and i not in router.excluded]
        boxes = {i: router.collect(i) for i in online}  # bits_received counted on delivery, as in the Flower path
        if engine is None:
            for i in online:
                inbox, bounced = boxes[i]
                res = node_round(setup, states[i], i, t, inbox, bounced)
                if res.rejected:
                    raise RuntimeError(f"node {i} rejected a message in round {t}: {res.rejected[0]}")
                sent[i] += relay(guard, i, t, res.messages)
        else:  # the same round, local SGD of all online nodes in one batched call
            nodes = {i: make_node(setup, i, states[i]) for i in online}
            for i in online:
                rejected = nodes[i].begin(t, *boxes[i])
                if rejected:
                    raise RuntimeError(f"node {i} rejected a message in round {t}: {rejected[0]}")
            train_batched(setup, engine, [states[i] for i in online], online, t)
            for i in online:
                sent[i] += relay(guard, i, t, nodes[i].finish(t))
        if merge_due(cfg, t + 1, rounds):
            for i in range(n):  # deliver what is in flight, then the average everywhere
                make_node(setup, i, states[i]).begin(t + 1, *router.collect(i))
            base = setup.x0 if merged_base is None else merged_base
            mode = cfg["drift-correction"]
            if mode != "off" and ((t + 1) % cfg["merge-every"] or t + 1 >= cfg["num-rounds"]):
                mode = "off"  # only the periodic merges during training measure a drift
            before = [s.z.clone() for s in states] if mode == "displacement" else []
            merged_base = merge(states, base, cfg["merge-bits"], setup.segments, cfg["form"], owner_err)
            if mode != "off":  # the M rounds since the last merge, H steps each
                lr_steps = cfg["local-steps"] * sum(lr_at(cfg, r) for r in range(t + 1 - cfg["merge-every"], t + 1))
                if mode == "gradient":
                    correct_bias(states, base, merged_base, lr_steps, cfg["momentum"])
                else:
                    correct_drift(states, before, merged_base, lr_steps, cfg["momentum"])
            for i in range(n):
                sent[i] += one_merge_bits
                router.delivered_bits[i] += one_merge_bits
        secs.append(time.perf_counter() - t0)
        if eval_every and ((t + 1) % eval_every == 0 or t + 1 == rounds):
            m = consensus_metrics(setup, [s.z for s in states], cfg["eval-node-samples"], engine)
            m.update(
                round=t + 1,
                epoch=round(setup.epoch(min(t + 1, cfg["num-rounds"])), 4),
                bits_sent_per_node=float(np.mean(sent)),
                bits_received_per_node=float(np.mean(router.delivered_bits)),
                messages_dropped=router.dropped,
                nodes_online=len(online),
                y_nodes=float(sum(s.y for s in states)),
                y_in_transit=router.in_transit_mass(),
            )
            history.append(m)
            if log:
                log(m)
        if every and (t + 1) % every == 0:
            save_checkpoint(cfg, t + 1, states, router, sent, history, merged_base, owner_err)
    return InProcessResult(
        states,
        [[d for _, _, d in box] for box in router.mailboxes],
        sent,
        list(router.delivered_bits),
        history,
        secs,
        router,
        start,
        guard,
    )


def train_inprocess(raw_cfg: dict[str, Any], echo=print) -> dict[str, Any]:
    """Validate, check, run the in-process loop and write the run's results folder (as the ServerApp does)."""
    from flower_sparsepush.run.config import preflight, validate
    from flower_sparsepush.run.results import Recorder

    cfg = validate(raw_cfg)
    preflight(cfg)
    rec = Recorder(cfg, echo=echo)
    res = run_inprocess(cfg, eval_every=cfg["eval-every"], log=rec.log)
    y_transit = res.router.in_transit_mass() if res.router is not None else 0.0
    return rec.finish(
        {
            "engine": "inprocess",
            "resumed_from_round": res.start_round,
            "bits_sent_per_node": float(np.mean(res.bits_sent)),
            "bits_received_per_node": float(np.mean(res.bits_received)),
            "bits_sent_by_node": list(map(int, res.bits_sent)),
            "bits_received_by_node": list(map(int, res.bits_received)),
            "num_params": int(res.states[0].x.numel()),
            "mass": {"y_nodes": float(sum(s.y for s in res.states)), "y_in_transit": y_transit, "n": cfg["num-nodes"]},
            "messages_dropped": res.router.dropped if res.router is not None else 0,
        }
    )


def run_fedavg_inprocess(
    cfg: dict[str, Any], num_rounds: int | None = None, eval_every: int | None = None, log=None
) -> InProcessResult:
    """FedAvg on the same local training code: every round all nodes start from the global model, take
    ``local-steps`` steps (keeping their own momentum buffers, as the ClientApp does) and the server averages the
    results weighted by shard size. Bits: the dense float32 model each way per node per round, as CountingFedAvg."""
    setup = get_setup(cfg)
    n = setup.n
    rounds = cfg["num-rounds"] if num_rounds is None else num_rounds
    sizes = torch.tensor([len(y) for _, y in setup.shards], dtype=torch.float64)
    weights = (sizes / sizes.sum()).tolist()
    w = setup.x0.clone()
    moms: list[torch.Tensor | None] = [None] * n
    dense_bits = 32 * w.numel()
    sent, recv = [0] * n, [0] * n
    history, secs = [], []
    for t in range(rounds):
        t0 = time.perf_counter()
        acc = torch.zeros_like(w, dtype=torch.float64)
        for i in range(n):
            z_new, moms[i], _ = local_sgd(setup, w, moms[i], i, t)
            acc.add_(z_new.to(torch.float64), alpha=weights[i])
            sent[i] += dense_bits
            recv[i] += dense_bits
        w = acc.to(torch.float32)
        secs.append(time.perf_counter() - t0)
        if eval_every and ((t + 1) % eval_every == 0 or t + 1 == rounds):
            m = consensus_metrics(setup, [w], 0)  # one global model: node mean = min = consensus
            m.update(round=t + 1, bits_sent_per_node=float(np.mean(sent)))
            history.append(m)
            if log:
                log(m)
    states = [NodeState(x=w.clone(), y=1.0) for _ in range(n)]
    return InProcessResult(states, [[] for _ in range(n)], sent, recv, history, secs)


def main(argv: list[str] | None = None) -> int:
    """``python -m flower_sparsepush.run.training key=value ...``: one in-process run with results, checkpoints, resume."""
    import sys

    from flower_sparsepush.run.config import ConfigError

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in args):
        from flower_sparsepush.run.keyhelp import keys_text

        print(
            "usage: python -m flower_sparsepush.run.training [key=value ...] [--resume]\n\n"
            "One run of the in-process loop (the reference the Flower path is tested against). Results, checkpoints\n"
            "and status.json (rounds done, elapsed, ETA) go to <out-dir>/<run-name>/. Keys not given keep the\n"
            "default shown; bad keys or values stop the run with one line (docs/config.md).\n\n"
            f"run-config keys (key=default  meaning):\n{keys_text()}"
        )
        return 0
    raw = {}
    for a in args:
        k, eq, v = a.lstrip("-").partition("=")
        if not eq:
            if k == "resume":  # --resume alone
                raw["resume"] = True
                continue
            print(f"error: expected key=value, got {a!r} (see --help for the keys)", file=sys.stderr)
            return 2
        raw[k] = v
    try:
        summary = train_inprocess(raw)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {summary['run_name']}  final acc {summary['final'].get('acc_consensus')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
