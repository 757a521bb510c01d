"""The claims table: a --quick run journals every run, reports progress, resumes, and aggregates over seeds; the
goals read the candidate that the validation split chose."""

import argparse
import json

import pytest
from flower_sparsepush.simulations import claims, claims_plan, claims_report

from flower_sparsepush.learn import data


def _fmnist_present() -> bool:
    try:
        data.find_data("fashion_mnist")
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _fmnist_present(), reason="Fashion-MNIST is not installed (make data)")
def test_quick_claims_run_journals_reports_progress_and_resumes(tmp_path):
    args = argparse.Namespace(quick=True, datasets="fashion_mnist", rows="sgp", seeds="0", rerun=False,
                              jobs=1, device="cpu", max_hours=0.0, evals=1, out=str(tmp_path))  # fmt: skip
    assert claims.main(args) == 0
    assert len((tmp_path / "claims_quick_rows.jsonl").read_text().splitlines()) == 3  # sgp on 3 partitions
    args.rows = "sgp,sp-h4-merge"  # a later chunk: sgp is in the journal, only sp-h4-merge runs
    assert claims.main(args) == 0
    journal = (tmp_path / "claims_quick_rows.jsonl").read_text().splitlines()
    assert len(journal) == 4
    status = json.loads((tmp_path / "claims_quick.status.json").read_text())
    assert (status["done"], status["total"], status["finished"]) == (4, 4, True)
    args.rows = "sp-h4-merge"  # the table keeps every run of the journal, not only this call's rows
    assert claims.main(args) == 0
    assert {r["name"] for r in json.loads((tmp_path / "claims_quick.json").read_text())["rows"]} == {
        "sgp",
        "sp-h4-merge",
    }
    result = json.loads((tmp_path / "claims_quick.json").read_text())
    assert result["seeds"] == [0]
    row = next(r for r in result["rows"] if r["name"] == "sp-h4-merge")
    assert row["switches"]["final-merge"] is True and row["local_steps"] == 4
    for key in ("acc_consensus_std", "acc_node_mean_std", "acc_node_min_std", "val_acc_consensus"):
        assert key in row
    assert row["acc_node_min"] == row["acc_node_mean"]  # after the merge every node holds the same model
    assert row["reduction_vs_sgp"] > 1
    assert (tmp_path / "claims_quick_fashion_mnist.png").stat().st_size > 0
    assert claims.main(args) == 0  # resumed: nothing new is run
    assert (tmp_path / "claims_quick_rows.jsonl").read_text().splitlines() == journal


def _run(name, group, seed, acc, val, bits, part="iid"):
    return {"dataset": "fashion_mnist", "model": "cnn", "partition": part, "name": name, "group": group,
            "switches": {}, "strategy": "sparse-push", "compressor": "x", "gamma": 0.1, "form": "ref", "nodes": 16,
            "graph": "exponential", "epochs": 20, "rounds": 1, "local_steps": 1, "batch_size": 32, "val_split": 0.1,
            "seed": seed, "acc_consensus": acc, "acc_node_mean": acc, "acc_node_min": acc - 0.001,
            "val_acc_consensus": val, "val_acc_node_mean": val, "val_acc_node_min": val, "bits_per_node": bits,
            "consensus_distance": 0.0, "wall_s": 1.0, "energy_j": 1.0}  # fmt: skip


