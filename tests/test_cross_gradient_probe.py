"""simulations/cross_gradient_probe.py: bad seeds are refused with what to type (its swap and in-neighbour are
tested in tests/test_gradient_swap.py)."""

import pytest
from flower_sparsepush.simulations.cross_gradient_probe import main


def test_bad_seeds_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "zero"])
    assert "comma-separated whole numbers" in capsys.readouterr().err
