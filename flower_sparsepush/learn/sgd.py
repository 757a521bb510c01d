"""Local SGD, written once for one node (a ``d`` vector) and for many nodes at once (a ``(nodes, d)`` tensor).

:func:`sgd_steps` runs the steps: it asks a gradient function for the gradient at the current point (shifted by
the gradient-lookahead offset when there is one), applies drift correction and the running gradient sum, and moves
the model by :func:`sgd_step_`, torch.optim.SGD's arithmetic (weight decay, momentum, Nesterov; quasi-global momentum
reads the buffer without updating it). Shapes broadcast, so the per-node path (``run.node_train.local_sgd``) and the
batched path (``learn.batched.BatchedSGD``) share every line of the update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GradientFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SGDParams:
    """The SGD rule of one round: learning rate, momentum, Nesterov, weight decay, quasi-global momentum."""

    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    qgm: bool = False


def sgd_step_(z, g, buf, lr: float, mu: float, wd: float, nesterov: bool, qgm: bool) -> None:
    """One SGD step on ``z`` in place, torch.optim.SGD's arithmetic (weight decay, momentum ``buf`` updated in place,
    Nesterov); with ``qgm`` the buffer is the quasi-global momentum, read but not updated."""
    if wd:
        g = g.add(z, alpha=wd)
    if buf is not None and qgm:
        d = g.add(buf, alpha=mu)
    elif buf is not None:
        buf.mul_(mu).add_(g)
        d = g.add(buf, alpha=mu) if nesterov else buf
    else:
        d = g
    z.sub_(d, alpha=lr)


def sgd_steps(
    z: torch.Tensor,
    buf: torch.Tensor | None,
    steps: int,
    gradient: GradientFn,
    hp: SGDParams,
    drift: torch.Tensor | None = None,
    grad_sum: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``steps`` SGD steps on ``z`` (and the momentum buffer ``buf``) in place; returns each step's loss.

    ``gradient(point, k)`` gives the gradient and loss of step ``k`` at ``point``: ``z``, or ``z + offset`` with
    gradient-lookahead (the step still moves ``z``). ``grad_sum``, when given, gains ``lr * (g + weight_decay * z)``
    of every step in place, with the gradient before ``drift`` (merge.correct_drift) is subtracted from it.
    """
    losses = []
    for k in range(steps):
        g, loss = gradient(z if offset is None else z + offset, k)
        if grad_sum is not None:
            grad_sum.add_(g.add(z, alpha=hp.weight_decay), alpha=hp.lr)
        if drift is not None:
            g = g - drift
        sgd_step_(z, g, buf, hp.lr, hp.momentum, hp.weight_decay, hp.nesterov, hp.qgm)
        losses.append(loss)
    return losses
