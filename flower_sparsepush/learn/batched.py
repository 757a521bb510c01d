"""All nodes' local SGD in one batched call, on the CPU or a GPU (``torch.func.vmap``). No Flower imports.

The in-process loop spends most of its time in many small forward/backward passes (one per node per local step,
batch 32). :class:`BatchedSGD` runs the same step for every node at once: the nodes' flat parameter vectors are
stacked into one ``(nodes, d)`` tensor and ``vmap(grad(loss))`` computes every node's gradient on its own batch in
one call. The update is the same arithmetic as :func:`training.local_sgd` (weight decay, momentum or Nesterov,
quasi-global momentum), so the two agree to float32 rounding on the CPU; ``tests/test_batched.py`` proves it. Batches
and augmentation come from the same stateless generators (``training.node_batch``), so a node draws the same samples
in either path.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no GPU here (use device=cpu or device=auto)")
    return dev


class BatchedSGD:
    """Local SGD of many nodes at once for one model architecture (a copy of ``model`` on ``device``)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.model = copy.deepcopy(model).to(device)
        self.model.train()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.sizes = [p.numel() for _, p in self.model.named_parameters()]
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self._grad = vmap(grad_and_value(self._loss))
        self._logits = vmap(self._forward, in_dims=(0, None))

    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def _forward(self, flat: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (self._params(flat), self.buffers), (xb,))

    def _loss(self, flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._forward(flat, xb), yb)

    def gradients(self, z: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-node gradients ``(nodes, d)`` and losses ``(nodes,)`` of models ``z`` on batches ``xb``, ``yb``."""
        return self._grad(z, xb, yb)

    @torch.no_grad()
    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(nodes, samples, classes)``: every node's model on the same inputs ``x`` (evaluation)."""
        self.model.eval()
        try:
            return self._logits(z, x)
        finally:
            self.model.train()

    def local_sgd(
        self,
        z: torch.Tensor,
        momentum: torch.Tensor | None,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        hp: dict[str, Any],
        drift: torch.Tensor | None = None,
        grad_sum: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``len(batches)`` SGD steps of every node from ``z`` (``(nodes, d)``); returns (z, momentum, mean losses).

        ``batches[k]`` holds step k's inputs ``(nodes, b, ...)`` and labels ``(nodes, b)``. ``hp``: lr, momentum,
        weight-decay, nesterov, qgm; ``drift`` (``(nodes, d)``) is subtracted from the gradients; ``grad_sum``
        (``(nodes, d)``, on the CPU) gains ``lr * (g + weight_decay * z)`` per step in place; with ``offset``
        (``(nodes, d)``) the gradients are taken at ``z + offset`` (gradient-lookahead). The arithmetic is
        :func:`training.local_sgd`'s, node by node.
        """
        acc = None if grad_sum is None else grad_sum.to(self.device, torch.float32)
        drift = None if drift is None else drift.to(self.device, torch.float32)
        offset = None if offset is None else offset.to(self.device, torch.float32)
        lr, mu, wd = hp["lr"], hp["momentum"], hp["weight-decay"]
        z = z.to(self.device, torch.float32).clone()
        buf = None
        if mu:
            buf = torch.zeros_like(z) if momentum is None else momentum.to(self.device, torch.float32).clone()
        losses = torch.zeros(z.shape[0], device=self.device)
        for xb, yb in batches:
            at = z if offset is None else z + offset
            g, loss = self.gradients(at, xb.to(self.device), yb.to(self.device))
            if acc is not None:
                acc.add_(g.add(z, alpha=wd), alpha=lr)
            if drift is not None:
                g = g - drift
            losses += loss.detach()
            sgd_step_(z, g, buf, lr, mu, wd, hp["nesterov"], hp["qgm"])
        if acc is not None and acc is not grad_sum:
            grad_sum.copy_(acc.cpu())
        return z, buf, losses / max(1, len(batches))


def sgd_step_(z, g, buf, lr: float, mu: float, wd: float, nesterov: bool, qgm: bool) -> None:
    """One SGD step on ``z`` in place, torch.optim.SGD's arithmetic (weight decay, momentum ``buf`` updated in place,
    Nesterov); with ``qgm`` the buffer is the quasi-global momentum, read but not updated. Shapes broadcast, so the
    same function serves one node (``d``) and all nodes at once (``(nodes, d)``)."""
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
