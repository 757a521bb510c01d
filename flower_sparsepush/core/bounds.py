"""Value bounds: the largest magnitude a push-sum message or a node's model may hold. No Flower imports.

A run has one bound ``B`` (run-config ``value-bound``, :data:`DEFAULT`). Honest runs never come near it (the
largest message value of the presets on a small model is about 2, docs/reliability.md), so a value beyond it can
only come from a broken or hostile node. The rule, applied in three places:

- **senders** clip what they compress to ``[-B, B]`` (:func:`clip`), and a node's de-biased model is clipped to it
  after local training (:meth:`pushsum.PushSum.local_update`), so an honest node never sends a value beyond ``B``
  (nor NaN: a non-finite local update is not applied);
- **the relay** refuses a reply with a message beyond ``B`` (:func:`message_excess`; guard kind ``"bound"``),
  charged to its sender;
- **receivers** refuse such a message too, and any message whose application would make their own state non-finite
  (:func:`finite`), before anything of it stays in their state.

Every check allows a relative slack of :data:`SLACK` for float32 rounding (a float32 quantization scale or value of
an honestly clipped vector can round a few ulps above ``B``). Clipping is the identity (the same tensor, no copy)
when nothing is beyond the bound, so a run the bound never binds is bit for bit the run without it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flower_sparsepush.core.compression import Compressed

DEFAULT = 1e6  # run-config value-bound: far above any honest value (about 2 in the presets), far below overflow
MAX = 3.4e38  # just below float32's largest value: a message can carry nothing larger, so this bound is "off"
SLACK = 1e-6  # relative: float32 rounding of a clipped value or a quantization scale


def check_bound(bound: float) -> float:
    """``bound`` as a float, or ValueError unless it is in (0, :data:`MAX`]."""
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= MAX:
        raise ValueError(f"value bound must be a number in (0, {MAX:g}], got {bound!r}")
    return float(bound)


def _limit(bound: float) -> float:
    return bound * (1 + SLACK)


def largest(c: Compressed) -> float:
    """The largest magnitude of the values ``c`` stands for (its quantization scale when quantized: every level is
    at most the scale); NaN when a value is NaN."""
    if c.codes is not None:
        return float(c.scale)
    if c.values is None or len(c.values) == 0:
        return 0.0
    v = np.abs(c.values)
    return float("nan") if np.isnan(v).any() else float(v.max())


def message_excess(c: Compressed, bound: float | None, name: str = "the run's value bound") -> str | None:
    """Why payload ``c`` is beyond ``bound`` (None: within it, or no bound); ``name`` says what the bound is."""
    if bound is None:
        return None
    m = largest(c)
    if not (m <= _limit(bound)):  # NaN is beyond too
        what = "quantization scale" if c.codes is not None else "largest value"
        return f"{what} {m:.3g} is beyond {name} {bound:g}"
    return None


def largest_abs(v: torch.Tensor) -> float:
    """``max |v|`` as a Python float: NaN when an entry is NaN, inf when one is infinite (one pass, no temporaries
    of the tensor's size beyond ``abs``; several times faster than ``isfinite(v).all()`` on the CPU)."""
    return float(v.abs().max()) if v.numel() else 0.0


def within(v: torch.Tensor, bound: float) -> bool:
    """Whether every entry of ``v`` is finite and at most ``bound`` in magnitude."""
    return largest_abs(v) <= bound  # NaN compares False


def clip(v: torch.Tensor, bound: float | None) -> torch.Tensor:
    """``v`` itself when it is within ``bound`` (or there is none); else a copy with every entry clipped to
    ``[-bound, bound]`` (infinities to the bound, NaN to 0)."""
    if bound is None or within(v, bound):
        return v
    return torch.nan_to_num(v, nan=0.0, posinf=bound, neginf=-bound).clamp(-bound, bound)


def finite(y: float, *tensors: torch.Tensor | None) -> bool:
    """Whether the weight ``y`` is finite and positive and every given tensor is all finite (None: skipped)."""
    if not (math.isfinite(y) and y > 0):
        return False
    return all(t is None or math.isfinite(largest_abs(t)) for t in tensors)


def finite_ratio(x: torch.Tensor, y: float) -> bool:
    """Whether ``x / y`` (a node's de-biased model) is finite in ``x``'s dtype, for finite ``x`` and ``y > 0``."""
    limit = torch.finfo(x.dtype).max if x.is_floating_point() else math.inf
    return largest_abs(x) / y <= limit
