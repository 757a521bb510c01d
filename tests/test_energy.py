"""Energy accounting: FLOP counts of known layers, and the radio/compute split."""

import pytest
import torch

from flower_sparsepush.core.energy import forward_flops, node_energy
from flower_sparsepush.learn.models import build_model


def test_linear_and_conv_flops_match_hand_counts():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    assert forward_flops(lin, (3, 2, 2)) == 2 * 12 * 5
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert forward_flops(conv, (3, 10, 10)) == 2 * (3 * 3 * 3) * (8 * 10 * 10)


def test_resnet20_forward_flops_are_about_41_mflops():
    # He et al. 2016 ResNet-20 on 32x32: about 41M multiply-adds (82 MFLOPs), a figure widely quoted for it
    flops = forward_flops(build_model("resnet20", 10, 3), (3, 32, 32))
    assert 2 * 38e6 < flops < 2 * 44e6


def test_node_energy_adds_radio_and_compute():
    e = node_energy(
        bits_sent=1e6, bits_received=3e6, train_samples=100, flops_per_sample=1e6, j_per_bit=1e-6, j_per_flop=1e-9
    )
    assert e["energy_radio_j"] == pytest.approx(4.0)
    assert e["energy_compute_j"] == pytest.approx(0.3)
    assert e["energy_j"] == pytest.approx(4.3)
    with pytest.raises(ValueError, match="energy costs"):
        node_energy(1, 1, 1, 1, j_per_bit=-1)
