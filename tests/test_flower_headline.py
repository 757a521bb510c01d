"""The headline script (simulations/flower_headline.py) on a tiny schedule: both paths run the same config and land
on the same accuracies and bits (the full-schedule results are results/flower_headline*.json)."""

from __future__ import annotations

import json

from flower_sparsepush.simulations.flower_headline import main


def test_headline_on_a_tiny_schedule(tmp_path):
    journal = tmp_path / "journal.jsonl"
    row = {"id": "fashion_mnist/iid/sgp/s0", "name": "sgp", "bits_per_node": 1e9}
    journal.write_text(json.dumps(row) + "\n")
    sets = ["dataset=synthetic", "model=mlp", "num-nodes=4", "num-rounds=3", "val-split=0"]
    argv = ["--preset", "sgp", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), "--journal", str(journal)]
    argv += [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "flower_headline_sgp.json").read_text())  # only sp-466x writes the bare name
    fl, ip = res["flower"], res["inprocess"]
    for key in ("acc_consensus", "acc_node_mean", "acc_node_min", "bits_per_node", "reduction_vs_sgp"):
        assert abs(fl[key] - ip[key]) <= 1e-9 * max(1.0, abs(ip[key])), key
    assert res["bits_equal"] and res["max_abs_diff_points"] < 1e-6
    assert fl["reduction_vs_sgp"] == 1e9 / fl["bits_per_node"] and fl["wall_s"] > 0
    assert res["config"]["strategy"] == "sgp" and res["config"]["lr-schedule"] == "cosine"  # the preset's
    assert res["config"]["eval-every"] == 3  # one evaluation, after the last round