def test_the_validation_split_chooses_and_the_goal_reads_the_test_accuracy_of_that_choice():
    runs = []
    for seed in (0, 1, 2):
        runs.append(_run("sgp", "baseline", seed, 0.92, 0.92, 1000.0))
        runs.append(_run("a", "466x", seed, 0.915, 0.90, 2.0))  # better on test, worse on validation
        runs.append(_run("b", "466x", seed, 0.905, 0.91, 2.0))
        runs.append(_run("c", "466x", seed, 0.99, 0.99, 10.0))  # best, but only 100x: not a candidate
    rows = claims_report.aggregate(runs)
    chosen = [r["name"] for r in rows if r.get("chosen") == "466x"]
    assert chosen == ["b"]
    goal = next(g for g in claims_report.goals(rows) if g["goal"].startswith(">= 466x"))
    assert goal["row"] == "b" and goal["worst_delta_points"] == pytest.approx(-1.5)
    assert goal["met"] is False and goal["reduction_vs_sgp"] == pytest.approx(500)
    b = next(r for r in rows if r["name"] == "b")
    assert b["seeds"] == [0, 1, 2] and b["acc_consensus_std"] == 0.0
    # a candidate run on one seed does not displace one run on three, however well its seed went
    one_seed = claims_report.aggregate([*runs, _run("d", "466x", 0, 0.95, 0.95, 2.0)])
    assert [r["name"] for r in one_seed if r.get("chosen") == "466x"] == ["b"]
    alone = claims_report.aggregate(
        [_run("sgp", "baseline", 0, 0.92, 0.92, 1000.0), _run("d", "466x", 0, 0.95, 0.95, 2.0)]
    )
    assert [r["name"] for r in alone if r.get("chosen") == "466x"] == ["d"]  # among one-seed rows it still counts
    md = claims_report.render_md({"command": "c", "rows": rows, "goals": claims_report.goals(rows)})
    assert "- >= 466x within 1 point(s) of SGP (iid): not met (row b, preset none, 500x" in md
    assert md.endswith("- `sgp`: Sparse-Push, H = 1\n") and "\n\n### Row names\n\nA row's name abbreviates" in md


def test_the_legend_says_each_row_name_in_words():
    for name in claims_plan.ROWS:  # every row reads as its strategy, then its switches
        assert claims_plan.explain_row(name).startswith(
            ("SGP, H = ", "FedAvg, H = ", "Sparse-Push, H = ", "SCSP, H = ")
        )
    assert claims_plan.explain_row("sp-h4-m8e88") == (
        "Sparse-Push, H = 4, top-0.75% + 4-bit values, gamma 0.1, 8-bit merges every 88 rounds, a final 8-bit merge"
    )
    assert claims_plan.explain_row("sp-h4-klr-fg100") == (
        "Sparse-Push, H = 4, top-2% + 4-bit values, gamma 0.1, the kept fraction following the lr, "
        "100 final gossip-only rounds"
    )
    assert claims_plan.explain_row("abl-dense-g0.1-la5") == (
        "Sparse-Push, H = 4, no compression, gamma 0.1, a final exact merge, gradient lookahead 0.5"
    )
    assert claims_plan.explain_switches({"strategy": "scsp", "local-steps": 2, "qgm": True}) == (
        "SCSP, H = 2, quasi-global momentum"
    )


def test_every_row_is_planned_once_and_its_switches_are_a_valid_run_config():
    from flower_sparsepush.run.config import validate

    assert sorted(claims_plan.PRIORITY) == sorted(claims.ROWS)  # a row missing from the run order would never run
    assert len(set(claims_plan.PRIORITY)) == len(claims_plan.PRIORITY)
    for spec in claims.plan(["fashion_mnist"], quick=False, seeds=(0,)):
        validate(spec["cfg"] | {"num-rounds": 10})  # a bad switch fails here, not hours into a chunk


