"""Global merges: every node takes the average of all nodes' models, what one all-reduce computes. No Flower imports.

A merge is the one step of a run where every node learns the same vector, so it also gives the nodes a shared
*base*: the initial model before the first merge, the merged model after it. Two precisions:

- ``bits=32`` (exact): every node takes ``sum_i x_i / sum_i y_i`` with weight ``sum_i y_i / n``; the mass is kept
  exactly (:func:`merge_exact`).
- ``bits`` in 1..8 (quantized): each node sends its numerator's deviation from the base, ``x_i - y_i * base``, with
  every tensor (segment) quantized to ``bits``-bit codes and one float32 scale (compression.quantize), and its
  weight ``y_i`` exactly; the owner of each chunk divides the sum by ``sum_i y_i`` and sends that back quantized the
  same way. Every node ends with ``m = base + Q(sum_i Q(x_i - y_i * base) / sum_i y_i)``, the same vector
  everywhere. At 2..8 bits (round to nearest) it is within one rounding step per tensor of the exact average
  ``sum x / sum y``; at 1 bit (sign times the mean magnitude) there is no such bound and the rounding is biased, so
  config.py allows it only with error feedback. The weights are averaged exactly; the numerators' sum moves by the
  rounding error only (``n * ybar * (m - exact average)``).

With ``merge-feedback`` (error feedback, as in EF-SGD, Karimireddy et al. 2019) nothing is rounded away for good:
each node keeps what its last message did not carry (``state.merge_err``) and adds it to its next one, and the
chunks' owners keep what the averaged chunk lost (``owner_err``, one vector split by chunk among the owners) and
add it to the next average. Then ``sum_i x_i + sum_i merge_err_i + n * ybar * owner_err`` is the same before and
after every merge (:func:`merge_mass`): a coordinate whose change is below one rounding step is delayed, not lost.

Bits: the nodes compute a merge as a reduce-scatter then an all-gather (merge_nodes.py): each tensor's owner gets
one encoded message of that tensor from every other participant and sends one average back to each, so a merge
among P nodes moves ``2 (P - 1)`` encoded messages of every tensor (:func:`merge_traffic`), ``2 (P - 1) / P`` of
:func:`merge_bits` (two whole encoded models) per node on average.
"""

from __future__ import annotations

import numpy as np
import torch

from flower_sparsepush.core.codec import Message, encode
from flower_sparsepush.core.compression import Compressed, Identity, dequantize, quantize
from flower_sparsepush.core.pushsum import NodeState

EXACT = 32
QUANTIZED_BITS = range(1, 9)


def check_bits(bits: int) -> None:
    if not (bits == EXACT or bits in QUANTIZED_BITS):
        raise ValueError(f"merge bits must be {EXACT} (exact) or 1..8 (quantized), got {bits!r}")


def _round_trip(v: np.ndarray, segments: list[int], bits: int) -> np.ndarray:
    """What a receiver decodes from ``v`` sent with every segment quantized to ``bits`` bits (one scale each)."""
    out = np.empty_like(v, dtype=np.float64)
    start = 0
    for size in segments:
        codes, scale = quantize(v[start : start + size].astype(np.float32), bits)
        out[start : start + size] = dequantize(codes, scale, bits)
        start += size
    return out


def merge_exact(states: list[NodeState]) -> None:
    """Every node takes the exact push-sum average ``sum x / sum y`` (weight ``sum y / n``: the mass is unchanged)."""
    n = len(states)
    total_x = torch.stack([s.x.to(torch.float64) for s in states]).sum(0)
    total_y = float(sum(s.y for s in states))
    for s in states:
        s.x = (total_x / n).to(s.x.dtype)
        s.y = total_y / n


