"""The value bound (core/bounds.py, run-config value-bound): the rule, receivers that guard their own state, senders
that clip, the presets unchanged by it, and a node sending huge finite values (1e30, 3e38) charged alone, in-process
and through Flower (issue 27, table row 1: it used to poison its receivers, whose NaN got *them* excluded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from flower_sparsepush.core import bounds
from flower_sparsepush.core.codec import Message as CoreMessage
from flower_sparsepush.core.codec import decode, encode
from flower_sparsepush.core.compression import Compressed, make_compressor
from flower_sparsepush.core.guard import BadReply, Guard, Outbox, ReplyChecks
from flower_sparsepush.core.pushsum import PushSum
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.flower.protocol import pack_frames, unpack_frames
from flower_sparsepush.run.config import KEYS, validate
from flower_sparsepush.run.inprocess import run_inprocess

torch.set_num_threads(1)
DIM = 50


# --------------------------------------------------------------------------- the rule


def _raw(values, idx=None) -> Compressed:
    return Compressed(DIM, idx, values=np.asarray(values, dtype=np.float32))


def test_the_rule():
    assert KEYS["value-bound"].default == bounds.DEFAULT and KEYS["value-bound"].hi == bounds.MAX
    assert bounds.message_excess(_raw(np.full(DIM, 3.0)), 3.0) is None
    assert "beyond" in bounds.message_excess(_raw(np.full(DIM, 3.01)), 3.0)
    assert bounds.message_excess(_raw(np.full(DIM, 1e30)), None) is None  # no bound: not checked here
    q = Compressed(DIM, np.arange(5), codes=np.zeros(5, np.uint8), scale=1e30, bits=4)
    assert "quantization scale" in bounds.message_excess(q, 1e6)
    nan = _raw(np.r_[np.full(DIM - 1, 1.0), np.nan])
    assert bounds.message_excess(nan, 1e6) is not None  # NaN is beyond any bound
    # float32 rounding of an honestly clipped value passes (slack 1e-6), a real excess does not
    assert bounds.message_excess(_raw(np.full(DIM, np.float32(0.1))), 0.1) is None
    for bad in (0, -1.0, float("inf"), float("nan"), 1e39, True, "1e6"):
        with pytest.raises(ValueError):
            bounds.check_bound(bad)
    v = torch.tensor([1.0, -2.0, 0.5])
    assert bounds.clip(v, 2.0) is v  # within: the same tensor, so honest runs are bit for bit unchanged
    w = torch.tensor([1.0, -5.0, float("inf"), float("nan")])
    assert bounds.clip(w, 2.0).tolist() == [1.0, -2.0, 2.0, 0.0]
    assert bounds.finite(1.0, v) and not bounds.finite(float("inf"), v) and not bounds.finite(1.0, w)


def test_validate_refuses_out_of_range_bounds():
    from flower_sparsepush.run.config import ConfigError

    assert validate({"value-bound": 10}).value_bound == 10.0
    for bad in (0, -3, 1e39):
        with pytest.raises(ConfigError, match="value-bound"):
            validate({"value-bound": bad})


# --------------------------------------------------------------------------- senders clip, receivers guard


def _huge(data: bytes, value: float, quantized: bool) -> bytes:
    """``data`` re-encoded with every kept value set to ``value`` (as a quantization scale, or raw float32)."""
    m = decode(data)
    c = m.payload
    if quantized:
        bits = c.bits or 4
        codes = np.full(c.k, 2**bits - 2 if bits > 1 else 1, np.uint8)  # every value +scale
        p = Compressed(c.dim, c.indices, codes=codes, scale=value, bits=bits)
    else:
        p = Compressed(c.dim, c.indices, values=np.full(c.k, value, np.float32))
    return encode(CoreMessage(m.sender, m.round, m.a, m.y, p, form=m.form))


def _rule(form: str, bound, spec: str = "topk:0.2") -> PushSum:
    return PushSum(make_compressor(spec, segments=[DIM], seed=0), gamma=0.5, form=form, bound=bound)


@pytest.mark.parametrize("form", ["ref", "ef"])
def test_senders_never_send_beyond_the_bound(form):
    rule = _rule(form, 5.0, "topk:0.2+q:4")
    s = rule.init_state(torch.zeros(DIM))
    assert PushSum.local_update(s, torch.full((DIM,), 1e9), 5.0)  # a step that ran away: clipped
    assert float(s.z.abs().max()) == 5.0
    before = s.x.clone()
    assert not PushSum.local_update(s, torch.full((DIM,), float("nan")), 5.0)  # a diverged step is not applied
    assert torch.equal(s.x, before)
    s.x += 1e12  # whatever the state holds, the messages stay within the bound
    for t in range(3):
        for data in rule.send(s, 0, [1, 2], t).values():
            assert bounds.largest(decode(data).payload) <= 5.0 * (1 + bounds.SLACK)


@pytest.mark.parametrize("form", ["ref", "ef"])
@pytest.mark.parametrize("value", [1e30, 3e38])
def test_receivers_refuse_huge_values_and_keep_their_state(form, value):
    """A message beyond the bound is refused; with the bound off, one whose application would overflow the state
    is refused and undone; either way the receiver's state is finite and equal to the state of a receiver that got
    only the honest messages."""
    x0 = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    sender = _rule(form, None, "none")  # dense: the huge values hit the same entries in every round
    honest = {j: sender.init_state(x0 + j) for j in (1, 2)}
    batches = [[(j, sender.send(honest[j], j, [0], t)[0]) for j in (1, 2)] for t in range(3)]
    for bound in (bounds.DEFAULT, bounds.MAX):
        clean, hit = _rule(form, bound).init_state(x0), _rule(form, bound).init_state(x0)
        rule = _rule(form, bound)
        refused = 0
        for t, batch in enumerate(batches):
            rule.receive(clean, [batch[1]])
            # node 1 turns hostile: the same message with huge values, in every round
            rej = rule.receive(hit, [(1, _huge(batch[0][1], value, quantized=t % 2 == 0)), batch[1]])
            assert [r.index for r in rej] == ([0] if bound == bounds.DEFAULT else [0] * len(rej)), (bound, t, rej)
            refused += len(rej)
            assert bounds.finite(hit.y, hit.x, *hit.refs_in.values()) and torch.isfinite(hit.z).all()
        if bound == bounds.DEFAULT:  # refused whole: exactly the state of a receiver that never got it
            assert torch.equal(hit.x, clean.x) and hit.y == clean.y
            assert hit.refs_in.keys() == clean.refs_in.keys()
            assert all(torch.equal(hit.refs_in[j], clean.refs_in[j]) for j in hit.refs_in)
        elif form == "ref" and value == 3e38:  # bound off: the second 3e38 would overflow the reference: undone
            assert refused >= 1


# --------------------------------------------------------------------------- the relay refuses, charged to the sender


def test_the_relay_refuses_beyond_the_bound_as_kind_bound():
    rule = _rule("ref", None, "topk:0.2+q:4")
    s = rule.init_state(torch.ones(DIM))
    frames = sorted(rule.send(s, 0, [1, 2], 0).items())
    guard = Guard(Router(3, Network()), ReplyChecks(dim=DIM, form="ref", value_bound=1e6, exclude_after=1))
    guard.check(0, 0, Outbox(0, frames), 0)  # honest: passes
    for value, quantized in ((1e30, True), (3e38, False)):
        bad = [(d, _huge(m, value, quantized)) for d, m in frames]
        with pytest.raises(BadReply) as err:
            guard.check(0, 0, Outbox(0, bad), 0)
        assert err.value.kind == "bound" and "value bound" in str(err.value)
    assert Guard(Router(3, Network()), ReplyChecks(dim=DIM)).check(0, 0, Outbox(0, bad), 0) is None  # no bound


# --------------------------------------------------------------------------- the presets are unchanged


def _preset_run(name: str, **extra):
    from flower_sparsepush.run.presets import PRESETS

    sw = dict(PRESETS[name].switches)
    sw = sw | ({"merge-every": 2} if "merge-every" in sw else {})
    sw = sw | ({"final-gossip-rounds": 2} if "final-gossip-rounds" in sw else {})
    small = {"dataset": "synthetic", "model": "mlp", "num-nodes": 4, "num-rounds": 4, "batch-size": 16, "lr": 0.1}
    return run_inprocess(validate(small | sw | {"eval-every": 4, "eval-node-samples": 50, "seed": 1} | extra))


@pytest.mark.parametrize("name", ["sgp", "sp-466x", "sp-1000x", "scsp-400x", "paper"])
def test_presets_are_bit_for_bit_the_same_with_the_bound_on(name):
    """The default bound never binds for an honest run: every node's state equals the run with the bound off
    (3.4e38), bit for bit; a bound that does bind changes the run (so the comparison is not vacuous)."""
    on, off = _preset_run(name), _preset_run(name, **{"value-bound": bounds.MAX})
    for a, b in zip(on.states, off.states):
        assert torch.equal(a.x, b.x) and a.y == b.y
    tight = _preset_run(name, **{"value-bound": 1e-3})
    assert any(not torch.equal(a.x, b.x) for a, b in zip(tight.states, on.states))


# --------------------------------------------------------------------------- one node sends huge values, whole runs

HOSTILE = 5
RUN = {
    "dataset": "synthetic", "model": "mlp", "num-nodes": 8, "graph": "exponential", "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4", "gamma": 0.5, "num-rounds": 4, "local-steps": 2, "batch-size": 16, "lr": 0.1,
    "seed": 0, "eval-every": 4, "eval-node-samples": 0, "save-nodes": True, "value-bound": 1e4,
}  # fmt: skip


def huge_frames(frames, rnd: int):
    """What node HOSTILE sends instead of its honest messages: well-formed and of the honest size (the run's 4-bit
    codes), every value 1e30 in even rounds and 3e38 in odd ones (the quantization scale)."""
    return [(d, _huge(m, 1e30 if rnd % 2 == 0 else 3e38, quantized=True)) for d, m in frames]


def _runs_in_process(monkeypatch_ctx):
    from flower_sparsepush.core.node import RoundOut
    from flower_sparsepush.run import inprocess, setup
    from flower_sparsepush.run.node_train import node_round

    def hostile_round(setup_, state, node, rnd, inbox, bounced=()):
        res = node_round(setup_, state, node, rnd, inbox, bounced)
        if node != HOSTILE:
            return res
        return RoundOut(dict(huge_frames(sorted(res.messages.items()), rnd)), res.loss, res.rejected)

    class Silent(Network):
        def online(self, rnd: int, node: int) -> bool:
            return node != HOSTILE and super().online(rnd, node)

    runs = {}
    with monkeypatch_ctx() as mp:
        mp.setattr(setup, "network_of", lambda cfg: Silent(seed=cfg.seed))
        runs["silent"] = run_inprocess(validate(RUN))
    with monkeypatch_ctx() as mp:
        mp.setattr(inprocess, "node_round", hostile_round)
        runs["hostile"] = run_inprocess(validate(RUN))
        runs["excluded"] = run_inprocess(validate(RUN | {"exclude-after": 2}))
    return runs


def test_huge_values_are_charged_to_the_attacker_in_process():
    runs = _runs_in_process(pytest.MonkeyPatch.context)
    honest = [i for i in range(RUN["num-nodes"]) if i != HOSTILE]
    g = runs["hostile"].guard
    assert [(r["node"], r["kind"]) for r in g.rejected_replies] == [(HOSTILE, "bound")] * RUN["num-rounds"]
    for i in honest:  # nothing it sent reached anyone: the honest nodes are where they are when it is silent
        a, b = runs["hostile"].states[i], runs["silent"].states[i]
        assert torch.equal(a.x, b.x) and a.y == b.y and torch.isfinite(a.z).all()
    ex = runs["excluded"].guard  # exclude-after=2: the attacker alone, after its second refused reply
    assert ex.excluded == [{"round": 2, "node": HOSTILE, "replies_rejected": 2}]
    assert {r["node"] for r in ex.rejected_replies} == {HOSTILE}
    assert all(torch.isfinite(runs["excluded"].states[i].z).all() for i in honest)


def huge_mod(msg, context, call_next):
    """Flower client mod: node HOSTILE replies with :func:`huge_frames` instead of its messages."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or int(context.node_config["partition-id"]) != HOSTILE:
        return reply
    out = dict(reply.content["out"])
    out["frames"] = pack_frames(huge_frames(unpack_frames(out["frames"]), int(out["round"])))
    return Message(RecordDict({"out": ConfigRecord(out), "metrics": reply.content["metrics"]}), reply_to=msg)