def test_main_journals_each_run_once_and_resumes_without_running_again(tmp_path, monkeypatch):
    """The run loop with the training stubbed out: every planned run is journaled once, a second call runs nothing,
    and the table holds the journal's runs."""
    calls = []

    def fake_run(spec, command, device="cpu", ckpt=None):
        calls.append(spec["id"])
        acc = 0.9 if spec["name"] == "sgp" else 0.89
        return _run(spec["name"], spec["group"], spec["cfg"]["seed"], acc, acc, 100.0, spec["cfg"]["partition"]) | {
            "id": spec["id"], "switches": spec["switches"], "epochs": spec["epochs"], "command": command}  # fmt: skip

    monkeypatch.setattr(claims, "run_row", fake_run)
    args = argparse.Namespace(quick=True, datasets="fashion_mnist", rows="sgp,sp-h4-merge", seeds="0,1", rerun=False,
                              jobs=1, device="cpu", max_hours=0.0, evals=0, out=str(tmp_path))  # fmt: skip
    assert claims.main(args) == 0
    assert len(calls) == 8  # sgp on 3 partitions and sp-h4-merge on iid, 2 seeds each
    journal = (tmp_path / "claims_quick_rows.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in journal) == sorted(calls)
    assert claims.main(args) == 0 and len(calls) == 8  # resumed: nothing runs again
    md = (tmp_path / "claims_quick.md").read_text()
    assert "| iid | sp-h4-merge | 466x |" in md and "- `sp-h4-merge`: Sparse-Push, H = 4, top-1.2%" in md
    with pytest.raises(ValueError, match="unknown claims row"):
        claims.main(argparse.Namespace(**(vars(args) | {"rows": "nope"})))


def test_another_model_or_schedule_needs_its_own_out_and_its_command_says_so(tmp_path, monkeypatch):
    """--model runs the same rows on another model (the paper's VGG-11); run ids name neither model nor epochs, so a
    journal that holds a run under another model or schedule refuses the call instead of taking it as done."""
    seen = []

    def fake_run(spec, command, device="cpu", ckpt=None):
        seen.append((spec["cfg"]["model"], spec["epochs"], command))
        return _run(spec["name"], spec["group"], 0, 0.5, 0.5, 100.0, spec["cfg"]["partition"]) | {
            "id": spec["id"], "model": spec["cfg"]["model"], "epochs": spec["epochs"], "command": command}  # fmt: skip

    monkeypatch.setattr(claims, "run_row", fake_run)
    base = dict(quick=True, datasets="fashion_mnist", rows="sgp", seeds="0", rerun=False, jobs=1, device="cpu",
                max_hours=0.0, evals=0, epochs=0.0, model="", out=str(tmp_path / "cnn"))  # fmt: skip
    assert claims.main(argparse.Namespace(**base)) == 0
    assert {m for m, _, _ in seen} == {"cnn"} and len(seen) == 3
    for change in ({"model": "mlp"}, {"epochs": 0.3}, {"model": "mlp", "rerun": True}):
        with pytest.raises(ValueError, match="holds fashion_mnist/iid/sgp/s0 with model cnn at 0.1 epochs.*own --out"):
            claims.main(argparse.Namespace(**(base | change)))
    assert len(seen) == 3  # refused before anything ran
    with pytest.raises(ValueError, match="--model 'vgg'"):
        claims.main(argparse.Namespace(**(base | {"model": "vgg", "out": str(tmp_path / "x")})))
    assert claims.main(argparse.Namespace(**(base | {"model": "mlp", "out": str(tmp_path / "mlp")}))) == 0
    assert seen[3:] == [("mlp", 0.1, "sparsepush claims --quick --model mlp --datasets fashion_mnist --rows sgp")] * 3
    table = json.loads((tmp_path / "mlp" / "claims_quick.json").read_text())
    assert {r["model"] for r in table["rows"]} == {"mlp"}
    assert table["rows"][0]["command"] == seen[3][2]  # the table's command regenerates this model's row


def test_a_run_cut_off_midway_resumes_to_the_journal_entry_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """A claims run (here sp-466x's row, with its final merge, on a short schedule) that stopped after its second
    checkpoint continues from that checkpoint and writes the entry an uninterrupted run writes: accuracies, bits,
    every evaluation of its history."""
    from flower_sparsepush.run.inprocess import run_inprocess

    monkeypatch.setattr(claims, "CHECKPOINTS", 3)
    spec = next(s for s in claims_plan.plan(["fashion_mnist"], True, (0,)) if s["id"].endswith("iid/sp-h4-klr-la5/s0"))
    spec = spec | {"epochs": 0.15, "evals": 2, "cfg": spec["cfg"] | {"num-nodes": 8}}
    whole = claims.run_row(spec, "c")
    ckpt = claims.checkpoint_dir(tmp_path, spec["id"])
    cfg = claims.resumable(claims_plan.run_config(spec), ckpt)
    every = cfg.checkpoint_every
    assert every >= 2 and cfg.num_rounds > 2 * every + 1
    # the process that ran it was stopped one round after its second checkpoint (before the final merge)
    run_inprocess(cfg, num_rounds=2 * every + 1, eval_every=claims.eval_every(spec, cfg))
    resumed = claims.run_row(spec, "c", ckpt=ckpt)
    assert resumed["resumed_from_round"] == 2 * every and whole["resumed_from_round"] == 0
    strip = ("wall_s", "resumed_from_round")
    assert {k: v for k, v in resumed.items() if k not in strip} == {k: v for k, v in whole.items() if k not in strip}
    assert len(whole["history"]) >= 2 and whole["bits_per_node"] > 0
