"""Global merges on the Flower path (the nodes compute them, the relay routes their messages: merge_steps.py)
against the in-process loop, which runs the same node code: models bit for bit (in-process under the nodes' thread
count), bits identical, the mass exact with a node offline or late at a merge, and a resume that falls between a
merge's message rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flower_sparsepush.flower.launch import simulate
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import node_threads, torch_threads
from flower_sparsepush.run.results import read_metrics
from flower_sparsepush.run.setup import network_of

TINY = {
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 4,
    "graph": "exponential",
    "num-rounds": 4,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.9,
    "eval-every": 1,
    "save-nodes": True,
    "seed": 3,
    "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4",
    "gamma": 0.3,
}
CASES = {
    "exact-final": {"final-merge": True},
    "8bit-final": {"final-merge": True, "merge-bits": 8},
    # checkpoints too: the resume test below cuts this run between two of a merge's message rounds
    "4bit-feedback-periodic": {
        "merge-every": 2,
        "final-merge": True,
        "merge-bits": 4,
        "merge-feedback": True,
        "checkpoint-every": 1,
    },  # fmt: skip
    "periodic-displacement": {
        "merge-every": 2,
        "merge-bits": 8,
        "drift-correction": "displacement",
        "num-rounds": 5,
    },  # fmt: skip
    # seed 6, churn 0.25: node 3 is offline at the merge after round 2, nodes 0 and 1 at the final one
    "churn": {"merge-every": 2, "final-merge": True, "merge-bits": 8, "churn": 0.25, "seed": 6},
}
SKIP = {"wall_s"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: (config, results folder) of the Flower run of ``CASES[name]``, simulated once per module."""
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            out_dir = str(tmp_path_factory.mktemp(name))
            cfg = validate(TINY | CASES[name] | {"out-dir": out_dir, "run-name": "fl"})
            done[name] = cfg, simulate(cfg)
        return done[name]

    return get


def _mass(row) -> float:
    return row["y_nodes"] + row.get("y_pending", 0.0) + row["y_mailboxes"]


@pytest.mark.parametrize("name", list(CASES))
def test_flower_merges_equal_the_inprocess_ones(runs, name):
    cfg, out = runs(name)
    with torch_threads(node_threads()):  # the nodes' thread count: the same float order, bit for bit
        ref = run_inprocess(cfg.replace(run_name="in", checkpoint_every=0), eval_every=1)
    nodes = np.load(out / "nodes.npz")
    for i, state in enumerate(ref.states):
        np.testing.assert_array_equal(nodes[f"z{i}"], state.z.to(torch.float32).numpy())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bits_sent_by_node"] == ref.bits_sent
    assert summary["bits_received_by_node"] == ref.bits_received
    # the relay's weight ledger followed every merge: no reply refused, no reported weight overruled
    assert summary["rejected_replies"] == [] and summary["weight_corrections"] == []
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [r["round"] for r in ref.history] == list(range(1, cfg.num_rounds + 1))
    for a, b in zip(rows, ref.history):  # one row per training round, the merges' message rounds in none
        assert a["consensus_distance"] == pytest.approx(b["consensus_distance"], abs=1e-9)
        assert a["acc_consensus"] == pytest.approx(b["acc_consensus"], abs=1e-9)
        assert a["bits_sent_per_node"] == b["bits_sent_per_node"]
        assert _mass(a) == pytest.approx(cfg.num_nodes, abs=1e-9)
    merged = [t for t in range(1, cfg.num_rounds + 1) if (cfg.merge_every and t % cfg.merge_every == 0)]
    merged += [cfg.num_rounds] if cfg.final_merge else []
    if name != "churn":  # every node merged: one model everywhere, after the models trained apart
        assert all(rows[t - 1]["consensus_distance"] == pytest.approx(0.0, abs=1e-12) for t in merged)
        assert rows[0]["consensus_distance"] > 1e-4