def silent_mod(msg, context, call_next):
    """Flower client mod: node HOSTILE does its round but its reply never comes (an error reply)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or int(context.node_config["partition-id"]) != HOSTILE:
        return reply
    raise RuntimeError("silent")


def test_huge_values_through_flower_are_refused_at_the_attacker(tmp_path):
    """Through Flower's simulation engine with the real ServerApp: every reply of the node sending 1e30 / 3e38 is
    refused as kind "bound" and charged to it, the run finishes, and the honest nodes end bit for bit where they end
    when that node is silent (its replies are errors)."""
    import sys

    import ray.cloudpickle

    from flower_sparsepush.flower.launch import simulate

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module
    outs = {}
    for name, mod in (("silent", silent_mod), ("hostile", huge_mod)):
        cfg = RUN | {"out-dir": str(tmp_path), "run-name": name, "num-rounds": 3, "eval-every": 3}
        outs[name] = simulate(validate(cfg), client_mods=[mod])
    summary = json.loads((outs["hostile"] / "summary.json").read_text())
    assert [(r["round"], r["node"], r["kind"]) for r in summary["rejected_replies"]] == [
        (t, HOSTILE, "bound") for t in (1, 2, 3)
    ]
    assert summary["replies_rejected_by_node"] == {str(HOSTILE): 3} and summary["excluded_nodes"] == []
    silent = json.loads((outs["silent"] / "summary.json").read_text())
    assert silent["rejected_replies"] == [] and len(silent["straggler_events"]) == 3
    a, b = np.load(outs["hostile"] / "nodes.npz"), np.load(outs["silent"] / "nodes.npz")
    for i in range(RUN["num-nodes"]):
        if i != HOSTILE:
            assert np.array_equal(a[f"z{i}"], b[f"z{i}"]) and np.isfinite(a[f"z{i}"]).all()
    ya, yb = summary["mass"]["y_by_node"], silent["mass"]["y_by_node"]
    assert {p: y for p, y in ya.items() if int(p) != HOSTILE} == {p: y for p, y in yb.items() if int(p) != HOSTILE}


def merge_poison_mod(msg, context, call_next):
    """Flower client mod: node HOSTILE gossips honestly and gives a final-merge contribution of 1e30 everywhere."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or int(context.node_config["partition-id"]) != HOSTILE:
        return reply
    if "merge" not in reply.content or reply.content["merge"]["phase"] != "give":
        return reply
    m = dict(reply.content["merge"])
    m["frames"] = pack_frames([(k, _huge(d, 1e30, quantized=False)) for k, d in unpack_frames(m["frames"])])
    return Message(RecordDict({"merge": ConfigRecord(m), "metrics": reply.content["metrics"]}), reply_to=msg)


