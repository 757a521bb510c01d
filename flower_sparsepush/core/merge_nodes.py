"""A global merge computed by the nodes: what each node sends, what the owner of a segment computes, what every node
does with the averages. No Flower imports.

The arithmetic is :func:`flower_sparsepush.core.merge.merge`'s, split over the nodes that hold the data. Every
tensor of the model (a *segment*, one quantization scale each) has one *owner* among the merge's participants,
:func:`owners` (the largest segments first, each to the participant owning the fewest values so far):

1. :func:`contribute`: every participant encodes, per segment, what it adds to the average (exact: its numerator
   ``x_i``; quantized: its deviation ``x_i - y_i * base`` plus its feedback residual, rounded to ``bits``) with its
   weight ``y_i`` in the message; one encoded message per segment, addressed to the segment's owner;
2. :func:`reduce`: the owner sums one segment's contributions, divides by the participants' count (exact) or their
   total weight (quantized, plus its own residual), rounds the average and encodes it with the mean weight ``ybar``;
3. :func:`apply`: every participant assembles the merged model from the averages of all segments and takes it
   (``x = ybar * m``, ``y = ybar``), resets the references of its edges to other participants, and keeps ``m`` as
   its base for the next merge. A node that took no part learns only the new base (:func:`catch_up`).

A merge's messages carry ``a = 1`` and the merge's round; their ``y`` is the sender's weight (a contribution) or
the mean weight (an average). They are never mixed with push-sum messages, so they move no push-sum mass.

Value bound (core/bounds.py, run-config ``value-bound`` ``B``): a merge message's values are within
:func:`value_limit` of its weight, which an honest node guarantees by clipping what it sends (the identity when
nothing is beyond it, so a run the bound never binds is unchanged), and the relay refuses a message beyond it
(core/merge_relay.py, kind ``"bound"``). An exact merge carries numerators ``x = y z`` with ``|z| <= B``: at most
``y B``; a quantized one carries deviations from the shared base, ``y (z - base)`` plus fed-back rounding: at most
``DEVIATION y B`` (twice ``y B``, with room for the feedback).
"""

from __future__ import annotations

import numpy as np
import torch

from flower_sparsepush.core import bounds as value_bounds
from flower_sparsepush.core.codec import Message, decode, encode
from flower_sparsepush.core.compression import Compressed, Identity, dequantize, quantize
from flower_sparsepush.core.merge import EXACT, check_bits
from flower_sparsepush.core.pushsum import NodeState

Frames = list[tuple[int, bytes]]
DEVIATION = 4.0  # a quantized merge message's values: at most DEVIATION * y * B (honest: 2 y B plus feedback)


def value_limit(bits: int, y: float, bound: float | None) -> float | None:
    """The largest magnitude a merge message of weight ``y`` may carry under the value bound ``bound`` (None: no
    bound): ``y B`` for an exact merge's numerators; ``DEVIATION y B`` for a quantized merge's deviations (an
    average carries the de-biased deviation: pass ``y = 1``)."""
    if bound is None:
        return None
    return (y if bits == EXACT else DEVIATION * y) * bound


def _clip64(v: np.ndarray, limit: float | None) -> np.ndarray:
    """``v`` itself when within ``limit`` (or there is none), else clipped to ``[-limit, limit]``."""
    if limit is None or not len(v) or float(np.abs(v).max()) <= limit:
        return v
    return np.clip(np.nan_to_num(v, nan=0.0, posinf=limit, neginf=-limit), -limit, limit)


