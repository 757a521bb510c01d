"""Per-node energy of a run: radio energy from the bits a node sends and receives, compute energy from FLOPs.

Defaults (both configurable; they are order-of-magnitude figures for a battery-powered node, not measurements of
this machine):

- ``RADIO_J_PER_BIT = 5e-7`` (0.5 uJ per bit, charged for every bit sent and every bit received): measured
  802.11b/g on handheld devices lies at about 0.3-0.65 uJ/bit (Aalborg University mobile-device measurements,
  E_bit = 6.45e-7 - 1.27e-10 (rate_kbps - 2130) J/bit for 2-5 Mbit/s downloads) and 0.42-1.09 uJ/bit (Barr and
  Asanovic, MobiSys 2003: one bit costs 485-1267 ADDs of 0.86 nJ on an 11 Mb/s card).
- ``COMPUTE_J_PER_FLOP = 2.3e-12``: a 32-bit float multiply (3.7 pJ) plus add (0.9 pJ) per two FLOPs in 45 nm
  (Horowitz, "Computing's energy problem", ISSCC 2014). Arithmetic only, so a lower bound: memory traffic costs more.

FLOPs: the forward pass counts 2 x multiply-accumulates of every convolution and linear layer (hooks on a real
forward pass); a training sample costs 3 x forward (forward, and a backward pass of about twice the forward).
"""

from __future__ import annotations

import torch

RADIO_J_PER_BIT = 5e-7
COMPUTE_J_PER_FLOP = 2.3e-12


def forward_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of one sample (2 x the MACs of conv and linear layers)."""
    total = 0

    def conv(mod: torch.nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total += 2 * k * out.numel()

    def linear(mod: torch.nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * mod.in_features * out.numel()

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def node_energy(
    bits_sent: float,
    bits_received: float,
    train_samples: float,
    flops_per_sample: float,
    j_per_bit: float = RADIO_J_PER_BIT,
    j_per_flop: float = COMPUTE_J_PER_FLOP,
) -> dict[str, float]:
    """Energy of one node in joules: radio (sent + received bits), compute (3 x forward FLOPs per sample)."""
    if j_per_bit < 0 or j_per_flop < 0:
        raise ValueError(f"energy costs must be >= 0, got {j_per_bit} J/bit and {j_per_flop} J/FLOP")
    radio = (bits_sent + bits_received) * j_per_bit
    compute = 3.0 * flops_per_sample * train_samples * j_per_flop
    return {"energy_radio_j": radio, "energy_compute_j": compute, "energy_j": radio + compute}
