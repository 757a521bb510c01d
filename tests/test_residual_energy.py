"""simulations/residual_energy.py: the energy shares it reports are right on vectors whose answer is known, and bad
input is refused with what to do."""

import pytest
import torch
from flower_sparsepush.simulations.residual_energy import gaussian_topk_energy, lowrank_energy, main, topk_energy


def test_topk_energy_on_known_vectors():
    spike = torch.zeros(1000)
    spike[17] = -3.0
    assert topk_energy(spike, 0.001) == 1.0  # all the energy in one entry
    assert topk_energy(torch.ones(1000), 0.01) == pytest.approx(0.01)  # flat: the share kept is the share sent
    assert topk_energy(torch.ones(1000), 0.0101) == pytest.approx(0.011)  # ceil(10.1) = 11 entries
    with pytest.raises(ValueError, match="kept fraction"):
        topk_energy(spike, 0.0)
    with pytest.raises(ValueError, match="zero"):
        topk_energy(torch.zeros(10), 0.5)


@pytest.mark.parametrize("fraction", [0.005, 0.012, 0.05])
def test_gaussian_reference_matches_a_sampled_gaussian(fraction):
    v = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert gaussian_topk_energy(fraction) == pytest.approx(topk_energy(v, fraction), rel=0.02)
    assert gaussian_topk_energy(fraction) > fraction  # the largest entries carry more than their share


def test_lowrank_energy_is_exact_on_a_rank_one_matrix_and_grows_with_the_rank():
    g = torch.Generator().manual_seed(1)
    u, w, b = torch.randn(6, generator=g), torch.randn(20, generator=g), torch.randn(6, generator=g)
    v = torch.cat([torch.outer(u, w).reshape(-1), b])
    kept, values = lowrank_energy(v, [(6, 20), (6,)], 1)
    assert kept == pytest.approx(1.0) and values == 6 + 20 + 6  # the factors and the bias, sent whole
    noise = torch.randn(6 * 20 + 6, generator=g)
    shares = [lowrank_energy(noise, [(6, 4, 5), (6,)], r)[0] for r in (1, 2, 4)]  # 3-D: reshaped to 6 x 20
    assert shares[0] < shares[1] < shares[2] < 1.0
    with pytest.raises(ValueError, match="shapes cover"):
        lowrank_energy(noise, [(6, 20)], 1)


@pytest.mark.parametrize(("arg", "msg"), [("40,x", "whole numbers"), ("0", "1 or more"), ("600", "1..528")])
def test_bad_rounds_are_refused_before_any_training(arg, msg, tmp_path):
    with pytest.raises(SystemExit, match=msg):
        main(["--rounds", arg, "--out", str(tmp_path)])
