"""linkstate.indexed_message_lookup: same messages as Flower's scan, at a cost that does not grow with the store."""

from __future__ import annotations

import secrets

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from flower_sparsepush.flower import linkstate

RUN_ID = 7


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    """Messages are built as the ServerApp builds them (Message() reads the identity of the running task)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _state_with(nodes: int, per_node: list[int], run_id: int = RUN_ID):
    """An in-memory link state (as the simulation engine builds it) with ``per_node[i]`` messages to node i."""
    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()).state()
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run_id] = RunRecord(run=run)  # as flwr.simulation.run_simulation registers its run
    state.task_store[1] = Task(task_id=1, run_id=run_id)
    ids = []
    for _ in range(nodes):
        nid = state.create_node(
            NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=HEARTBEAT_INTERVAL_INF
        )
        state.acknowledge_node_heartbeat(node_id=nid, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        ids.append(nid)
    sent = []
    for k in range(max(per_node)):  # interleaved, as a round's messages are stored
        for i, nid in enumerate(ids):
            if k < per_node[i]:
                msg = Message(
                    RecordDict({"c": ConfigRecord({"k": k})}), dst_node_id=nid, message_type=MessageType.TRAIN
                )
                msg.metadata.__dict__["_message_id"] = f"m{k}-{i}"
                assert state.store_message_ins(msg) == f"m{k}-{i}"
                sent.append(f"m{k}-{i}")
    return state, ids


def _sweep(state, ids, limit=1):
    return [[m.metadata.message_id for m in state.get_message_ins(node_id=n, limit=limit)] for n in ids]


def test_same_messages_in_the_same_order_as_flowers_scan():
    counts = [3, 0, 1, 2, 1]
    plain, ids_a = _state_with(5, counts)
    indexed, ids_b = _state_with(5, counts)
    with linkstate.indexed_message_lookup():
        got = [_sweep(indexed, ids_b) for _ in range(4)] + [_sweep(indexed, ids_b, limit=None)]
    want = [_sweep(plain, ids_a) for _ in range(4)] + [_sweep(plain, ids_a, limit=None)]
    assert got == want
    assert got[0] == [["m0-0"], [], ["m0-2"], ["m0-3"], ["m0-4"]]
    assert got[2] == [["m2-0"], [], [], [], []]
    # every message handed out once, marked delivered
    assert all(m.metadata.delivered_at for m in indexed.message_ins_store.values())


def test_lookup_cost_does_not_grow_with_the_store(monkeypatch):
    """One node's lookup checks only its own pending messages: the number of _check_stored_messages calls of a full
    sweep over N nodes is N (one message each), not N x N as with Flower's scan."""
    calls = {"n": 0}
    orig = InMemoryLinkState._check_stored_messages

    def counting(self, message_ids, run_id=None):
        calls["n"] += 1
        return orig(self, message_ids, run_id)

    monkeypatch.setattr(InMemoryLinkState, "_check_stored_messages", counting)
    for n in (20, 80):
        state, ids = _state_with(n, [1] * n)
        calls["n"] = 0
        with linkstate.indexed_message_lookup():
            first = _sweep(state, ids)
            second = _sweep(state, ids)  # nothing pending any more: no message is checked
        assert all(len(x) == 1 for x in first) and all(x == [] for x in second)
        assert calls["n"] == n
        state, ids = _state_with(n, [1] * n)
        calls["n"] = 0
        _sweep(state, ids)
        _sweep(state, ids)
        assert calls["n"] > n * n // 2  # Flower's own scan, for contrast: quadratic in the node count


def test_restored_on_exit_and_reentrant():
    orig = InMemoryLinkState.get_message_ins
    with linkstate.indexed_message_lookup():
        with linkstate.indexed_message_lookup():
            assert linkstate.is_active()
        assert InMemoryLinkState.get_message_ins is not orig
    assert InMemoryLinkState.get_message_ins is orig and not linkstate.is_active()


def test_messages_stored_before_activation_and_deleted_ones():
    state, ids = _state_with(3, [2, 1, 1])
    state.delete_messages({"m0-1"})
    with linkstate.indexed_message_lookup():
        assert _sweep(state, ids, limit=None) == [["m0-0", "m1-0"], [], ["m0-2"]]


def test_pull_interval_keeps_polling_linear():
    assert linkstate.pull_interval_for(16) == 0.01 and linkstate.pull_interval_for(1000) == 0.1
    assert linkstate.pull_interval_for(10_000) == 1.0
    # (polls per round) x (ids per poll) / N stays constant when a round lasts c * N seconds
    c = 0.01
    work = [(c * n / linkstate.pull_interval_for(n)) * n / n for n in (1000, 10_000, 100_000)]
    assert work[0] == 100
    assert max(work) / min(work) < 1.01

    class G:
        pull_interval = 0.1

    g = G()
    linkstate.scale_pull_interval(g, 20_000)
    assert g.pull_interval == 2.0
    linkstate.scale_pull_interval(object(), 20_000)  # a grid without the attribute: nothing to do


def test_flowers_loop_is_replaced_while_active_and_restored():
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with linkstate.indexed_message_lookup():
        assert vce_api.add_messages_to_queue is linkstate._add_messages_to_queue
    assert vce_api.add_messages_to_queue is original


def test_a_sweep_visits_only_the_nodes_with_a_pending_message(monkeypatch):
    """300 registered nodes, messages for 3 of them: over many sweeps the loop asks only those 3 (Flower's loop asks
    all 300 on every sweep), and asks nothing once their messages are handed out."""
    import queue
    import threading
    import time

    state, ids = _state_with(300, [1, 0, 0, 2] + [0] * 296)
    calls: list[int] = []
    orig = InMemoryLinkState.get_message_ins
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    with linkstate.indexed_message_lookup():
        patched = InMemoryLinkState.get_message_ins

        def counting(self, node_id, limit=None, **kw):
            calls.append(node_id)
            return patched(self, node_id, limit, **kw)

        monkeypatch.setattr(InMemoryLinkState, "get_message_ins", counting)
        t = threading.Thread(target=linkstate._add_messages_to_queue, args=(state, out, dict.fromkeys(ids), stop))
        t.start()
        got = [out.get(timeout=5).metadata.message_id for _ in range(3)]
        time.sleep(20 * linkstate.SWEEP_INTERVAL)  # about 20 more sweeps with nothing pending
        stop.set()
        t.join(timeout=5)
        monkeypatch.setattr(InMemoryLinkState, "get_message_ins", patched)
    assert sorted(got) == ["m0-0", "m0-3", "m1-3"] and out.empty()
    assert sorted(calls) == sorted([ids[0], ids[3], ids[3]])  # one message per node and sweep, as Flower's loop
    assert InMemoryLinkState.get_message_ins is orig


def test_the_sweep_loop_queues_each_pending_message_once():
    import queue
    import threading

    state, ids = _state_with(3, [2, 0, 1])
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    with linkstate.indexed_message_lookup():
        t = threading.Thread(target=linkstate._add_messages_to_queue, args=(state, out, dict.fromkeys(ids), stop))
        t.start()
        got = [out.get(timeout=5).metadata.message_id for _ in range(3)]
        stop.set()
        t.join(timeout=5)
    assert sorted(got) == ["m0-0", "m0-2", "m1-0"] and out.empty()
