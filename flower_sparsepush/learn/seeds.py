"""Seeds of everything random in a run, as pure functions of ``(seed, node, tag, k)``: batches, epochs,
augmentation and random-k compression draw from generators seeded here, so a node draws the same numbers in every
process (a Ray actor, a node worker, the in-process loop)."""

from __future__ import annotations

import numpy as np
import torch

_TAGS = {"batch": 1, "epoch": 2, "aug": 3, "compress": 4}


def seed_for(seed: int, node: int, tag: str, k: int) -> int:
    """A 63-bit seed that depends only on (seed, node, tag, k)."""
    return int(
        np.random.SeedSequence([seed, node, _TAGS[tag], k]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
        >> np.uint64(1)
    )


def generator(seed: int, node: int, tag: str, k: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed_for(seed, node, tag, k))
    return g
