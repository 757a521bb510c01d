"""What changes from round to round of a run: the learning rate, the compressor's kept fraction, the consensus step
size, and when a global merge is due. Pure functions of the run config and the round."""

from __future__ import annotations

import functools
import math

from flower_sparsepush.run.config import RunConfig, parse_lr_schedule


def lr_at(cfg: RunConfig, rnd: int) -> float:
    """Learning rate of round ``rnd`` (0-based) under ``lr-schedule``."""
    return scheduled_lr(cfg.lr_schedule, cfg.lr, cfg.num_rounds, rnd)


def scheduled_lr(schedule: str, lr: float, total: int, rnd: int) -> float:
    """Learning rate of round ``rnd`` of ``total`` under the schedule ``constant | cosine | step:F1,F2,...``."""
    kind, fractions = parse_lr_schedule(schedule)
    if kind == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * rnd / total))
    if kind == "step":
        return lr * 0.1 ** sum(rnd >= f * total for f in fractions)
    return lr


def compressor_at(cfg: RunConfig, rnd: int) -> str:
    """The compressor spec of round ``rnd`` (0-based). With ``sparsity-warmup`` R > 0 the kept fraction of the
    selection ramps exponentially (as in Deep Gradient Compression, Lin et al. 2018) from ``sparsity-warmup-start``
    at round 0 to the spec's own fraction F at round R: ``f_t = f0 * (F / f0) ** (t / R)``; from round R on it is F.
    With ``sparsity-schedule=lr`` the kept fraction follows the learning rate, ``f_t = F * lr_t / mean(lr)`` (mean
    over the training rounds; floored at F/20, capped at 1; F in the gossip-only final rounds): a node moves in
    proportion to its step size, so that is where its neighbours' copies fall behind. The quantizer (``+q:B``) is
    unchanged. Bits are whatever the messages then take (counted as always)."""
    frac = kept_fraction_at(cfg, rnd)
    if frac is None:
        return cfg.compressor
    sel, plus, rest = cfg.compressor.partition("+")
    return f"{sel.partition(':')[0]}:{frac:.6g}{plus}{rest}"


def kept_fraction_at(cfg: RunConfig, rnd: int) -> float | None:
    """The kept fraction :func:`compressor_at` gives round ``rnd`` (to the 6 digits its spec carries), or None where
    no schedule changes the compressor's own."""
    spec, warm = cfg.compressor, cfg.sparsity_warmup
    by_lr = cfg.sparsity_schedule == "lr" and rnd < cfg.num_rounds
    if spec == "none" or not (by_lr or (warm and rnd < warm)):
        return None
    name, _, arg = spec.partition("+")[0].partition(":")
    if name not in ("topk", "topk-layer", "randk"):
        return None
    target = float(arg)
    if by_lr:
        frac = min(1.0, max(target / 20, target * lr_at(cfg, rnd) / mean_lr(cfg)))
    else:
        start = cfg.sparsity_warmup_start
        frac = start * (target / start) ** (rnd / warm)
    return float(f"{frac:.6g}")


def mean_lr(cfg: RunConfig) -> float:
    """The learning rate averaged over the training rounds (``lr-schedule``)."""
    return _mean_lr(cfg.lr_schedule, cfg.lr, cfg.num_rounds)


@functools.lru_cache(maxsize=16)
def _mean_lr(schedule: str, lr: float, total: int) -> float:
    return sum(scheduled_lr(schedule, lr, total, r) for r in range(total)) / total


def gamma_at(cfg: RunConfig, rnd: int) -> float:
    """The consensus step size of round ``rnd``: ``gamma``, ramped linearly from ``gamma / gamma-warmup`` over the
    first ``gamma-warmup`` rounds when that is > 0 (``gamma * (t + 1) / R``). With ``gamma-schedule=kept`` it is
    then scaled by ``f_t / F``, the kept fraction of the round (:func:`kept_fraction_at`) over the compressor's own, and
    capped at 1: compressed gossip stays stable up to a gamma that grows with the kept fraction (docs/algorithm.md,
    the stability limit), so the step keeps its ratio to that limit, and mixes fastest where the nodes move most."""
    warm = cfg.gamma_warmup
    gamma = cfg.gamma * (rnd + 1) / warm if warm and rnd < warm else cfg.gamma
    frac = kept_fraction_at(cfg, rnd) if cfg.gamma_schedule == "kept" else None
    if frac is not None:
        gamma = min(1.0, gamma * frac / float(cfg.compressor.partition("+")[0].partition(":")[2]))
    return gamma


def merge_due(cfg: RunConfig, done: int, rounds: int) -> bool:
    """Whether a global merge follows the round that makes ``done`` rounds of ``rounds``: after the last one
    (``final-merge``) and after every ``merge-every``-th training round (none in the final gossip-only phase)."""
    every = cfg.merge_every
    periodic = bool(every) and done % every == 0 and done <= cfg.num_rounds
    return (cfg.final_merge and done == rounds) or periodic