def merge(
    states: list[NodeState],
    base: torch.Tensor,
    bits: int,
    segments: list[int],
    form: str = "ref",
    owner_err: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge all nodes (in place) and return the new shared base, the merged de-biased model.

    ``base`` is the vector all nodes already share (the initial model, or the last merge's result); ``segments``
    are the model's tensor sizes (one quantization scale each). The per-edge references are set to what the
    merged sender now holds, on both ends of every edge (both ends know it): the merged model in the ``ref`` form,
    its numerator ``ybar * m`` in ``ref-x``. So the next messages carry only what moved after the merge. Messages
    in flight must be delivered first. ``owner_err`` (float64, model-sized, updated in place) turns on error
    feedback for a quantized merge: the nodes' residuals live in ``state.merge_err``, the owners' in it.
    """
    check_bits(bits)
    if sum(segments) != base.numel():
        raise ValueError(f"segments cover {sum(segments)} values, the model has {base.numel()}")
    if owner_err is not None and (owner_err.numel() != base.numel() or owner_err.dtype != torch.float64):
        raise ValueError(
            f"owner_err must be float64 with {base.numel()} values, got {owner_err.dtype} {owner_err.shape}"
        )
    n = len(states)
    ybar = float(sum(s.y for s in states)) / n
    if bits == EXACT:
        merge_exact(states)
        m = states[0].z.detach().clone()
    else:
        b = base.detach().to(torch.float64).numpy()
        feedback = owner_err is not None
        sent = []
        for s in states:
            v = s.x.detach().to(torch.float64).numpy() - s.y * b
            if feedback and s.merge_err is not None:
                v = v + s.merge_err.numpy()
            q = _round_trip(v, segments, bits)
            if feedback:
                s.merge_err = torch.from_numpy(v - q)
            sent.append(q)
        avg = np.sum(sent, axis=0) / (ybar * n)
        if feedback:
            avg = avg + owner_err.numpy()
        q_avg = _round_trip(avg, segments, bits)
        if feedback:
            owner_err.copy_(torch.from_numpy(avg - q_avg))
        m64 = b + q_avg
        m = torch.from_numpy(m64).to(states[0].x.dtype)
        for s in states:
            s.x = (ybar * torch.from_numpy(m64)).to(s.x.dtype)
            s.y = ybar
    ref = (m if form == "ref" else ybar * m).to(states[0].x.dtype)
    for s in states:
        for refs in (s.refs_out, s.refs_in):
            for j in refs:
                refs[j] = ref.clone()
    return m


def merge_mass(states: list[NodeState], owner_err: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i x_i + sum_i merge_err_i + n * ybar * owner_err`` (float64): what a merge with error feedback keeps."""
    total = torch.stack([s.x.to(torch.float64) for s in states]).sum(0)
    for s in states:
        if s.merge_err is not None:
            total = total + s.merge_err
    if owner_err is not None:
        total = total + float(sum(s.y for s in states)) * owner_err  # n * ybar = sum_i y_i
    return total


def _per_step(lr_steps: float, momentum: float) -> float:
    """The factor that turns a model movement over local steps of summed learning rate ``lr_steps`` (momentum
    ``mu``) into a gradient: a persistent gradient g moves a model by ``-g * lr_steps / (1 - mu)``."""
    if lr_steps <= 0:
        raise ValueError(f"the learning rates since the last merge must sum to > 0, got {lr_steps}")
    return (1.0 - momentum) / lr_steps


def correct_drift(
    states: list[NodeState], before: list[torch.Tensor], merged: torch.Tensor, lr_steps: float, momentum: float
) -> None:
    """Update every node's gradient-bias estimate from a periodic merge (run-config ``drift-correction``).

    Between two merges node i moved to ``before[i]`` while the nodes together moved to ``merged``. With SGD of
    momentum ``mu`` a persistent gradient g moves a model by ``-g * lr_steps / (1 - mu)`` (``lr_steps``: the sum of
    the learning rates of the local steps since the last merge), so ``(1 - mu) (merged - before[i]) / lr_steps`` is
    what node i's gradients pointed away from the average, per step, beyond what it already corrected. It is added
    to ``state.drift``, which local SGD subtracts from every gradient: SCAFFOLD's control variate (Karimireddy et
    al. 2020), measured at the merges, so it costs no bits. Over nodes of equal weight after an exact merge the
    corrections sum to zero.
    """
    scale = _per_step(lr_steps, momentum)
    for s, b in zip(states, before):
        step = (merged.to(torch.float64) - b.to(torch.float64)) * scale
        s.drift = step.to(torch.float32) if s.drift is None else s.drift + step.to(s.drift.dtype)


def correct_bias(
    states: list[NodeState], prev: torch.Tensor, merged: torch.Tensor, lr_steps: float, momentum: float
) -> None:
    """Set every node's gradient-bias estimate at a periodic merge (run-config ``drift-correction=gradient``).

    Each node summed ``lr * g`` of its own steps since the last merge (``state.grad_sum``, gradients before any
    correction, weight decay included), so ``grad_sum / lr_steps`` is its mean gradient. Gossip moves no mass, so
    the nodes' average moved from the last merge's model ``prev`` to ``merged`` by their local steps alone; with
    momentum ``mu`` that is ``-(mean gradient) * lr_steps / (1 - mu)``, which gives the mean gradient of all nodes
    without sending it. The node's bias is the difference; local SGD subtracts it (SCAFFOLD's control variate,
    Karimireddy et al. 2020, estimated at the merges, no bits). ``grad_sum`` restarts from zero.
    """
    mean_grad = (prev.to(torch.float64) - merged.to(torch.float64)) * _per_step(lr_steps, momentum)
    for s in states:
        if s.grad_sum is None:
            continue
        s.drift = (s.grad_sum.to(torch.float64) / lr_steps - mean_grad).to(torch.float32)
        s.grad_sum = torch.zeros_like(s.grad_sum)


def merge_bits(d: int, bits: int = EXACT, segments: list[int] | None = None) -> int:
    """Two whole encoded models of ``d`` parameters (one message per tensor when quantized): the size a merge is
    compared with; what the nodes of a merge send is :func:`merge_traffic`, ``(P - 1) / P`` of this per node on
    average (up to one header per tensor when exact)."""
    check_bits(bits)
    if bits == EXACT:
        return 2 * 8 * len(encode(Message(0, 0, 1.0, 1.0, Identity()(torch.zeros(d, dtype=torch.float32)))))
    total = 0
    for size in segments or [d]:
        c = Compressed(size, None, codes=np.zeros(size, dtype=np.uint8), scale=1.0, bits=bits)
        total += 8 * len(encode(Message(0, 0, 1.0, 1.0, c)))
    return 2 * total


def merge_traffic(participants: int, bits: int, segments: list[int], value_bytes: int = 4) -> int:
    """Bits all nodes together send in one merge among ``participants`` nodes: ``2 (P - 1)`` encoded messages of
    every segment (one per tensor, each with its header; values of ``value_bytes`` bytes when exact)."""
    check_bits(bits)
    dtype = np.float32 if value_bytes == 4 else np.float64
    total = 0
    for size in segments:
        if bits == EXACT:
            c = Compressed(size, None, values=np.zeros(size, dtype=dtype))
        else:
            c = Compressed(size, None, codes=np.zeros(size, dtype=np.uint8), scale=1.0, bits=bits)
        total += 8 * len(encode(Message(0, 0, 1.0, 1.0, c)))
    return 2 * (participants - 1) * total
