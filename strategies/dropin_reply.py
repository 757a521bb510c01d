"""The drop-in strategy's check of a node's train reply: what a reply must be before any of it touches the node's
push-sum state on the ServerApp. A reply that fails is a failure of that node for the round (its state is kept),
never of the run.

A reply passes only when

- the record under the strategy's array key is an ``ArrayRecord`` (a ConfigRecord or anything else is refused);
- it holds exactly the arrays of the initial model, each of the initial shape;
- every array the strategy mixes has a real (float or integer) dtype, and after the cast to the state's dtype
  (float32) is all finite (a float64 1e300 becomes inf in float32 and is refused) and within the run's value bound
  (core/bounds.py);
- every array it passes through unmixed (integer buffers) has the initial dtype.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from flwr.app import ArrayRecord

from flower_sparsepush.core import bounds

Layout = list[tuple[str, tuple[int, ...], np.dtype, bool]]  # (key, shape, dtype, mixed?)


class BadDropinReply(ValueError):
    """A train reply the drop-in strategy refuses (the reason names the array and what is wrong)."""


def reply_arrays(
    record, layout: Layout, bound: float | None, who: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """The mixed arrays of ``record`` as one flat ``dtype`` vector and the unmixed ones by key, or
    :class:`BadDropinReply`."""
    if not isinstance(record, ArrayRecord):
        raise BadDropinReply(f"{who}: the model must be an ArrayRecord, got a {type(record).__name__}")
    keys = [k for k, *_ in layout]
    if sorted(record.keys()) != sorted(keys):
        raise BadDropinReply(f"{who}: expected arrays {keys}, got {list(record.keys())}")
    parts, fixed = [], {}
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    for key, shape, want, mixed in layout:
        try:
            a = record[key].numpy()
        except Exception as err:  # noqa: BLE001 - a malformed Array is the node's fault, whatever numpy says
            raise BadDropinReply(f"{who}: array {key!r} cannot be read ({err})") from None
        if tuple(a.shape) != shape:
            raise BadDropinReply(f"{who}: array {key!r} has shape {tuple(a.shape)}, expected {shape}")
        if not mixed:
            if a.dtype != want:
                raise BadDropinReply(f"{who}: array {key!r} is {a.dtype}, expected {want}")
            fixed[key] = np.array(a)
            continue
        if a.dtype.kind not in "fiu":
            raise BadDropinReply(f"{who}: array {key!r} is {a.dtype}, not a real number type")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float64 -> float32 overflow: inf, refused below
            cast = np.ascontiguousarray(a, dtype=np_dtype)
        v = torch.from_numpy(cast).reshape(-1)
        if not bool(torch.isfinite(v).all()):  # one NaN would spread to every node
            raise BadDropinReply(f"{who}: array {key!r} is not all finite as {np_dtype} (NaN, inf or overflow)")
        if bound is not None and not bounds.within(v, bound * (1 + bounds.SLACK)):
            raise BadDropinReply(
                f"{who}: array {key!r} holds {float(v.abs().max()):.3g}, beyond the run's value bound {bound:g}"
            )
        parts.append(v)
    return torch.cat(parts), fixed
