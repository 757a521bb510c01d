"""No single node can stop a run (issue 27): a node that registers with another node's partition id, an id out of
range or no ``info`` is left out and reported, and the run starts with the others when more than half of the
partitions have a node; a drop-in reply that is not a model of the run (a ConfigRecord, float64 1e300 that is inf in
float32, float32 1e30 beyond the value bound) is a failure of that node, and the run goes on. Unit level: the
strategies' own code with stand-in Flower messages (the Flower path of the bound: tests/test_bounds.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flower_sparsepush.strategies import base, dropin, routing
from flower_sparsepush.strategies.base import quorum, resolve_claims, wait_and_register
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

torch.set_num_threads(1)


def _stand_in_messages(monkeypatch):
    """Flower Messages need a running Flower task; the strategies' logic does not."""
    for mod in (base, dropin, routing):
        monkeypatch.setattr(mod, "Message", lambda content=None, **kw: SimpleNamespace(content=content, **kw))


def _reply(nid: int, content=None, error: str | None = None):
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=nid),
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
        content=content,
    )


def _info(p) -> RecordDict:
    return RecordDict({"info": ConfigRecord({"partition-id": p})})


class FakeGrid:
    """A grid whose nodes answer the partition query with ``answers[node id]`` (a RecordDict, or an error string)."""

    def __init__(self, answers: dict):
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, msgs, timeout=None):
        out = []
        for m in msgs:
            a = self.answers[m.dst_node_id]
            out.append(_reply(m.dst_node_id, error=a) if isinstance(a, str) else _reply(m.dst_node_id, a))
        return out


# --------------------------------------------------------------------------- registration


def test_the_claims_rule():
    ids = [10, 11, 12, 13, 14, 15]
    claims = {10: 0, 11: 1, 12: 1, 13: 7, 14: "its answer has no info.partition-id"}  # 15 never answers
    reg = resolve_claims(claims, ids, 6)
    assert reg.node_to_part == {10: 0}
    reasons = {e["node"]: e["reason"] for e in reg.left_out}
    assert sorted(reasons) == [11, 12, 13, 14, 15]
    assert "as node(s) [12]" in reasons[11] and "as node(s) [11]" in reasons[12]  # both: the relay cannot tell
    assert "outside 0..5" in reasons[13] and "no info" in reasons[14] and "did not answer" in reasons[15]
    assert reg.missing(6) == [1, 2, 3, 4, 5]
    assert [quorum(n) for n in (2, 3, 4, 8, 16)] == [2, 2, 3, 5, 9]


@pytest.mark.parametrize(
    "bad,reason",
    [
        (_info(0), "claimed partition 0"),  # another node's id (node 10's)
        (_info(8), "outside 0..7"),
        (RecordDict({"q": ConfigRecord({"x": 1})}), "no info"),
        (_info("3"), "not a whole number"),
        ("boom", "error"),
    ],
)
def test_a_bad_registration_leaves_that_node_out_and_the_run_starts(monkeypatch, bad, reason):
    """Node 13 (partition 3) answers badly: before, the run stopped (RuntimeError / KeyError); now it is left out,
    the routing strategy treats partition 3 as absent (mail to it bounces at once, it is never contacted), and a
    duplicated id leaves the other claimant out too."""
    _stand_in_messages(monkeypatch)
    answers = {10 + p: _info(p) for p in range(8)}
    answers[13] = bad
    s = routing.RoutingStrategy(8, algorithm="sparse-push")
    s.register(FakeGrid(answers))
    left = {e["node"] for e in s.left_out}
    assert left == ({10, 13} if reason == "claimed partition 0" else {13})
    assert all(reason in e["reason"] for e in s.left_out if e["node"] == 13)
    missing = [0, 3] if reason == "claimed partition 0" else [3]
    assert s.missing_partitions == missing and s.report().missing_partitions == missing
    assert s.report().registration_left_out == s.left_out
    assert all(s.guard.is_excluded(p) for p in missing)
    msgs = s.configure_train(1, None, {}, grid=FakeGrid(answers))
    assert sorted(m.dst_node_id for m in msgs) == sorted(10 + p for p in range(8) if p not in missing)
    assert 13 not in {m.dst_node_id for m in msgs}
    s.refresh(FakeGrid(answers | {99: _info(3)}), 2)  # a latecomer does not take an absent partition
    assert 3 not in s.part_to_node and not s.reconnected


def test_too_few_good_registrations_stop_the_run_with_the_reasons(monkeypatch):
    _stand_in_messages(monkeypatch)
    answers = {10: _info(0), 11: _info(0), 12: _info(1), 13: "boom"}  # 1 of 4 partitions held; 3 needed
    with pytest.raises(RuntimeError, match=r"only 1 of 4 partitions have a node \(at least 3 needed\)"):
        wait_and_register(FakeGrid(answers), 4, timeout=1)


