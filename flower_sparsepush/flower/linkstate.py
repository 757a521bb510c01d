"""Linear-time message lookup for Flower's simulation engine (``flwr.simulation``, in-memory link state).

Why: Flower 1.42's simulation engine has a thread (``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the
link state for the pending message of *every* registered node (``InMemoryLinkState.get_message_ins(node_id,
limit=1)``), and each of those calls walks the *whole* message store, checking every stored message
(``_check_stored_messages``: clock read, federation filter) before comparing its destination. With N nodes and the
M = N train messages of a round in the store, one sweep costs N x M checks: at 512 nodes a profile measured 5.8
million checks and 143 s of that thread's time in a 3-round run (most of the round time, and it holds the GIL and
the store's lock that the ClientApp workers and the ServerApp need). That is the part of a round that grows
faster than the node count.

What :func:`indexed_message_lookup` changes, for as long as it is active: the link state keeps, per destination
node, the ids of its stored, not yet delivered messages (in the order they were stored), and
``get_message_ins(node_id, limit)`` looks only at those. A call costs O(messages pending for that node), not O(all
stored messages); a sweep over N nodes is O(N). Same results: the same messages, in the same order, marked
delivered the same way; the expiry / federation check (``_check_stored_messages``) runs on each candidate it
returns, as in Flower's own lookup. What it does not do is check (and expire) the *other* nodes' messages on each call: those are
checked when their own node asks, and by ``get_message_res`` when the ServerApp pulls replies, as in Flower.

It also replaces the engine's sweep loop: each sweep visits only the nodes that have a pending message (the index
knows them; Flower's loop asks all N nodes every time, which is O(N^2) per round), every 10 ms instead of Flower's
fixed 0.1 s, which every message of a round waited half of on average.

It replaces two methods of Flower's ``InMemoryLinkState`` class and the engine's sweep loop
(``vce_api.add_messages_to_queue``) while active (and puts the originals back on exit); nothing in site-packages is
edited. It is used by :func:`flower_sparsepush.flower.launch.simulate` and the scale
benchmark. No other module of this project imports Flower's link state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

_INDEX = "_sparsepush_pending"  # on the link state: (generation, {dst node id: {message id: None}} (ordered))
_active = 0
_generation = 0  # one per activation: an index built in an earlier one may miss messages stored in between
_guard = threading.Lock()
_originals: dict[str, object] = {}


def _pending(state: InMemoryLinkState) -> dict[int, dict[str, None]]:
    """The per-node index of ``state``, built from its store on first use (caller holds ``state.lock``)."""
    held = getattr(state, _INDEX, None)
    if held is not None and held[0] == _generation:
        return held[1]
    index: dict[int, dict[str, None]] = {}
    for msg_id, msg in state.message_ins_store.items():
        if msg.metadata.delivered_at == "":
            index.setdefault(msg.metadata.dst_node_id, {})[msg_id] = None
    setattr(state, _INDEX, (_generation, index))
    return index


def _store_message_ins(self: InMemoryLinkState, message) -> str | None:
    with self.lock:
        msg_id = _originals["store_message_ins"](self, message)
        stored = self.message_ins_store.get(msg_id) if msg_id else None
        if stored is not None and stored.metadata.delivered_at == "":
            _pending(self).setdefault(stored.metadata.dst_node_id, {})[msg_id] = None
    return msg_id


def _get_message_ins(self: InMemoryLinkState, node_id: int, limit: int | None, *, run_id: int | None = None):
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found = []
    with self.lock:
        ids = _pending(self).get(node_id)
        if not ids:  # the common case in a sweep over all nodes: nothing pending for this one
            return found
        for msg_id in list(ids):
            self._check_stored_messages({msg_id})
            msg = self.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "" or msg.metadata.dst_node_id != node_id:
                ids.pop(msg_id, None)  # deleted, expired or delivered: never pending again
                continue
            if run_id is None or msg.metadata.run_id == run_id:
                found.append(msg)
                ids.pop(msg_id, None)
            if limit and len(found) == limit:
                break
        if not ids:
            _pending(self).pop(node_id, None)
    if found:
        delivered_at = now().isoformat()
        for msg in found:
            msg.metadata.delivered_at = delivered_at
    return found


SWEEP_INTERVAL = 0.01  # seconds between the engine's sweeps (Flower's own loop waits 0.1 s)


def _add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
    """Flower's ``add_messages_to_queue`` loop, visiting only the nodes that have a pending message.

    Flower's loop asks every registered node for its next message on every sweep, O(N) per sweep whether or not
    anything is pending; at one sweep every 10 ms and a round that lasts O(N), that is O(N^2) per round (at 1,000
    nodes about 1,000 lookups every 10 ms, all holding the link state's lock and the GIL that the ServerApp and the
    Ray submissions need). The index knows which nodes have one, so a sweep costs O(nodes with a pending message):
    all of a round's nodes once when the round's messages are stored, nothing while the round runs. Each visited
    node still hands out at most one message per sweep (``limit=1``), as in Flower's loop."""
    while not f_stop.is_set():
        with state.lock:
            ready = [n for n in _pending(state) if n in nodes_mapping]
        for node_id in ready:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(SWEEP_INTERVAL)


@contextlib.contextmanager
def indexed_message_lookup() -> Iterator[None]:
    """While active, Flower's in-memory link state finds a node's pending messages through a per-node index
    (module docstring). Re-entrant; the original methods are restored when the outermost use ends."""
    global _active, _generation
    with _guard:
        if _active == 0:
            _generation += 1
            _originals["store_message_ins"] = InMemoryLinkState.store_message_ins
            _originals["get_message_ins"] = InMemoryLinkState.get_message_ins
            InMemoryLinkState.store_message_ins = _store_message_ins
            InMemoryLinkState.get_message_ins = _get_message_ins
            _originals["add_messages_to_queue"] = vce_api.add_messages_to_queue
            vce_api.add_messages_to_queue = _add_messages_to_queue
        _active += 1
    try:
        yield
    finally:
        with _guard:
            _active -= 1
            if _active == 0:
                InMemoryLinkState.store_message_ins = _originals.pop("store_message_ins")
                InMemoryLinkState.get_message_ins = _originals.pop("get_message_ins")
                vce_api.add_messages_to_queue = _originals.pop("add_messages_to_queue")


def is_active() -> bool:
    return _active > 0


def pull_interval_for(num_messages: int, base: float = 0.01, per_message: float = 1e-4) -> float:
    """Seconds between the ServerApp's polls for replies when ``num_messages`` are outstanding.

    Flower's in-memory Grid polls ``get_message_res`` for *all* outstanding message ids every ``pull_interval``
    (0.1 s); a poll costs O(outstanding) and holds the link state's lock, and a round lasts O(N), so a fixed interval
    makes the polling O(N^2) per round. ``max(base, per_message * N)`` keeps it O(N) per round (10 ms up to 100
    nodes, where a round is short and the wait for the last reply is a visible share of it; 0.1 s at 1,000 nodes;
    1 s at 10,000, which adds at most 1 s to a round that takes minutes).
    """
    return max(base, per_message * num_messages)


def scale_pull_interval(grid, num_nodes: int) -> None:
    """Set :func:`pull_interval_for` on Flower's in-memory Grid (the simulation engine's); other grids have no
    ``pull_interval`` and are left as they are."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = pull_interval_for(num_nodes)
