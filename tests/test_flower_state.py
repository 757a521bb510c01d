"""Node state that survives on the Flower path: checkpoint and resume, and a lost train reply that loses no mass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flower_sparsepush.flower.launch import simulate
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.results import read_metrics

RUN = {
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 4,
    "graph": "exponential",
    "num-rounds": 4,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.9,
    "lr-schedule": "cosine",
    "eval-every": 1,
    "save-nodes": True,
    "seed": 5,
    "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4",
    "gamma": 0.3,
}
SKIP = {"wall_s"}  # wall-clock time is the one field a resumed run may not repeat


def _rows(out):
    return [{k: v for k, v in r.items() if k not in SKIP} for r in read_metrics(out / "metrics.jsonl")]


def test_resumed_flower_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from flower_sparsepush.flower import server_app

    cfg = RUN | {"checkpoint-every": 2, "out-dir": str(tmp_path)}
    full = simulate(validate(cfg | {"run-name": "full"}))

    real = server_app.save_flower_checkpoint

    def save_then_die(c, done, strategy, history):  # killed right after the checkpoint of round 2
        real(c, done, strategy, history)
        if done == 2:
            raise RuntimeError("killed after round 2")

    monkeypatch.setattr(server_app, "save_flower_checkpoint", save_then_die)
    with pytest.raises(RuntimeError):
        simulate(validate(cfg | {"run-name": "cut"}))
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 2  # rounds 1-2 done, 3-4 never ran
    monkeypatch.setattr(server_app, "save_flower_checkpoint", real)
    resumed = simulate(validate(cfg | {"run-name": "cut", "resume": True}))
    assert _rows(resumed) == _rows(full)  # every metric of every round, to the last digit
    a, b = np.load(full / "nodes.npz"), np.load(resumed / "nodes.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_round"] == 2
    # the relay's weight ledger came back with the checkpoint: every node's weight checked, none refused
    assert summary["rejected_replies"] == [] and summary["weight_corrections"] == []
    assert summary["bits_sent_by_node"] == json.loads((full / "summary.json").read_text())["bits_sent_by_node"]


def test_a_lost_train_reply_loses_no_mass_and_its_outbox_arrives_later(tmp_path):
    """Node 1's reply of round 2 is lost after the node did its round (its state is saved): the relay hands its
    inbox again, the node absorbs nothing twice and resends its outbox with its next reply."""
    from flwr.app import Error, Message

    def lose_reply(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 1:
            if int(msg.content["config"]["round"]) == 1:
                return Message(Error(code=0, reason="reply lost on the way"), reply_to=msg)
        return reply

    cfg = validate(RUN | {"out-dir": str(tmp_path), "run-name": "lossy"})
    out = simulate(cfg, client_mods=[lose_reply])
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["round"], e["node"]) for e in summary["straggler_events"]] == [(2, 1)]
    assert summary["messages_resent"] >= 1  # node 1's outbox of round 1 went out with its reply of round 2
    assert summary["nodes_not_returned"] == []
    for row in read_metrics(out / "metrics.jsonl"):
        assert row["y_nodes"] + row["y_pending"] + row["y_mailboxes"] == pytest.approx(4, abs=1e-9)
    held = [r for r in read_metrics(out / "metrics.jsonl") if r["round"] == 2][0]
    assert held["y_pending"] > 0  # after the lost reply the node held its unacknowledged outbox


def test_a_rejection_in_a_lost_reply_is_reported_again_and_charges_nobody(tmp_path):
    """A hostile network cuts a message the relay hands node 1 in round 1, node 1 rejects it, and its reply is lost
    after it saved its round. In round 2 the relay hands that inbox again (node 1 absorbs none of it twice) and node
    1 reports its rejection again with the outbox it resends: the message goes home to its sender, the weight
    ledger credits node 1 nothing of it, so nothing of node 1 is refused and the mass is exact in every round."""
    from flwr.app import ConfigRecord, Error, Message

    from flower_sparsepush.flower import protocol

    def cut_then_lose(msg, context, call_next):
        mine = msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 1
        if not (mine and int(msg.content["config"]["round"]) == 1):
            return call_next(msg, context)
        box = dict(msg.content[protocol.INBOX])
        frames = protocol.unpack_frames(box["frames"])
        assert frames, "node 1 is handed messages in round 1"
        frames[0] = (frames[0][0], frames[0][1][:-3])  # the network cuts the first message
        box["frames"] = protocol.pack_frames(frames)
        msg.content[protocol.INBOX] = ConfigRecord(box)
        reply = call_next(msg, context)
        assert reply.content["out"]["rejected"], "node 1 rejects the cut message"
        return Message(Error(code=0, reason="reply lost on the way"), reply_to=msg)

    cfg = validate(RUN | {"out-dir": str(tmp_path), "run-name": "cut"})
    out = simulate(cfg, client_mods=[cut_then_lose])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_replies"] == []  # the honest node is charged with nothing
    assert [(e["round"], e["node"]) for e in summary["straggler_events"]] == [(2, 1)]
    assert summary["messages_rejected"] == 1 and summary["messages_bounced_after_rejection"] >= 1
    for row in read_metrics(out / "metrics.jsonl"):
        assert row["y_nodes"] + row["y_pending"] + row["y_mailboxes"] == pytest.approx(4, abs=1e-9)