# --------------------------------------------------------------------------- drop-in replies

LAYOUT = {"w": (4, 5), "b": (5,)}


def _arrays(value: float = 0.0, dtype=np.float32, **override) -> ArrayRecord:
    arrs = {k: np.full(shape, value, dtype) for k, shape in LAYOUT.items()} | override
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrs.items()})


def _trained(msg, dtype=np.float32, scale=1.0) -> RecordDict:
    """An honest reply: the model it was sent, moved by 0.01, in ``dtype``, times ``scale``."""
    arr = msg.content["arrays"]
    out = {k: ((arr[k].numpy().astype(np.float64) + 0.01) * scale).astype(dtype) for k in arr}
    return RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in out.items()}), "metrics": MetricRecord({"num-examples": 1})}
    )


BAD = {
    1: lambda m: _trained(m, np.float64, 1e300 / 1.01),  # float64 1e300: finite, inf once cast to float32
    2: lambda m: RecordDict({"arrays": ConfigRecord({"w": 1.0, "b": 2.0}), "metrics": MetricRecord({})}),
    3: lambda m: _trained(m, np.float32, 1e30),  # float32 1e30 in an honest-shaped reply
}


def _dropin_rounds(monkeypatch, hostile: str, rounds: int = 3):
    """Four nodes, rounds of the drop-in strategy; nodes 1, 2, 3 send the bad replies of BAD (``hostile="bad"``)
    or an error reply (``"silent"``)."""
    _stand_in_messages(monkeypatch)
    s = dropin.DecentralizedFedAvg(graph="exponential", compressor="topk:0.5", gamma=0.5, gossip_steps=1, seed=0)
    s.setup([100, 101, 102, 103], _arrays(0.5))
    for rnd in range(1, rounds + 1):
        msgs = s.configure_train(rnd, None, ConfigRecord(), grid=None)
        replies = []
        for m in msgs:
            i = s.index_of[m.dst_node_id]
            if i == 0:
                replies.append(_reply(m.dst_node_id, _trained(m)))
            elif hostile == "bad":
                replies.append(_reply(m.dst_node_id, BAD[i](m)))
            else:
                replies.append(_reply(m.dst_node_id, error="silent"))
        s.aggregate_train(rnd, replies)
    return s


def test_bad_dropin_replies_are_failures_of_their_nodes_and_the_run_goes_on(monkeypatch):
    s = _dropin_rounds(monkeypatch, "bad")
    by_node = {}
    for f in s.failures:
        by_node.setdefault(f["node"], []).append(f["reason"])
    assert sorted(by_node) == [1, 2, 3] and all(len(v) == 3 for v in by_node.values())  # every round, no others
    assert "not all finite as float32" in by_node[1][0]
    assert "must be an ArrayRecord, got a ConfigRecord" in by_node[2][0]
    assert "beyond the run's value bound" in by_node[3][0]
    assert all(torch.isfinite(st.x).all() for st in s.states)
    assert s.mass()["y_total"] == pytest.approx(4.0, abs=1e-12)  # nothing of the bad replies moved any mass
    silent = _dropin_rounds(monkeypatch, "silent")  # the same nodes answering with errors instead
    for a, b in zip(s.states, silent.states):  # a bad reply is exactly a missed round
        assert torch.equal(a.x, b.x) and a.y == b.y


def test_a_dropin_reply_within_the_bound_is_taken_and_the_bound_is_an_argument(monkeypatch):
    _stand_in_messages(monkeypatch)
    s = dropin.DecentralizedFedAvg(graph="ring", compressor="none", gamma=0.5, gossip_steps=1, value_bound=1e31)
    s.setup([100, 101], _arrays(0.5))
    msgs = s.configure_train(1, None, ConfigRecord(), grid=None)
    s.aggregate_train(1, [_reply(m.dst_node_id, _trained(m, np.float32, 1e30)) for m in msgs])
    assert s.failures == []  # 1e30 is within a 1e31 bound
    assert s.nodes[0].rule(0).bound == 1e31  # the nodes' push-sum rules carry the bound (run.setup.make_rule)
    with pytest.raises(ValueError, match="value_bound"):
        dropin.DecentralizedFedAvg(value_bound=0)
    wrong = _arrays(0.5, b=np.zeros(5, np.float32), w=np.zeros((5, 4), np.float32))
    _stand_in_messages(monkeypatch)
    msgs = s.configure_train(2, None, ConfigRecord(), grid=None)
    s.aggregate_train(2, [_reply(msgs[0].dst_node_id, RecordDict({"arrays": wrong}))])
    assert "shape" in s.failures[-1]["reason"]
