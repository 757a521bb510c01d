"""One node's training in a round, the same code on every path: its batches, local SGD (with quasi-global
momentum, drift correction, update tracking and gradient-lookahead), the node round around it (:func:`node_round`,
called by the ClientApp and the in-process loop alike), and the batched form that trains many nodes at once on a GPU.

Everything random is a pure function of ``(seed, node, round)`` or ``(seed, node, epoch)``:

- batches: node i's shard is visited in epochs; epoch e is a permutation drawn from a generator seeded by
  ``(seed, node, "epoch", e)``; the k-th local step of round t takes the next ``batch-size`` positions after
  ``(t * local_steps + k) * batch_size`` samples. No sampler state is kept between rounds, so a ClientApp that
  runs in any Ray actor draws exactly the batches the in-process loop draws;
- augmentation (CIFAR-10 crop/flip) and random-k compression: generators seeded by ``(seed, node, round)``.

Round t (0-based) of node i: absorb the messages sent to it in round t-1 (ordered by sender id), run ``local_steps``
SGD steps from the de-biased model z, set ``x = y * z_new`` (``PushSum.local_update``), then send to
``graph.out_neighbours(t)[i]``. Messages sent in the last round stay undelivered (they are in the mailboxes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from flower_sparsepush.core.node import Node, RoundOut
from flower_sparsepush.core.pushsum import NodeState, PushSum
from flower_sparsepush.core.tracking import corrected, observe
from flower_sparsepush.learn.evaluate import load_flat
from flower_sparsepush.learn.seeds import generator
from flower_sparsepush.learn.sgd import SGDParams, sgd_steps
from flower_sparsepush.learn.transforms import normalize, random_crop_flip
from flower_sparsepush.run.schedule import lr_at
from flower_sparsepush.run.setup import Setup

NODE_THREADS_ENV = "SPARSEPUSH_CLIENT_THREADS"


def node_threads() -> int:
    """The torch threads a Flower node trains with (``$SPARSEPUSH_CLIENT_THREADS``, default 1: one per Ray actor)."""
    return max(1, int(os.environ.get(NODE_THREADS_ENV, "1")))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads. The thread count decides how kernels split their sums, so a run
    reproduces another bit for bit only with the same count: the in-process loop meets a Flower run exactly under
    ``torch_threads(node_threads())`` (results/flower_headline.json)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    sch = setup.schedule
    x, y = setup.shards[node]
    b = sch.batch_size
    idx = batch_indices(len(y), sch.seed, node, (rnd * sch.local_steps + step) * b, b)
    xb = x[idx]
    if setup.ds.augment == "crop_flip":
        xb = random_crop_flip(xb, aug_gen)
    return normalize(xb, setup.ds.mean, setup.ds.std), y[idx]


def sgd_params(setup: Setup, rnd: int, qgm: bool = False) -> SGDParams:
    """The SGD rule of round ``rnd`` (the learning rate of the run's schedule)."""
    sch = setup.schedule
    return SGDParams(lr_at(setup.cfg, rnd), sch.momentum, sch.weight_decay, sch.nesterov, qgm)


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
    """``local-steps`` SGD steps of one node from ``z`` (:func:`learn.sgd.sgd_steps`); returns (z_new, momentum
    buffer, mean loss). Same math as torch SGD.

    With ``qgm`` the buffer is the quasi-global momentum m (updated once per round by :func:`qgm_update`, from the
    post-gossip model change): every step moves by ``lr * (g + momentum * m)`` and the buffer is returned unchanged.
    ``drift``, ``grad_sum`` and ``offset`` (gradient-lookahead, :meth:`PushSum.lookahead_offset`) are those of
    :func:`~flower_sparsepush.learn.sgd.sgd_steps`; the loss returned is taken where the gradients are.
    """
    hp = sgd_params(setup, rnd, qgm)
    model = setup.model
    model.train()
    aug = generator(setup.schedule.seed, node, "aug", rnd)
    z = z.detach().to(torch.float32).clone()
    buf = None
    if hp.momentum:
        buf = torch.zeros_like(z) if momentum is None else momentum.to(torch.float32).clone()

    def gradient(point: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        return node_gradient(setup, point, node, rnd, step, aug)

    losses = sgd_steps(z, buf, setup.schedule.local_steps, gradient, hp, drift, grad_sum, offset)
    return z, buf, float(np.mean(losses))


def label_shift(setup: Setup, node: int) -> torch.Tensor | None:
    """Run-config ``logit-adjust`` tau: ``tau * log(p_i)``, added to ``node``'s logits in its training loss, with
    ``p_i`` its own label frequencies (add-one smoothed, so a class it has no example of is shifted by a large
    finite amount, not -inf). None when off. Under label skew the plain loss pushes down the logits of the classes a
    node lacks at every step; with the shift the softmax already expects its own prior, and the model learns
    scores a uniform prior reads correctly (Menon et al. 2021; FedLC, Zhang et al. 2022). No bits: a node reads only
    its own labels."""
    tau = setup.cfg.logit_adjust
    if not tau:
        return None
    return tau * setup.data.log_label_freq[node]  # the frequencies are computed once per run's data


def node_gradient(
    setup: Setup, point: torch.Tensor, node: int, rnd: int, step: int, aug: torch.Generator
) -> tuple[torch.Tensor, float]:
    """The flat gradient and loss of ``node``'s batch ``step`` of round ``rnd`` (:func:`node_batch`) at ``point``
    (the logits shifted by :func:`label_shift` when ``logit-adjust`` is on)."""
    model = setup.model
    load_flat(model, point)
    xb, yb = node_batch(setup, node, rnd, step, aug)
    model.zero_grad(set_to_none=True)
    logits = model(xb)
    shift = label_shift(setup, node)
    loss = F.cross_entropy(logits if shift is None else logits + shift.to(logits.dtype), yb)
    loss.backward()
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()]
    return torch.cat(grads), float(loss.detach())


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
    mu = cfg.momentum
    z = state.z.to(torch.float32)
    if state.anchor is not None and rnd > 0 and mu > 0:
        scale = cfg.local_steps * max(lr_at(cfg, rnd - 1), 0.1 * cfg.lr)
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
    if setup.cfg.drift_correction == "gradient" and state.grad_sum is None:
        state.grad_sum = torch.zeros_like(state.x, dtype=torch.float32)
    mu = setup.cfg.update_tracking
    observe(state, mu)
    offset = PushSum.lookahead_offset(state, setup.cfg.gradient_lookahead)
    z_before = state.z
    z_new, state.momentum, loss = local_sgd(
        setup, z_before, state.momentum, node, rnd, qgm=qgm, drift=state.drift, grad_sum=state.grad_sum, offset=offset
    )
    PushSum.local_update(state, corrected(state, mu, z_before, z_new), setup.cfg.value_bound)
    return loss


def make_node(setup: Setup, node: int, state: NodeState) -> Node:
    """The :class:`~flower_sparsepush.core.node.Node` ``node`` of this run, holding ``state``."""
    return Node(node, state, lambda rnd: setup.rule(node, rnd), lambda rnd: setup.graph.out_of(rnd, node))


def node_round(setup: Setup, state: NodeState, node: int, rnd: int, inbox: list, bounced: list = ()) -> RoundOut:
    """One training round of one node (:meth:`Node.round` with :func:`train`): take back ``bounced``, absorb
    ``inbox``, train, send. Mutates ``state``. Rounds from ``num-rounds`` on belong to the final gossip-only phase:
    absorb and send, no SGD (loss is NaN). The in-process loop and the ClientApp both call this."""
    return make_node(setup, node, state).round(rnd, inbox, bounced, lambda st: train(setup, st, node, rnd))


def train_batched(setup: Setup, engine, states: list[NodeState], nodes: list[int], rnd: int) -> list[float]:
    """:func:`train` for several nodes at once on ``engine`` (batched.BatchedSGD): same batches, same arithmetic."""
    cfg = setup.cfg
    if rnd >= cfg.num_rounds or not nodes:
        return [float("nan")] * len(nodes)
    if cfg.qgm:
        for state in states:
            qgm_update(setup, state, rnd)
    for state in states:
        observe(state, cfg.update_tracking)
    augs = [generator(cfg.seed, i, "aug", rnd) for i in nodes]
    batches = []
    for step in range(cfg.local_steps):
        pairs = [node_batch(setup, i, rnd, step, aug) for i, aug in zip(nodes, augs)]
        batches.append((torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
    z = torch.stack([s.z.to(torch.float32) for s in states])
    mom = None
    if cfg.momentum and any(s.momentum is not None for s in states):
        mom = torch.stack([torch.zeros_like(z[0]) if s.momentum is None else s.momentum for s in states])
    hp = sgd_params(setup, rnd, cfg.qgm)
    drift = None
    if any(s.drift is not None for s in states):
        drift = torch.stack([torch.zeros_like(z[0]) if s.drift is None else s.drift.to(torch.float32) for s in states])
    gsum = None
    if cfg.drift_correction == "gradient":
        gsum = torch.stack([torch.zeros_like(z[0]) if s.grad_sum is None else s.grad_sum for s in states])
    offsets = [PushSum.lookahead_offset(s, cfg.gradient_lookahead) for s in states]
    offset = None
    if any(o is not None for o in offsets):
        offset = torch.stack([torch.zeros_like(z[0]) if o is None else o for o in offsets])
    shift = None
    if cfg.logit_adjust:
        shift = torch.stack([label_shift(setup, i) for i in nodes])
    z_new, mom_new, losses = engine.local_sgd(z, mom, batches, hp, drift, gsum, offset, shift)
    if gsum is not None:
        for k, state in enumerate(states):
            state.grad_sum = gsum[k].cpu().clone()
    z_new = z_new.cpu()
    mom_new = None if mom_new is None else mom_new.cpu()
    for k, state in enumerate(states):
        state.momentum = None if mom_new is None else mom_new[k].clone()
        PushSum.local_update(state, corrected(state, cfg.update_tracking, z[k], z_new[k]), cfg.value_bound)
    return losses.cpu().tolist()


def init_state(setup: Setup) -> NodeState:
    return NodeState(x=setup.x0.clone(), y=1.0)