def test_a_huge_merge_contribution_through_flower_is_refused_at_the_attacker(tmp_path):
    """Through Flower with the real ServerApp: node 5's final-merge contribution of 1e30 is refused as kind "bound"
    in the give phase (Flower round 3 after 2 training rounds) and charged to it (merge_nodes.value_limit); the
    seven honest nodes merge among themselves to one finite model within the bound, mass stays exact, nobody is
    excluded. (The bit-for-bit comparison with a run where node 5's give reply is an error held in 3 of 3 runs
    here and failed once in 4 fresh-clone runs of an earlier session, cause unknown, so it is not asserted:
    docs/reliability.md.)"""
    import sys

    import ray.cloudpickle

    from flower_sparsepush.flower.launch import simulate

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module
    cfg = RUN | {"out-dir": str(tmp_path), "run-name": "merge", "num-rounds": 2, "eval-every": 2, "final-merge": True}
    out = simulate(validate(cfg), client_mods=[merge_poison_mod])
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["round"], r["node"], r["kind"]) for r in summary["rejected_replies"]] == [(3, HOSTILE, "bound")]
    assert "merge message" in summary["rejected_replies"][0]["reason"]
    assert summary["replies_rejected_by_node"] == {str(HOSTILE): 1} and summary["excluded_nodes"] == []
    z = np.load(out / "nodes.npz")
    honest = [z[f"z{i}"] for i in range(RUN["num-nodes"]) if i != HOSTILE]
    assert all(np.array_equal(honest[0], h) for h in honest)  # one merged model among the honest nodes
    assert np.isfinite(honest[0]).all() and np.abs(honest[0]).max() <= RUN["value-bound"]
    assert sum(summary["mass"]["y_by_node"].values()) == pytest.approx(RUN["num-nodes"], abs=1e-9)
