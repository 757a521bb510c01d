"""Presets (run/presets.py): each is the claims row the validation split chose, on the claims' schedule; a preset is
usable from every entry point; keys given explicitly win; a command line cannot silently lose one of its keys."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from flower_sparsepush.simulations.claims_plan import ROWS, SCHEDULES, plan

from flower_sparsepush.run.config import KEYS, ConfigError, validate
from flower_sparsepush.run.presets import PRESETS, claims_rounds, preset_of_row

ROOT = Path(__file__).resolve().parent.parent
# keys a claims run sets for its own bookkeeping, not part of what a preset chooses
BOOKKEEPING = {"run-name", "eval-node-samples", "device", "preset", "partition", "seed", "out-dir"}


def _row_config(name: str) -> dict:
    """The run config the claims run for row ``name`` on Fashion-MNIST (IID, or its first partition), seed 0,
    validated, with the rounds of its 20-epoch schedule (computed as claims_plan.run_config does, without data)."""
    spec = next(p for p in plan(["fashion_mnist"], False, (0,)) if p["name"] == name)
    cfg = dict(spec["cfg"])
    return validate(cfg | {"num-rounds": claims_rounds(cfg.get("local-steps", 1))}).as_dict()


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_equals_its_claims_row(name):
    preset = PRESETS[name]
    assert preset.row in ROWS
    got = validate({"preset": name}).as_dict()
    want = _row_config(preset.row)
    diff = {k: (got[k], want[k]) for k in KEYS if k not in BOOKKEEPING and got[k] != want[k]}
    assert diff == {}
    assert got["run-name"] == f"{name}-s0"


def test_claims_rounds_match_the_claims_schedule():
    """The rounds presets compute without data are what claims_plan.run_config computes from the data set's size
    (the journal's 528 rounds for 4 local steps)."""
    sched = SCHEDULES["fashion_mnist"]
    assert sched["epochs"] == 20 and sched["val-split"] == 0.1 and sched["num-nodes"] == 16
    assert claims_rounds(4) == 528 and claims_rounds(1) == 2110
    journal = ROOT / "results" / "claims_rows.jsonl"
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    seen = {(r["local_steps"], r["rounds"]) for r in rows if r["dataset"] == "fashion_mnist" and r["epochs"] == 20}
    assert seen and all(rounds == claims_rounds(h) for h, rounds in seen)


def test_each_goal_names_the_preset_of_its_chosen_row():
    """results/claims.json's goals were chosen on the validation split. Each goal names the preset that runs its
    chosen row; every goal that is met, and every label-skew goal met or not, has one; and every goal preset is
    some goal's chosen row, except scsp-400x, the plain-loss SCSP row the drop-in runs (docs/dropin.md). So the
    claims table and the presets cannot drift apart."""
    goals = json.loads((ROOT / "results" / "claims.json").read_text())["goals"]
    with_row = [g for g in goals if "row" in g]
    assert {g["partition"] for g in with_row} == {"iid", "skew:0.8", "dirichlet:0.1"}
    for g in with_row:
        assert g["preset"] == preset_of_row(g["row"]), g
        if g["met"] or g["partition"] != "iid":
            assert g["preset"] in PRESETS and PRESETS[g["preset"]].row == g["row"], g
    chosen = {g["row"] for g in with_row}
    unchosen = {name for name, p in PRESETS.items() if p.group and p.row not in chosen}
    assert unchosen <= {"scsp-400x"}, unchosen


def test_explicit_keys_override_the_preset():
    cfg = validate({"preset": "sp-466x", "gamma": 0.2, "num-rounds": 10, "dataset": "synthetic", "model": "mlp"})
    assert (cfg.gamma, cfg.num_rounds, cfg.dataset) == (0.2, 10, "synthetic")
    assert cfg.gradient_lookahead == 0.5 and cfg.final_merge and cfg.sparsity_schedule == "lr"
    # a key at its default counts as not given: Flower's run config carries every key (pyproject declares them)
    flower_like = {k: spec.default for k, spec in KEYS.items()} | {"preset": "sp-466x"}
    assert validate(flower_like).as_dict() == validate({"preset": "sp-466x"}).as_dict()


def test_a_command_line_cannot_set_a_preset_key_back_to_its_default():
    with pytest.raises(ConfigError, match="gradient-lookahead.*preset=sp-466x.*counts as not given"):
        validate({"preset": "sp-466x", "gradient-lookahead": "0"}, explicit=True)
    validate({"preset": "sp-466x", "gradient-lookahead": "0.3"}, explicit=True)  # another value is fine
    validate({"preset": "sp-466x", "gradient-lookahead": "0.5"}, explicit=True)  # the preset's own value too


def test_unknown_preset_refused_with_the_names():
    with pytest.raises(ConfigError, match="preset='sp-500x'.*sgp, sp-466x, sp-1000x, scsp-400x, scsp-400x-adj, paper"):
        validate({"preset": "sp-500x"})


def test_preset_reaches_every_entry_point(tmp_path, capsys):
    """``sparsepush train --preset``, ``python -m flower_sparsepush.run.inprocess preset=...`` and Flower's run
    config (pyproject declares the key) all take it."""
    import argparse

    from flower_sparsepush.flower.launch import register
    from flower_sparsepush.run.inprocess import main

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared["preset"] == ""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train", "--preset", "sp-466x", "--gradient-lookahead", "0"])
    assert args.func(args) == 2
    assert "counts as not given" in capsys.readouterr().err
    argv = ["preset=sgp", "dataset=synthetic", "model=mlp", "num-nodes=4", "num-rounds=2", f"out-dir={tmp_path}"]
    assert main(argv) == 0
    written = json.loads((tmp_path / "sgp-s0" / "config.json").read_text())
    assert written["preset"] == "sgp" and written["strategy"] == "sgp" and written["lr-schedule"] == "cosine"


# each preset on a small model: the preset's switches, the small problem's size (and a schedule short enough to
# reach the presets' periodic merge and final gossip rounds)
SMALL = {"dataset": "synthetic", "model": "mlp", "num-nodes": 4, "num-rounds": 4, "batch-size": 16, "seed": 3}
SHRINK = {"paper": {"final-gossip-rounds": 2}}


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_through_flower_equals_the_inprocess_loop(tmp_path, name):
    """Flower's simulation engine runs every preset, merges and schedules included, to the models the in-process
    loop computes (bit for bit under the nodes' thread count), with the same bits and exact mass."""
    import numpy as np
    import torch

    from flower_sparsepush.flower.launch import simulate
    from flower_sparsepush.run.inprocess import run_inprocess
    from flower_sparsepush.run.node_train import node_threads, torch_threads

    over = SMALL | SHRINK.get(name, {}) | {"save-nodes": True, "eval-every": 2, "out-dir": str(tmp_path)}
    cfg = validate({"preset": name} | over | {"run-name": "fl"})
    assert cfg.preset == name and cfg.strategy == PRESETS[name].keys["strategy"]
    out = simulate(cfg)
    with torch_threads(node_threads()):
        ref = run_inprocess(cfg.replace(run_name="in"), eval_every=cfg.eval_every)
    nodes = np.load(out / "nodes.npz")
    for i, state in enumerate(ref.states):
        np.testing.assert_array_equal(nodes[f"z{i}"], state.z.to(torch.float32).numpy())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bits_sent_by_node"] == ref.bits_sent
    final = summary["final"]
    assert final["acc_consensus"] == pytest.approx(ref.history[-1]["acc_consensus"], abs=1e-9)
    if cfg.final_merge:  # one model everywhere at the end
        assert all(np.array_equal(nodes["z0"], nodes[f"z{i}"]) for i in range(cfg.num_nodes))
