"""All nodes' local SGD in one batched call, on the CPU or a GPU (``torch.func.vmap``). No Flower imports.

The in-process loop spends most of its time in many small forward/backward passes (one per node per local step,
batch 32). :class:`BatchedSGD` runs the same step for every node at once: the nodes' flat parameter vectors are
stacked into one ``(nodes, d)`` tensor and ``vmap(grad(loss))`` computes every node's gradient on its own batch in
one call. The update is :func:`learn.sgd.sgd_steps`, the code the per-node path runs too, so the two agree to float32 rounding on the CPU; ``tests/test_batched.py`` proves it. Batches
and augmentation come from the same stateless generators (``run.node_train.node_batch``), so a node draws the same samples
in either path.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from flower_sparsepush.learn.sgd import SGDParams, sgd_steps


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
        self._grad_shifted = vmap(grad_and_value(self._shifted_loss))
        self._logits = vmap(self._forward, in_dims=(0, None))

    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def _forward(self, flat: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (self._params(flat), self.buffers), (xb,))

    def _loss(self, flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._forward(flat, xb), yb)

    def _shifted_loss(self, flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, shift: torch.Tensor):
        return F.cross_entropy(self._forward(flat, xb) + shift, yb)

    def gradients(
        self, z: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-node gradients ``(nodes, d)`` and losses ``(nodes,)`` of models ``z`` on batches ``xb``, ``yb``;
        ``shift`` ``(nodes, classes)`` is added to each node's logits (run-config ``logit-adjust``)."""
        if shift is None:
            return self._grad(z, xb, yb)
        return self._grad_shifted(z, xb, yb, shift)

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
        hp: SGDParams,
        drift: torch.Tensor | None = None,
        grad_sum: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``len(batches)`` SGD steps of every node from ``z`` (``(nodes, d)``, :func:`learn.sgd.sgd_steps`);
        returns (z, momentum, mean losses). ``batches[k]`` holds step k's inputs ``(nodes, b, ...)`` and labels
        ``(nodes, b)``; ``drift``, ``grad_sum`` (on the CPU, updated in place) and ``offset`` are ``(nodes, d)``;
        ``shift`` ``(nodes, classes)`` the logit shift of each node (:meth:`gradients`)."""
        shift = None if shift is None else shift.to(self.device, torch.float32)
        acc = None if grad_sum is None else grad_sum.to(self.device, torch.float32)
        drift = None if drift is None else drift.to(self.device, torch.float32)
        offset = None if offset is None else offset.to(self.device, torch.float32)
        z = z.to(self.device, torch.float32).clone()
        buf = None
        if hp.momentum:
            buf = torch.zeros_like(z) if momentum is None else momentum.to(self.device, torch.float32).clone()

        def gradient(point: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            xb, yb = batches[step]
            g, loss = self.gradients(point, xb.to(self.device), yb.to(self.device), shift)
            return g, loss.detach()

        losses = sgd_steps(z, buf, len(batches), gradient, hp, drift, acc, offset)
        if acc is not None and acc is not grad_sum:
            grad_sum.copy_(acc.cpu())
        total = torch.zeros(z.shape[0], device=self.device)
        for loss in losses:
            total += loss
        return z, buf, total / max(1, len(batches))