def test_a_node_offline_at_a_merge_keeps_its_mass_and_the_others_merge(runs):
    cfg, out = runs("churn")
    net = network_of(cfg)
    assert not net.online(1, 3) and not net.online(3, 0) and not net.online(3, 1)  # the case this run is about
    nodes = np.load(out / "nodes.npz")
    np.testing.assert_array_equal(nodes["z2"], nodes["z3"])  # the final merge's participants share one model
    assert np.abs(nodes["z0"] - nodes["z2"]).max() > 1e-4  # the offline ones keep theirs
    rows = read_metrics(out / "metrics.jsonl")
    assert all(_mass(r) == pytest.approx(cfg.num_nodes, abs=1e-9) for r in rows)
    assert rows[1]["consensus_distance"] > 0  # node 3 missed the merge after round 2


def test_a_lost_give_reply_and_a_refused_average_lose_no_mass(tmp_path):
    """Merge after round 2: node 2 gives (its state is saved) but its reply is lost, so the others merge without it;
    node 2 takes back what it gave, is handed the messages in flight again (absorbed once) and learns the new base.
    Merge after round 4: node 0's averages carry a weight that is not the participants' mean: refused, the merge is
    called off and every node keeps its model. The mass is exact throughout."""
    from dataclasses import replace

    from flwr.app import Error, Message

    from flower_sparsepush.core.codec import decode, encode
    from flower_sparsepush.flower.protocol import pack_frames, unpack_frames

    def hostile(msg, context, call_next):
        reply = call_next(msg, context)
        merge = msg.content.get("merge") if msg.metadata.message_type == "train" else None
        node = int(context.node_config["partition-id"])
        if merge is not None and (merge["phase"], merge["round"], node) == ("give", 1, 2):
            return Message(Error(code=0, reason="reply lost on the way"), reply_to=msg)
        if merge is not None and (merge["phase"], merge["round"], node) == ("reduce", 3, 0):
            out = reply.content["merge"]
            frames = unpack_frames(out["frames"])
            out["frames"] = pack_frames([(k, encode(replace(decode(d), y=1.5 * decode(d).y))) for k, d in frames])
        return reply

    cfg = validate(TINY | CASES["8bit-final"] | {"merge-every": 2, "out-dir": str(tmp_path), "run-name": "hostile"})
    out = simulate(cfg, client_mods=[hostile])
    summary = json.loads((out / "summary.json").read_text())
    assert [e["node"] for e in summary["straggler_events"]] == [2, 0]
    assert [(r["node"], r["kind"]) for r in summary["rejected_replies"]] == [(0, "weight")]
    assert summary["weight_corrections"] == []  # the lost give: the ledger counts its batch absorbed once
    rows = read_metrics(out / "metrics.jsonl")
    assert all(_mass(r) == pytest.approx(cfg.num_nodes, abs=1e-9) for r in rows)
    assert rows[1]["consensus_distance"] > 1e-6  # node 2 was left out of the merge after round 2
    assert rows[3]["consensus_distance"] > 1e-6  # the merge after round 4 was called off
    assert summary["mass"]["y_nodes"] == pytest.approx(cfg.num_nodes, abs=1e-9)  # nothing left in flight


def test_a_resume_between_a_merges_message_rounds_equals_an_uninterrupted_run(runs, monkeypatch):
    """The run stops in the reduce phase of the merge after round 4 (the nodes have given); it resumes from the
    checkpoint of round 3, every node back to its copy of that round, and ends as the uninterrupted run."""
    cfg, full = runs("4bit-feedback-periodic")
    from flower_sparsepush.strategies.merge_steps import MergeSteps

    real = MergeSteps.aggregate_merge

    def die_in_reduce(self, phase, t, server_round, replies):
        if phase == "reduce" and t == 3:
            raise RuntimeError("killed between the give and the take of the merge after round 4")
        return real(self, phase, t, server_round, replies)

    monkeypatch.setattr(MergeSteps, "aggregate_merge", die_in_reduce)
    cut = cfg.replace(run_name="cut")
    with pytest.raises(RuntimeError):
        simulate(cut)
    assert [r["round"] for r in read_metrics(full.parent / "cut" / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(MergeSteps, "aggregate_merge", real)
    resumed = simulate(cut.replace(resume=True))
    strip = [{k: v for k, v in r.items() if k not in SKIP} for r in read_metrics(resumed / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in SKIP} for r in read_metrics(full / "metrics.jsonl")]
    a, b = np.load(full / "nodes.npz"), np.load(resumed / "nodes.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_round"] == 3
    assert summary["mass"]["y_nodes"] == pytest.approx(cfg.num_nodes, abs=1e-9)
