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

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flower_sparsepush.compression import make_compressor
from flower_sparsepush.config import parse_lr_schedule
from flower_sparsepush.pushsum import NodeState, PushSum
from flower_sparsepush.topology import make_graph

_TAGS = {"batch": 1, "epoch": 2, "aug": 3, "compress": 4}


def seed_for(seed: int, node: int, tag: str, k: int) -> int:
    """A 63-bit seed that depends only on (seed, node, tag, k)."""
    return int(np.random.SeedSequence([seed, node, _TAGS[tag], k]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


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


# --------------------------------------------------------------------------- setup (data, model, graph)


@dataclass
class Setup:
    """What every node of a run shares: data, partition, model architecture, initial model, graph."""

    cfg: dict[str, Any]
    ds: Any
    shards: list[tuple[torch.Tensor, torch.Tensor]]
    model: torch.nn.Module
    x0: torch.Tensor
    segments: list[int]
    graph: Any
    train_size: int
    eval_cache: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.cfg["num-nodes"]

    def algo(self, node: int, rnd: int) -> PushSum:
        """The push-sum rule for one node and round (random-k draws from a (seed, node, round) generator)."""
        cfg = self.cfg
        comp = make_compressor(cfg["compressor"], segments=self.segments, seed=seed_for(cfg["seed"], node, "compress", rnd))
        return PushSum(comp, gamma=cfg["gamma"], form=cfg["form"], ref_init=self.x0)

    def epoch(self, rnd: int) -> float:
        """Epochs of the whole training set seen after ``rnd`` rounds (all nodes together)."""
        return rnd * self.cfg["local-steps"] * self.cfg["batch-size"] * self.n / self.train_size


_SETUP_CACHE: dict[tuple, Setup] = {}
_SETUP_KEYS = ("dataset", "data-dir", "partition", "num-nodes", "seed", "model", "norm", "graph", "compressor",
               "gamma", "form")


def load_data(cfg: dict[str, Any]):
    from flower_sparsepush import data

    if cfg["dataset"] == "synthetic":
        return data.make_synthetic(num_train=2000, num_test=500, num_classes=10, shape=(32,), seed=cfg["seed"])
    return data.load_dataset(cfg["dataset"], path=cfg["data-dir"] or None)


def get_setup(cfg: dict[str, Any]) -> Setup:
    """Build (or reuse, per process) the shared setup of a validated config."""
    key = tuple(cfg[k] for k in _SETUP_KEYS)
    hit = _SETUP_CACHE.get(key)
    if hit is not None:
        hit.cfg = cfg
        return hit
    from flower_sparsepush import data, models

    ds = load_data(cfg)
    parts = data.partition(ds.y_train, cfg["num-nodes"], cfg["partition"], seed=cfg["seed"])
    shards = [(ds.x_train[torch.as_tensor(p)], ds.y_train[torch.as_tensor(p)]) for p in parts]
    model = models.build_model(cfg["model"], ds.num_classes, ds.in_channels, cfg["norm"],
                               input_shape=ds.input_shape, seed=cfg["seed"])
    x0 = models.flat_params(model).float()
    setup = Setup(cfg, ds, shards, model, x0, models.segment_sizes(model),
                  make_graph(cfg["graph"], cfg["num-nodes"], cfg["seed"]), len(ds.y_train))
    _SETUP_CACHE.clear()  # keep one setup per process (memory)
    _SETUP_CACHE[key] = setup
    return setup


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
    from flower_sparsepush.data import normalize, random_crop_flip

    cfg = setup.cfg
    x, y = setup.shards[node]
    b = cfg["batch-size"]
    idx = batch_indices(len(y), cfg["seed"], node, (rnd * cfg["local-steps"] + step) * b, b)
    xb = x[idx]
    if setup.ds.augment == "crop_flip":
        xb = random_crop_flip(xb, aug_gen)
    return normalize(xb, setup.ds.mean, setup.ds.std), y[idx]


def load_flat(model: torch.nn.Module, vec: torch.Tensor) -> None:
    from flower_sparsepush.models import load_flat_params_

    load_flat_params_(model, vec.to(torch.float32))


def local_sgd(setup: Setup, z: torch.Tensor, momentum: torch.Tensor | None, node: int, rnd: int, qgm: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``local-steps`` SGD steps from ``z``; returns (z_new, momentum buffer, mean loss). Same math as torch SGD.

    With ``qgm`` the buffer is the quasi-global momentum m (updated once per round by :func:`qgm_update`, from the
    post-gossip model change): every step moves by ``lr * (g + momentum * m)`` and the buffer is returned unchanged.
    """
    cfg = setup.cfg
    lr, mu, wd = lr_at(cfg, rnd), cfg["momentum"], cfg["weight-decay"]
    model = setup.model
    model.train()
    aug = generator(cfg["seed"], node, "aug", rnd)
    z = z.detach().to(torch.float32).clone()
    buf = None if mu == 0 else (torch.zeros_like(z) if momentum is None else momentum.to(torch.float32).clone())
    losses = []
    for step in range(cfg["local-steps"]):
        load_flat(model, z)
        xb, yb = node_batch(setup, node, rnd, step, aug)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])
        if wd:
            g = g.add(z, alpha=wd)
        if buf is not None and qgm:
            d = g.add(buf, alpha=mu)
        elif buf is not None:
            buf.mul_(mu).add_(g)
            d = g.add(buf, alpha=mu) if cfg["nesterov"] else buf
        else:
            d = g
        z.sub_(d, alpha=lr)
        losses.append(float(loss.detach()))
    return z, buf, float(np.mean(losses))


def qgm_update(setup: Setup, state: NodeState, rnd: int) -> None:
    """Quasi-global momentum (Lin et al. 2021): ``m <- mu m + (1 - mu) (z_prev - z) / lr`` at the start of a round.

    ``z_prev`` (``state.anchor``) is the model at the start of the previous round and ``z`` the model now, after
    that round's local steps and gossip, so the buffer follows the change of the model that gossip agreed on
    rather than the local gradient, which is biased under label skew.
    """
    mu = setup.cfg["momentum"]
    z = state.z.to(torch.float32)
    if state.anchor is not None and rnd > 0 and mu > 0:
        change = (state.anchor - z) / lr_at(setup.cfg, rnd - 1)
        m = torch.zeros_like(z) if state.momentum is None else state.momentum
        state.momentum = m.mul_(mu).add_(change, alpha=1 - mu)
    state.anchor = z.clone()


@dataclass
class RoundOut:
    messages: dict[int, bytes]
    loss: float
    rejected: list[str]


def node_round(setup: Setup, state: NodeState, node: int, rnd: int, inbox: list[bytes]) -> RoundOut:
    """One gossip round of one node: absorb ``inbox`` (sender order), local SGD, send. Mutates ``state``.

    Rounds from ``num-rounds`` on belong to the final gossip-only phase: absorb and send, no SGD (loss is NaN).
    """
    algo = setup.algo(node, rnd)
    rejected = algo.receive(state, inbox)
    loss = float("nan")
    if rnd < setup.cfg["num-rounds"]:  # after that: the final gossip-only phase (no SGD)
        qgm = setup.cfg["qgm"]
        if qgm:
            qgm_update(setup, state, rnd)
        z_new, state.momentum, loss = local_sgd(setup, state.z, state.momentum, node, rnd, qgm=qgm)
        PushSum.local_update(state, z_new)
    outs = setup.graph.out_neighbours(rnd)[node]
    msgs = algo.send(state, node, outs, rnd)
    return RoundOut(msgs, loss, rejected)


def init_state(setup: Setup) -> NodeState:
    return NodeState(x=setup.x0.clone(), y=1.0)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(setup: Setup, z: torch.Tensor, limit: int = 0) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of model ``z`` on the test set (its first ``limit`` samples when > 0)."""
    from flower_sparsepush.data import normalize

    ds = setup.ds
    key = limit
    if key not in setup.eval_cache:
        n = len(ds.y_test) if limit <= 0 else min(limit, len(ds.y_test))
        setup.eval_cache[key] = (normalize(ds.x_test[:n], ds.mean, ds.std), ds.y_test[:n])
    xt, yt = setup.eval_cache[key]
    model = setup.model
    load_flat(model, z)
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(yt), 1000):
        out = model(xt[i : i + 1000])
        loss += float(F.cross_entropy(out, yt[i : i + 1000], reduction="sum"))
        correct += int((out.argmax(1) == yt[i : i + 1000]).sum())
    return correct / len(yt), loss / len(yt)


def consensus_metrics(setup: Setup, zs: list[torch.Tensor], node_limit: int) -> dict[str, float]:
    """Consensus-model accuracy/loss (whole test set), per-node accuracy mean/min, and mean_i ||z_i - z_bar||^2."""
    zbar = torch.stack([z.to(torch.float64) for z in zs]).mean(0)
    dist = float(np.mean([float(((z.to(torch.float64) - zbar) ** 2).sum()) for z in zs]))
    acc_c, loss_c = evaluate(setup, zbar, 0)
    node_acc = [evaluate(setup, z, node_limit)[0] for z in zs]
    return {"acc_consensus": acc_c, "loss": loss_c, "acc_node_mean": float(np.mean(node_acc)),
            "acc_node_min": float(np.min(node_acc)), "consensus_distance": dist}


# --------------------------------------------------------------------------- in-process loop


@dataclass
class InProcessResult:
    states: list[NodeState]
    mailboxes: list[list[bytes]]
    bits_sent: list[int]
    bits_received: list[int]
    history: list[dict[str, float]]
    round_seconds: list[float]


def run_inprocess(cfg: dict[str, Any], num_rounds: int | None = None, eval_every: int | None = None,
                  log=None) -> InProcessResult:
    """The reference loop: the same :func:`node_round` for all nodes of a validated config, in this process."""
    if cfg["strategy"] == "fedavg":
        return run_fedavg_inprocess(cfg, num_rounds, eval_every, log)
    setup = get_setup(cfg)
    n = setup.n
    rounds = cfg["num-rounds"] + cfg["final-gossip-rounds"] if num_rounds is None else num_rounds
    states = [init_state(setup) for _ in range(n)]
    inbox: list[list[bytes]] = [[] for _ in range(n)]
    sent, recv = [0] * n, [0] * n
    history, secs = [], []
    for t in range(rounds):
        t0 = time.perf_counter()
        nxt: list[list[bytes]] = [[] for _ in range(n)]
        for i in range(n):
            recv[i] += sum(8 * len(d) for d in inbox[i])  # counted on delivery, as the Flower router does
            res = node_round(setup, states[i], i, t, inbox[i])
            if res.rejected:
                raise RuntimeError(f"node {i} rejected a message in round {t}: {res.rejected[0]}")
            for j, data in sorted(res.messages.items()):
                nxt[j].append(data)
                sent[i] += 8 * len(data)
        inbox = nxt
        secs.append(time.perf_counter() - t0)
        if eval_every and ((t + 1) % eval_every == 0 or t + 1 == rounds):
            m = consensus_metrics(setup, [s.z for s in states], cfg["eval-node-samples"])
            m.update(round=t + 1, bits_sent_per_node=float(np.mean(sent)))
            history.append(m)
            if log:
                log(m)
    return InProcessResult(states, inbox, sent, recv, history, secs)


def run_fedavg_inprocess(cfg: dict[str, Any], num_rounds: int | None = None, eval_every: int | None = None,
                         log=None) -> InProcessResult:
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
            a, loss = evaluate(setup, w, 0)
            m = {"acc_consensus": a, "loss": loss, "acc_node_mean": a, "acc_node_min": a, "consensus_distance": 0.0,
                 "round": t + 1, "bits_sent_per_node": float(np.mean(sent))}
            history.append(m)
            if log:
                log(m)
    states = [NodeState(x=w.clone(), y=1.0) for _ in range(n)]
    return InProcessResult(states, [[] for _ in range(n)], sent, recv, history, secs)
