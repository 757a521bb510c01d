"""`sparsepush demo` writes table.json with the fields the README and docs read; no training (simulate is stubbed)."""

import argparse
import json
from pathlib import Path

from flower_sparsepush.flower import launch

BITS = {"sparse-push": 400_000, "sgp": 100_000_000, "fedavg": 100_000_000}


def fake_simulate(raw):
    cfg = launch.validate(raw)
    out = Path(cfg.out_dir) / cfg.run_name
    out.mkdir(parents=True, exist_ok=True)
    acc = {"sparse-push": 0.85, "sgp": 0.86, "fedavg": 0.87}[cfg.strategy]
    summary = {"final": {"acc_consensus": acc, "acc_node_mean": acc - 0.01}, "bits_sent_per_node": BITS[cfg.strategy]}
    (out / "summary.json").write_text(json.dumps(summary | {"wall_s": 1.0}))
    return out


def test_demo_table_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "simulate", fake_simulate)
    monkeypatch.setattr(launch, "check_data", lambda cfg: None)
    parser = argparse.ArgumentParser()
    launch.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["demo", "--out-dir", str(tmp_path), "--engine", "simulation"])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "demo" / "table.json").read_text())
    assert [r["strategy"] for r in rows] == ["sparse-push", "sgp", "fedavg"]
    for r in rows:
        assert {"strategy", "acc_consensus", "acc_node_mean", "reduction_vs_sgp", "accuracy"} <= set(r)
        assert r["accuracy"] == r["acc_consensus"]  # the old name, kept
    assert rows[0]["reduction_vs_sgp"] == 250.0 and rows[1]["reduction_vs_sgp"] == 1.0
    table = (tmp_path / "demo" / "table.md").read_text()
    assert "| sparse-push |" in table and "250.0x" in table
