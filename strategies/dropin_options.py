"""The drop-in strategy's gossip options: their defaults, what a preset (run/presets.py) sets among them, and the
compressor of each round under a sparsity schedule.

The gossip arguments of :class:`~flower_sparsepush.strategies.dropin.DecentralizedFedAvg` default to ``None``: the
value of ``preset`` when one is named (the keys it leaves unset at the run-config defaults, one exchange per round:
the configuration the native mode runs), else :data:`DEFAULTS`. An argument given explicitly wins over the preset.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flower_sparsepush.run.config import KEYS
from flower_sparsepush.run.presets import PRESETS
from flower_sparsepush.run.schedule import compressor_at

# Chosen on the validation split of examples/quickstart-dropin (docs/dropin.md, "Defaults and why"): a
# quickstart-shaped app (2 local epochs per round, momentum 0.9) drifts far in one round, so the defaults pull the
# nodes together with 6 compressed exchanges per round (top-10% + 4-bit values: ~0.9 bit per parameter each, 12x
# less than FedAvg's dense up and down) and take the gradients at the mean of each node's copies of its
# in-neighbours. Until then (top-10% float32, gamma 0.1, one exchange, no lookahead) the same app lost accuracy
# from round 5 on.
DEFAULTS: dict[str, Any] = {
    "graph": "exponential",
    "compressor": "topk:0.1+q:4",
    "gamma": 0.5,
    "form": "ref",
    "gradient_lookahead": 1.0,
    "gossip_steps": 6,
    "sparsity_schedule": "constant",
    "lr_schedule": "constant",
    "final_merge": False,
    "merge_every": 0,
    "merge_bits": 32,
    "merge_feedback": False,
}
GOSSIP_ARGS = tuple(DEFAULTS)

# run-config key -> the argument that plays its part
PRESET_ARGS = {
    "graph": "graph",
    "compressor": "compressor",
    "gamma": "gamma",
    "form": "form",
    "gradient-lookahead": "gradient_lookahead",
    "sparsity-schedule": "sparsity_schedule",
    "lr-schedule": "lr_schedule",
    "final-merge": "final_merge",
    "merge-every": "merge_every",
    "merge-bits": "merge_bits",
    "merge-feedback": "merge_feedback",
}
# run-config keys the drop-in cannot apply, and why (a preset that sets one is refused with this reason)
WHY_NOT = {
    "drift-correction": "it corrects the local steps with the learning rate and gradients of the node's SGD, which "
    "your ClientApp keeps to itself",
    "update-tracking": "it corrects the gradients of the node's SGD, which your ClientApp keeps to itself",
    "logit-adjust": "it changes the loss of the node's SGD, which your ClientApp keeps to itself",
    "qgm": "quasi-global momentum replaces the momentum buffer of the node's SGD, which your ClientApp keeps",
    "final-gossip-rounds": "every drop-in round is a training round of your ClientApp; more exchanges per round: "
    "gossip_steps",
}
# the ClientApp's training (and the federation's size): the user's app decides them, the strategy has nothing to set
CLIENT_KEYS = (
    "dataset",
    "model",
    "num-nodes",
    "batch-size",
    "lr",
    "momentum",
    "nesterov",
    "weight-decay",
    "val-split",
    "local-steps",
    "num-rounds",
)


def preset_args(name: Any) -> dict[str, Any]:
    """The drop-in arguments of preset ``name``. Keys of the ClientApp's training are the app's own and skipped;
    any other key the drop-in cannot apply (e.g. ``drift-correction``, :data:`WHY_NOT`) is refused, all in one
    ValueError."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    out: dict[str, Any] = {}
    refused = []
    for key, value in PRESETS[name].keys.items():
        if key in PRESET_ARGS:
            out[PRESET_ARGS[key]] = value
        elif key == "strategy" and value == "sgp":
            out.update(compressor="none", gamma=1.0)
        elif key == "strategy" and value == "sparse-push":
            continue
        elif key == "strategy" and value == "scsp":  # Sparse-Push with the final merge on unless the preset says
            out.setdefault("final_merge", True)
        elif key in CLIENT_KEYS or (key in KEYS and value == KEYS[key].default):
            continue
        else:
            refused.append(f"{key}={value!r} ({WHY_NOT.get(key, 'no such feature in the drop-in')})")
    if refused:
        raise ValueError(
            f"preset {name!r}: the drop-in strategy cannot apply {'; '.join(refused)}; use the native mode, or give "
            "the preset's other keys as arguments"
        )
    return out


def native_defaults() -> dict[str, Any]:
    """The gossip arguments as the native mode runs a run config that does not set them (run-config defaults; one
    exchange per round): what a preset's unset keys mean."""
    out = {arg: KEYS[key].default for key, arg in PRESET_ARGS.items()}
    return out | {"gossip_steps": 1}


def resolve(preset: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """Every gossip argument: the explicit ones (not None), else the preset's (its unset keys at the run-config
    defaults, as the native mode runs it), else :data:`DEFAULTS`."""
    base = dict(DEFAULTS)
    if preset is not None:
        base = native_defaults() | preset_args(preset)
    base.update({k: v for k, v in given.items() if v is not None})
    return base


def compressor_of_round(spec: Any, sparsity_schedule: str, lr_schedule: str, num_rounds: int, rnd: int) -> Any:
    """The compressor spec of training round ``rnd`` (0-based) of ``num_rounds``: ``run.schedule.compressor_at``
    with the drop-in's arguments (only the shape of the ClientApp's learning-rate schedule matters)."""
    if not isinstance(spec, str) or sparsity_schedule == "constant":
        return spec
    cfg = SimpleNamespace(
        compressor=spec,
        sparsity_warmup=0,
        sparsity_warmup_start=KEYS["sparsity-warmup-start"].default,
        sparsity_schedule=sparsity_schedule,
        num_rounds=num_rounds,
        lr_schedule=lr_schedule,
        lr=1.0,
    )
    return compressor_at(cfg, rnd)