def bounds(segments: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each segment in the flat model."""
    out, start = [], 0
    for size in segments:
        out.append((start, start + size))
        start += size
    return out


def owners(segments: list[int], participants: list[int]) -> list[int]:
    """The owner of each segment among ``participants``: the segments, largest first (ties by position), each go to
    the participant that owns the fewest values so far (ties: the lowest node id). A pure function of its inputs."""
    parts = sorted(participants)
    if not parts:
        raise ValueError("a merge needs at least one participant")
    load = [0] * len(parts)
    out = [0] * len(segments)
    for k in sorted(range(len(segments)), key=lambda k: (-segments[k], k)):
        j = min(range(len(parts)), key=lambda j: (load[j], j))
        out[k] = parts[j]
        load[j] += segments[k]
    return out


def base_of(state: NodeState, x0: torch.Tensor) -> torch.Tensor:
    """The model the node shares with the other nodes: its last merge's result, or the initial model."""
    return x0 if state.merge_base is None else state.merge_base


def _quantized(v: np.ndarray, bits: int) -> tuple[Compressed, np.ndarray]:
    """``v`` quantized with one scale (the payload) and what a receiver decodes from it (float64)."""
    codes, scale = quantize(v.astype(np.float32), bits)
    return Compressed(len(v), None, codes=codes, scale=scale, bits=bits), dequantize(codes, scale, bits).astype(
        np.float64
    )


def contribute(
    state: NodeState,
    base: torch.Tensor,
    bits: int,
    segments: list[int],
    node: int,
    rnd: int,
    form: str,
    feedback: bool = False,
    bound: float | None = None,
) -> Frames:
    """This node's contribution to the merge of round ``rnd``: ``[(segment, encoded message)]``. With ``feedback``
    (a quantized merge) what the rounding drops is kept in ``state.merge_err`` for the next merge. Values are
    clipped to :func:`value_limit` of the node's weight (``bound``: the run's value bound, None: none)."""
    check_bits(bits)
    y = float(state.y)
    limit = value_limit(bits, y, bound)
    if bits == EXACT:
        x = value_bounds.clip(state.x.detach(), limit)
        return [
            (k, encode(Message(node, rnd, 1.0, y, Identity()(x[a:b]), form)))
            for k, (a, b) in enumerate(bounds(segments))
        ]
    v = state.x.detach().to(torch.float64).numpy() - y * base.detach().to(torch.float64).numpy()
    if feedback and state.merge_err is not None:
        v = v + state.merge_err.numpy()
    v = _clip64(v, limit)
    q = np.empty_like(v)
    out = []
    for k, (a, b) in enumerate(bounds(segments)):
        payload, q[a:b] = _quantized(v[a:b], bits)
        out.append((k, encode(Message(node, rnd, 1.0, y, payload, form))))
    if feedback:
        state.merge_err = torch.from_numpy(v - q)
    return out


def reduce(
    state: NodeState,
    segment: int,
    segments: list[int],
    bits: int,
    contributions: Frames,
    owner: int,
    rnd: int,
    form: str,
    feedback: bool = False,
    bound: float | None = None,
) -> bytes:
    """The owner's average of one segment from the participants' ``(sender, message)`` contributions, encoded. With
    ``feedback`` (quantized) the owner adds what its earlier averages of this segment dropped (``state.owner_err``)
    and keeps what this one drops. The average is clipped to :func:`value_limit` (``bound``: the run's value
    bound; contributions within their limits give an average within its own, so this binds only on rounding)."""
    check_bits(bits)
    a, b = bounds(segments)[segment]
    msgs = [decode(d, expected_dim=b - a) for _, d in sorted(contributions, key=lambda f: f[0])]
    n = len(msgs)
    ybar = float(sum(m.y for m in msgs)) / n
    if bits == EXACT:
        values = msgs[0].payload.values
        total = np.stack([m.payload.values.astype(np.float64) for m in msgs]).sum(0)
        avg = _clip64(total / n, value_limit(bits, ybar, bound))
        payload = Compressed(b - a, None, values=avg.astype(values.dtype))
        return encode(Message(owner, rnd, 1.0, ybar, payload, form))
    avg = np.sum([m.payload.decoded_values().astype(np.float64) for m in msgs], axis=0) / (ybar * n)
    if feedback:
        if state.owner_err is None:
            state.owner_err = torch.zeros(sum(segments), dtype=torch.float64)
        avg = avg + state.owner_err.numpy()[a:b]
    avg = _clip64(avg, value_limit(bits, 1.0, bound))
    payload, q = _quantized(avg, bits)
    if feedback:
        state.owner_err.numpy()[a:b] = avg - q
    return encode(Message(owner, rnd, 1.0, ybar, payload, form))


def merged_model(
    averages: Frames, base: torch.Tensor, bits: int, segments: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """``(m, ybar, x)`` from the ``(segment, message)`` averages of every segment: the merged de-biased model, the
    mean weight, and (exact merge) the averaged numerator itself (None for a quantized merge, whose ``x`` is
    ``ybar * m``)."""
    check_bits(bits)
    by_seg = dict(averages)
    if sorted(by_seg) != list(range(len(segments))):
        raise ValueError(f"averages of segments {sorted(by_seg)}, the model has segments 0..{len(segments) - 1}")
    msgs = [decode(by_seg[k], expected_dim=size) for k, size in enumerate(segments)]
    ybar = msgs[0].y
    if any(m.y != ybar for m in msgs):
        raise ValueError(f"the averages carry different weights {sorted({m.y for m in msgs})}")
    if bits == EXACT:
        x = torch.from_numpy(np.concatenate([m.payload.values for m in msgs])).to(dtype)
        return x / ybar, ybar, x
    m64 = base.detach().to(torch.float64) + torch.from_numpy(
        np.concatenate([m.payload.decoded_values().astype(np.float64) for m in msgs])
    )
    return m64, ybar, None


def apply(
    state: NodeState,
    averages: Frames,
    base: torch.Tensor,
    bits: int,
    segments: list[int],
    form: str,
    participants: list[int],
) -> torch.Tensor:
    """Take the merged model (in place) and return it: ``x``, ``y``, the references of the edges to the other
    participants (both ends know the merged model; edges to nodes that took no part keep theirs) and the base."""
    dtype = state.x.dtype
    m, ybar, x = merged_model(averages, base, bits, segments, dtype)
    state.y = ybar
    if x is None:
        state.x = (ybar * m).to(dtype)
        m = m.to(dtype)
    else:
        state.x = x
        m = state.z.detach().clone()
    ref = (m if form == "ref" else ybar * m).to(dtype)
    parts = set(participants)
    for refs in (state.refs_out, state.refs_in):
        for j in refs:
            if j in parts:
                refs[j] = ref.clone()
    state.merge_base = m
    return m


def catch_up(state: NodeState, averages: Frames, base: torch.Tensor, bits: int, segments: list[int]) -> None:
    """A node that took no part in a merge learns its result as its new base (its ``x`` and ``y`` stay)."""
    m, _, _ = merged_model(averages, base, bits, segments, state.x.dtype)
    state.merge_base = m.to(state.x.dtype)
