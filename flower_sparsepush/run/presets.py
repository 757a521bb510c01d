"""Presets: the configurations the claims chose on the validation split, by name (run-config key ``preset``).

Each preset is the switches of one row of the claims table (``simulations/claims_plan.py`` ROWS) on the claims'
Fashion-MNIST schedule: 16 nodes on the exponential graph, small CNN, batch 32 per node, lr 0.05 with a cosine
schedule, momentum 0.9, weight decay 1e-4, 10% of the training set held out for validation, and the rounds that make
20 epochs at the preset's local steps. ``tests/test_presets.py`` checks that every preset equals its row, so the two
cannot drift apart.

A preset fills in its keys; a key the run config sets to something other than its default wins. On Flower every
key reaches the ServerApp with a value (pyproject.toml declares them all), so a key *at its default* counts as not
given there, on every path alike. Setting one of a preset's keys back to its default therefore needs the key list
without the preset; the command lines refuse that case with one line (``config.validate(..., explicit=True)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CLAIMS_SCHEDULE: dict[str, Any] = {
    "dataset": "fashion_mnist",
    "model": "cnn",
    "num-nodes": 16,
    "graph": "exponential",
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "weight-decay": 1e-4,
    "lr-schedule": "cosine",
    "val-split": 0.1,
}
CLAIMS_EPOCHS = 20
FASHION_MNIST_TRAIN = 60_000


def claims_rounds(local_steps: int) -> int:
    """Rounds of the claims' 20-epoch Fashion-MNIST schedule at ``local_steps`` steps per round (the training set
    less its 10% validation split, 16 nodes, batch 32)."""
    train = FASHION_MNIST_TRAIN - round(CLAIMS_SCHEDULE["val-split"] * FASHION_MNIST_TRAIN)
    per_round = CLAIMS_SCHEDULE["num-nodes"] * CLAIMS_SCHEDULE["batch-size"] * local_steps
    return math.ceil(CLAIMS_EPOCHS * train / per_round)


@dataclass(frozen=True)
class Preset:
    """A named configuration: the claims row it reproduces, the claims goal group whose validation choice it is
    (None: a reference, not a goal's choice), what it is for, and its run-config keys."""

    row: str
    group: str | None
    goal: str
    switches: dict[str, Any]

    @property
    def keys(self) -> dict[str, Any]:
        steps = self.switches.get("local-steps", 1)
        return CLAIMS_SCHEDULE | {"num-rounds": claims_rounds(steps)} | self.switches


_SP = {"strategy": "sparse-push", "local-steps": 4, "gamma": 0.1, "final-merge": True, "gradient-lookahead": 0.5}
# the H = 1 SCSP row: one local step, top-0.42% + 4-bit following the lr, gamma 0.05, an 8-bit final merge
_SCSP_H1 = _SP | {
    "strategy": "scsp",
    "local-steps": 1,
    "gamma": 0.05,
    "compressor": "topk:0.0042+q:4",
    "merge-bits": 8,
    "sparsity-schedule": "lr",
    "qgm": False,
    "final-gossip-rounds": 0,
}
PRESETS: dict[str, Preset] = {
    "sgp": Preset("sgp", None, "the baseline every reduction is measured against", {"strategy": "sgp"}),
    "sp-466x": Preset(
        "sp-h4-klr-la5",
        "466x",
        "IID, >= 466x less traffic than SGP within 1.0 point",
        _SP | {"compressor": "topk:0.012+q:4", "sparsity-schedule": "lr"},
    ),
    "sp-1000x": Preset(
        "sp-h4-q8m-1000x-la5",
        "1000x",
        "IID, >= 1000x less traffic than SGP within 2.0 points",
        _SP | {"compressor": "topk:0.0072+q:4", "merge-bits": 8},
    ),
    "scsp-400x": Preset(
        "scsp-h1-q8m-klr-la5",
        "scsp",
        "label skew, SCSP at >= 400x with the plain loss: the drop-in's SCSP preset (scsp-400x-adj does better on "
        "both skews the claims measure: docs/results.md)",
        _SCSP_H1,
    ),
    "scsp-400x-adj": Preset(
        "scsp-h1-q8m-klr-la65-adj1",
        "scsp",
        "label skew (skew:0.8 and dirichlet:0.1), SCSP with logit adjustment and lookahead 0.65 at >= 400x within 1.0 "
        "point of SGP on both",
        _SCSP_H1 | {"gradient-lookahead": 0.65, "logit-adjust": 1.0},
    ),
    "paper": Preset(
        "paper-ef",
        None,
        "the authors' algorithm: error feedback on x, top-1%, gamma 0.01, one SGD step per gossip, 50 final rounds",
        {
            "strategy": "sparse-push",
            "local-steps": 1,
            "compressor": "topk:0.01",
            "gamma": 0.01,
            "form": "ef",
            "final-gossip-rounds": 50,
        },
    ),
}
PRESET_NAMES = tuple(PRESETS)


def preset_of_row(row: str) -> str | None:
    """The preset that runs claims row ``row``, if there is one."""
    return next((name for name, p in PRESETS.items() if p.row == row), None)
