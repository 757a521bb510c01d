"""The node API (node.py), the node store (store.py) and the ServerApp <-> ClientApp protocol (protocol.py)."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from flower_sparsepush.core.codec import decode
from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.guard import BadReply
from flower_sparsepush.core.node import Node, state_from_flat, state_to_flat
from flower_sparsepush.core.pushsum import NodeState, PushSum
from flower_sparsepush.core.router import Router
from flower_sparsepush.core.topology import make_graph
from flower_sparsepush.flower import protocol
from flower_sparsepush.flower.store import NodeStore, Stamp, StoreError, checksum

torch.set_num_threads(1)
D = 64


def _nodes(n=6, spec="topk:0.25+q:4", gamma=0.4):
    g = make_graph("exponential", n, seed=0)
    x0 = torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rule = PushSum(make_compressor(spec, seed=0), gamma, "ref")
    return (
        g,
        x0,
        [Node(i, rule.init_state(x0[i]), lambda t: rule, lambda t, i=i: g.out_neighbours(t)[i]) for i in range(n)],
    )


def test_node_round_is_bounce_receive_train_send_in_that_order():
    """Node.round == the push-sum calls made by hand, to the last bit, with a training step in the middle."""
    g, x0, nodes = _nodes()
    rule = PushSum(make_compressor("topk:0.25+q:4", seed=0), 0.4, "ref")
    manual = [rule.init_state(x0[i]) for i in range(len(nodes))]
    router_a, router_b = Router(len(nodes)), Router(len(nodes))
    step = lambda st: st.z * 0.9  # noqa: E731  a "training step" that moves the de-biased model
    for t in range(8):
        for i, node in enumerate(nodes):
            inbox, bounced = router_a.collect(i)
            res = node.round(t, inbox, bounced, lambda st: (PushSum.local_update(st, step(st)), 0.5)[1])
            router_a.post(i, t, res.messages)
            assert res.loss == 0.5 and not res.rejected
            inbox, bounced = router_b.collect(i)
            for dest, data in bounced:
                rule.bounce(manual[i], dest, data)
            assert not rule.receive(manual[i], inbox)
            PushSum.local_update(manual[i], step(manual[i]))
            router_b.post(i, t, rule.send(manual[i], i, g.out_neighbours(t)[i], t))
    for node, st in zip(nodes, manual):
        assert torch.equal(node.state.x, st.x) and node.state.y == st.y
    # and the mass is where push-sum says: sum y over nodes and messages in flight is n
    assert sum(n.state.y for n in nodes) + router_a.in_transit_mass() == pytest.approx(len(nodes), abs=1e-12)


def test_gossip_only_round_has_nan_loss_and_finish_applies_an_update():
    _, _, nodes = _nodes()
    out = nodes[0].round(0)
    assert np.isnan(out.loss) and set(out.messages) == {1}
    z = torch.zeros(D, dtype=torch.float64)
    nodes[1].begin(0)
    nodes[1].finish(0, z)  # x = y * z_new before sending
    assert torch.count_nonzero(nodes[1].state.z) < D  # the messages moved part of the reference, nothing else


def test_flat_state_round_trip_is_exact_and_rejects_other_dicts():
    _, _, nodes = _nodes()
    for t in range(3):  # references on edges, error memory absent, momentum added by hand
        for node in nodes:
            node.round(t)
    st = nodes[2].state
    st.momentum = torch.randn(D)
    flat = state_to_flat(st)
    assert {"x", "y", "m"} <= set(flat) and any(k.startswith("ro.") for k in flat)
    back = state_from_flat({k: v.clone() for k, v in flat.items()})
    assert torch.equal(back.x, st.x) and back.y == st.y and torch.equal(back.momentum, st.momentum)
    assert back.error is None and back.anchor is None
    assert sorted(back.refs_out) == sorted(st.refs_out) and sorted(back.refs_in) == sorted(st.refs_in)
    assert all(torch.equal(back.refs_out[j], st.refs_out[j]) for j in st.refs_out)
    with pytest.raises(ValueError, match="needs 'x' and 'y'"):
        state_from_flat({"x": st.x})
    with pytest.raises(ValueError, match="not a node state entry"):
        state_from_flat(flat | {"weights": st.x})


def _flat(seed=0):
    g = torch.Generator().manual_seed(seed)
    return state_to_flat(NodeState(x=torch.randn(D, generator=g), y=0.75, momentum=torch.randn(D, generator=g)))


def test_store_round_trip_snapshot_and_restore(tmp_path):
    NodeStore.forget()
    store = NodeStore(tmp_path, "run-a")
    assert store.load(3) is None  # no state yet
    flat = _flat()
    stamp = store.save(3, 5, flat)
    assert stamp == Stamp("run-a", 3, 5, checksum(flat))
    got_stamp, got = store.load(3, stamp)
    assert got_stamp == stamp and all(torch.equal(got[k], flat[k]) for k in flat)
    assert (
        got["x"].data_ptr() == flat["x"].data_ptr()
    )  # handed over from the cache, not copied: save took the tensors, load gives them
    got["x"].add_(1.0)  # the caller updates its state in place; the file keeps the saved state
    again = store.load(3, stamp)[1]  # the cache handed its entry over: this one comes from the file
    assert torch.equal(again["x"], _flat()["x"]) and again["x"].data_ptr() != got["x"].data_ptr()
    flat = _flat()
    store.snapshot(3, 6)  # after round 5: the checkpoint of round 6
    store.save(3, 6, _flat(1))
    stamp_r, restored = store.restore(3, 6)
    assert stamp_r.round == 5 and torch.equal(restored["x"], flat["x"])
    NodeStore.forget()  # a fresh process reads the file, mapped
    assert store.load(3)[0] == stamp_r
    with pytest.raises(StoreError, match="no checkpoint of round 9"):
        store.restore(3, 9)


def test_store_refuses_a_missing_damaged_or_foreign_state(tmp_path):
    NodeStore.forget()
    store = NodeStore(tmp_path, "run-b")
    stamp = store.save(0, 2, _flat())
    NodeStore.forget()
    with pytest.raises(StoreError, match="another run or process"):
        store.load(0, Stamp("run-b", 0, 3, stamp.checksum))  # the run expects a later round
    with pytest.raises(StoreError, match="another run or process"):
        store.load(0, Stamp("run-b", 0, 2, stamp.checksum + 1))  # the same round, other bytes
    # the file is a round ahead of the stamp: the process saved, then died before Flower kept its context
    assert store.load(0, Stamp("run-b", 0, 1, 12345))[0] == stamp
    with pytest.raises(StoreError, match="no shared filesystem"):
        NodeStore(tmp_path, "run-b").load(1, Stamp("run-b", 1, 2, 0))  # written elsewhere
    path = next(p for p in (store.path(0, 0), store.path(0, 1)) if p.exists())
    flat = safetensors.torch.load_file(path)
    flat["x"][0] += 1.0  # one changed value, the same metadata: the checksum no longer fits
    safetensors.torch.save_file(flat, path, metadata=safetensors.safe_open(path, "pt").metadata())
    NodeStore.forget()
    with pytest.raises(StoreError, match="fails its checksum"):
        store.load(0)
    store.path(1, 0).write_bytes(b"not a state")
    with pytest.raises(StoreError, match="not a readable node state"):
        store.load(1)
    with pytest.raises(ValueError, match="plain name"):
        NodeStore(tmp_path, "../escape")


def test_store_a_write_torn_by_a_crash_leaves_the_previous_state(tmp_path):
    """Saves alternate between two slots; a process killed mid-write leaves a torn slot (cut short, or its old tail
    left behind) and the other slot still holds the state before it, which a fresh process reads."""
    NodeStore.forget()
    store = NodeStore(tmp_path, "run-d")
    first = store.save(5, 1, _flat(1))
    second = store.save(5, 2, _flat(2))
    assert store.path(5, 0).exists() and store.path(5, 1).exists()
    third = store.save(5, 3, _flat(3))  # over the slot of round 1, not over round 2's
    NodeStore.forget()
    assert store.load(5)[0] == third
    for torn in (lambda b: b[: len(b) // 2], lambda b: b[:-100] + bytes(100), lambda b: b + b"tail of an old state"):
        NodeStore.forget()
        slot = next(s for s in (0, 1) if '"round":"3"' in store.path(5, s).read_bytes()[:2000].decode(errors="ignore"))
        data = store.path(5, slot).read_bytes()
        store.path(5, slot).write_bytes(torn(data))
        got = store.load(5, Stamp("run-d", 5, 2, second.checksum))  # Flower never kept round 3's stamp
        assert got[0] == second and torch.equal(got[1]["x"], _flat(2)["x"])
        NodeStore.forget()
        assert store.load(5)[0] == second  # no stamp (a restarted SuperNode): the latest whole state
        store.path(5, slot).write_bytes(data)
    assert first.round == 1
    # the next save after a torn one goes over the torn slot and keeps round 2 whole
    NodeStore.forget()
    store.path(5, slot).write_bytes(b"torn")
    store.load(5, Stamp("run-d", 5, 2, second.checksum))
    fourth = store.save(5, 4, _flat(4))
    NodeStore.forget()
    assert store.load(5)[0] == fourth
    assert store.load(5, second) is not None  # a stamp a round behind the file: this node's own later state


def test_store_cache_stays_within_its_budget(tmp_path, monkeypatch):
    NodeStore.forget()
    monkeypatch.setattr(NodeStore, "cache_bytes", 3 * 1024)
    store = NodeStore(tmp_path, "run-c")
    for node in range(10):
        store.save(node, 0, _flat(node))
    size = sum(sum(t.numel() * t.element_size() for t in e[1].values()) for e in NodeStore._cache.values())
    assert size <= 3 * 1024 and len(NodeStore._cache) < 10
    assert NodeStore._cached_bytes == size  # the running total the eviction uses is the cache's real size
    assert all(torch.equal(store.load(n)[1]["x"], _flat(n)["x"]) for n in range(10))  # evicted ones come from disk
    store.save(9, 1, _flat(3))  # replacing a node's entry does not count it twice
    assert NodeStore._cached_bytes == sum(
        sum(t.numel() * t.element_size() for t in e[1].values()) for e in NodeStore._cache.values()
    )
    NodeStore.forget()


def test_train_message_and_reply_round_trip():
    msgs = [(1, b"abc"), (4, b"")]
    order = protocol.TrainOrder(
        round=7,
        inbox=msgs,
        bounced=[(2, b"zz")],
        redo=[(5, [(3, b"q")]), (6, [])],
        redo_bounced=[(5, [(2, b"b")])],
        token="t-1",
        acked=4,
        restore=3,
        snapshot=True,
    )
    back = protocol.read_train(protocol.train_content(order, {"lr": 0.1}))
    assert back == order
    content = protocol.train_reply_content(7, msgs, [0, 2], [(5, [(1, b"x")])], 0.25, 0.5)
    reply = protocol.read_train_reply(content)
    assert (reply.round, reply.frames, reply.rejected, reply.resent, reply.loss) == (
        7,
        msgs,
        [0, 2],
        [(5, [(1, b"x")])],
        0.25,
    )
    # a reply without resent outboxes is the same schema as before; a resent buffer cut short is refused
    assert protocol.read_train_reply(protocol.train_reply_content(7, msgs, [], [], 0.1, 1.0)).resent == []
    content["out"]["resent"] = content["out"]["resent"][:-1]
    with pytest.raises(BadReply, match="out.resent"):
        protocol.read_train_reply(content)


def test_eval_reply_optional_fields_are_checked():
    z = np.zeros(5, dtype=np.float32)
    rep = protocol.read_eval_reply(protocol.eval_reply_content(z, 0.5, 1.0, 0.9, 0.1, 3), 5)
    assert (rep.acc, rep.y, rep.y_pending, rep.done) == (0.5, 0.9, pytest.approx(0.1), 3)
    with pytest.raises(BadReply, match="y_pending"):
        protocol.read_eval_reply(protocol.eval_reply_content(z, 0.5, 1.0, 0.9, -1.0, 3), 5)
    assert protocol.core_round(1) == 0


def test_pending_outbox_weight_is_what_the_messages_carry():
    from flower_sparsepush.flower.node_handlers import join, pending_weight, split

    _, _, nodes = _nodes()
    out = nodes[0].round(0).messages
    flat = join(state_to_flat(nodes[0].state), {0: sorted(out.items()), 1: []}, refusals={3: [0, 2]})
    state_part, pending, _, refusals = split(flat)
    assert pending == {0: sorted(out.items()), 1: []} and "x" in state_part and refusals == {3: [0, 2]}
    assert pending_weight(pending) == pytest.approx(sum(decode(d).y for d in out.values()))


def test_a_rejection_is_reported_again_while_its_batch_is_handed_again():
    from flower_sparsepush.flower.node_handlers import rejections

    m = [(0, b"a"), (1, b"b"), (2, b"c")]
    # round 1: it rejects the second message of its inbox
    assert rejections([(1, m)], {}, [1]) == ([1], {1: [1]})
    # its reply was lost: round 2 hands batch 1 again first; the rejection comes back at its position there
    assert rejections([(1, m), (2, m[:2])], {1: [1]}, [3]) == ([1, 3], {1: [1], 2: [0]})
    # the relay acknowledged batch 1 (not handed again): its rejection is forgotten
    assert rejections([(3, m)], {1: [1], 2: [0]}, []) == ([], {})


def test_store_files_are_safetensors_the_library_reads_back_exactly(tmp_path):
    """write_state writes the safetensors layout itself (straight from the tensors' memory); the library must read
    every dtype a node state holds, empty tensors and odd sizes included, to the same bytes, with the metadata."""
    from flower_sparsepush.flower.store import write_state

    flat = {
        "x": torch.randn(7),
        "y": torch.tensor([0.25], dtype=torch.float64),
        "out.3": torch.arange(13, dtype=torch.uint8),
        "out.4": torch.zeros(0, dtype=torch.uint8),
        "idx": torch.arange(5, dtype=torch.int64).reshape(1, 5),
        "half": torch.randn(3).to(torch.bfloat16),
    }
    stamp = Stamp("run-e", 2, 9, checksum(flat))
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"an older and much longer state " * 100)  # written over in place: the tail must go
    write_state(path, stamp, flat)
    got = safetensors.torch.load_file(path)
    assert got.keys() == flat.keys()
    assert all(got[k].dtype == flat[k].dtype and torch.equal(got[k], flat[k]) for k in flat)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"token": "run-e", "node": "2", "round": "9", "checksum": str(stamp.checksum)}
    with pytest.raises(TypeError, match="does not keep"):
        write_state(path, stamp, {"c": torch.zeros(2, dtype=torch.complex64)})
