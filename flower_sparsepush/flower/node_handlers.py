"""The node's side of every message, as plain functions of (message content, context) -> reply content.

Both the in-process ClientApp (client_app.py, simulation and a SuperNode without a worker) and the long-lived node
worker (node_worker.py, next to a SuperNode) call :class:`NodeHandlers`: one implementation of the round.

- ``query``: answers its ``partition-id`` (the ServerApp learns node id -> partition id, also of a SuperNode that
  reconnects mid-run).
- ``train`` (sgp / sparse-push / scsp): loads the node's state, does the node's round
  (:func:`node_round`, the function the in-process loop runs: bounces back, inbox absorbed, local SGD,
  messages out), keeps the state and replies with its messages (protocol.py has the records).
- ``train`` (fedavg): local SGD steps from the received global model, replies the model and ``num-examples``.
- ``evaluate``: accuracy/loss of the node's de-biased model z on the test set (its first ``eval-node-samples``
  samples), and z itself so the ServerApp computes the consensus model and the consensus distance.

Node state lives in the node store (store.py: files per node where the node runs; ``context.state`` keeps only
its :class:`~flower_sparsepush.flower.store.Stamp`), or, with ``node-store=context``, whole in ``context.state``.

A node keeps each outbox until the relay acknowledges it (``acked`` in the next train message), and resends the
unacknowledged ones with its next reply: a reply lost on the way loses no mass. Frames handed to it again after a
lost reply are absorbed only if the node had not finished that round.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from flower_sparsepush.core.codec import decode
from flower_sparsepush.core.node import state_from_flat, state_to_flat
from flower_sparsepush.flower import node_merge, protocol
from flower_sparsepush.flower.node_merge import PREFIX, Marks
from flower_sparsepush.flower.store import CONTEXT, NodeStore, Stamp, StoreError
from flower_sparsepush.learn.evaluate import evaluate
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.node_train import init_state, local_sgd, node_round, node_threads
from flower_sparsepush.run.setup import get_setup

STAMP = "ps-stamp"  # context.state: the Stamp of the node's stored state
STATE = "ps-state"  # context.state with node-store=context: the flat state itself
SNAPSHOT = "ps-snap"  # context.state with node-store=context: the last checkpoint copy


class NodeHolder:
    """Where one node's flat state is kept between messages: the node store, or ``context.state``."""

    def __init__(self, context: Context, cfg: dict, node: int, token: str) -> None:
        self.context, self.node, self.token = context, node, token
        self.in_context = cfg.node_store == CONTEXT
        self.store = None if self.in_context else NodeStore(cfg.node_store or None, token)

    def stamp(self) -> Stamp | None:
        rec = self.context.state.get(STAMP)
        if rec is None or rec["token"] != self.token:
            return None  # a new run, or a SuperNode that restarted: the store decides
        return Stamp(rec["token"], int(rec["node"]), int(rec["round"]), int(rec["checksum"]))

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(last finished round, flat state), or None for a node that has no state yet."""
        if self.in_context:
            if STATE not in self.context.state or self.stamp() is None:
                return None
            rec = self.context.state[STATE]
            return self.stamp().round, {k: torch.from_numpy(np.array(rec[k].numpy())) for k in rec}
        hit = self.store.load(self.node, self.stamp())
        return None if hit is None else (hit[0].round, hit[1])

    def save(self, rnd: int, flat: dict[str, torch.Tensor], snapshot: bool) -> None:
        if self.in_context:
            rec = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in flat.items()})
            self.context.state[STATE] = rec
            if snapshot:
                self.context.state[SNAPSHOT] = ArrayRecord(dict(rec.items()))
                self.context.state[SNAPSHOT + "-round"] = ConfigRecord({"round": rnd})
            stamp = Stamp(self.token, self.node, rnd, 0)
        else:
            stamp = self.store.save(self.node, rnd, flat)
            if snapshot:
                self.store.snapshot(self.node, rnd + 1)
        self.context.state[STAMP] = ConfigRecord(
            {"token": stamp.token, "node": stamp.node, "round": stamp.round, "checksum": stamp.checksum}
        )

    def restore(self, checkpoint: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Go back to the copy kept after round ``checkpoint - 1`` (a resumed run). None: the node had no state."""
        if self.in_context:
            raise StoreError("a resumed run needs node-store to be a folder: context.state does not outlive a run")
        if checkpoint == 0:
            return None
        stamp, flat = self.store.restore(self.node, checkpoint)
        self.context.state[STAMP] = ConfigRecord(
            {"token": stamp.token, "node": stamp.node, "round": stamp.round, "checksum": stamp.checksum}
        )
        return stamp.round, flat


REJ = "rej."  # a stored flat dict: what the node rejected of a batch the relay has not acknowledged


def split(
    flat: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[int, protocol.Frames], Marks, dict[int, list[int]]]:
    """A stored flat dict -> (node state part, pending outboxes by round, merge marks, rejections by batch)."""
    pending = {int(k[4:]): protocol.unpack_frames(v.numpy().tobytes()) for k, v in flat.items() if k[:4] == "out."}
    marks = Marks.from_flat({k: v for k, v in flat.items() if k.startswith(PREFIX)})
    refusals = {int(k[len(REJ) :]): v.tolist() for k, v in flat.items() if k.startswith(REJ)}
    state = {k: v for k, v in flat.items() if k[:4] != "out." and not k.startswith((PREFIX, REJ))}
    return state, pending, marks, refusals


def join(
    state_flat: dict[str, torch.Tensor],
    pending: dict[int, protocol.Frames],
    marks: Marks | None = None,
    refusals: dict[int, list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    out = dict(state_flat)
    for r, frames in pending.items():
        buf = protocol.pack_frames(frames)
        out[f"out.{r}"] = (
            torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)
        )
    if marks is not None:
        out.update(marks.to_flat())
    for r, idx in (refusals or {}).items():
        out[f"{REJ}{r}"] = torch.tensor(idx, dtype=torch.int64)
    return out


def rejections(
    groups: list[tuple[int, protocol.Frames]], earlier: dict[int, list[int]], now: list[int]
) -> tuple[list[int], dict[int, list[int]]]:
    """The positions a train reply rejects, and the rejections to keep.

    ``groups`` is what the node was handed, by batch (the batches handed again after a lost reply, then this
    round's), ``earlier`` what it rejected of earlier batches, by batch and index in it, and ``now`` the positions
    (into ``groups``, concatenated) it rejects in this round. A rejection is reported again in every reply for as
    long as the relay hands its batch again: when the reply that carried it was lost, the relay learns it from the
    next one (otherwise the weight ledger would credit the node with a message it never absorbed, and refuse it).
    """
    where, start = [], {}
    for r, frames in groups:
        start[r] = len(where)
        where += [(r, j) for j in range(len(frames))]
    keep = {r: list(idx) for r, idx in earlier.items() if r in start}
    for p in now:
        r, j = where[p]
        keep.setdefault(r, []).append(j)
    positions = sorted({start[r] + j for r, idx in keep.items() for j in idx})
    return positions, keep


def pending_weight(pending: dict[int, protocol.Frames]) -> float:
    return float(sum(decode(d).y for frames in pending.values() for _, d in frames))


class NodeHandlers:
    """The node's message handlers: ``handlers.handle(kind, content, context) -> reply content``.

    ``run_config`` replaces ``context.run_config`` (tests and ``run_simulation``). Keeps the validated config of the
    latest run; ``get_setup`` caches data and model per process, so a long-lived process (the node worker)
    builds them once.
    """

    def __init__(self, run_config: dict | None = None) -> None:
        self.run_config = run_config
        self._cfg: dict = {}

    def cfg_of(self, context: Context) -> dict:
        raw = dict(self.run_config if self.run_config is not None else context.run_config)
        key = tuple(sorted((k, str(v)) for k, v in raw.items()))
        if key not in self._cfg:
            self._cfg.clear()
            self._cfg[key] = validate(raw)
        return self._cfg[key]

    @staticmethod
    def setup_threads() -> None:
        torch.set_num_threads(node_threads())

    @staticmethod
    def node_id(context: Context) -> int:
        return int(context.node_config["partition-id"])

    def handle(self, kind: str, content: RecordDict, context: Context) -> RecordDict:
        """The reply content to a ``query`` / ``train`` / ``evaluate`` message; updates ``context.state``."""
        if kind == "query":
            return self.query(content, context)
        if kind == "train":
            return self.train(content, context)
        if kind == "evaluate":
            return self.evaluate(content, context)
        raise ValueError(f"no handler for message type {kind!r}")

    @staticmethod
    def open_node(holder: NodeHolder, setup, restore: int):
        """(state, pending outboxes, last finished round, merge marks) of the node, after a restore when asked."""
        got = holder.restore(restore) if restore >= 0 else holder.load()
        if got is None:
            return init_state(setup), {}, -1, Marks(), {}
        done, flat = got
        state_flat, pending, marks, refusals = split(flat)
        return state_from_flat(state_flat), pending, done, marks, refusals

    def query(self, content: RecordDict, context: Context) -> RecordDict:
        return protocol.query_reply_content(self.node_id(context))

    def train(self, content: RecordDict, context: Context) -> RecordDict:
        self.setup_threads()
        cfg = self.cfg_of(context)
        setup = get_setup(cfg)
        node = self.node_id(context)
        if cfg.strategy == "fedavg":
            return self.fedavg_train(content, context, cfg, setup, node)
        if protocol.MERGE in content:
            return self.merge(content, context, cfg, setup, node)
        order = protocol.read_train(content)
        holder = NodeHolder(context, cfg, node, order.token or "run")
        state, pending, done, marks, refusals = self.open_node(holder, setup, order.restore)
        t = order.round
        if t <= done:
            raise RuntimeError(f"node {node} was asked for round {t} but has already finished round {done}")
        pending = {r: f for r, f in pending.items() if r > order.acked}  # the relay routed those
        for outcome in order.merges:  # merges it missed or did not confirm, before anything else
            node_merge.settle(setup, state, node, marks, outcome)
        # what was handed again after a lost reply counts first (positions), absorbed only for unfinished rounds
        # and merge batches it has not absorbed (protocol.absorbs)
        groups = [*order.redo, (t, order.inbox)]
        handed = [(r, f) for r, frames in groups for f in frames]
        keep = [i for i, (r, _) in enumerate(handed) if protocol.absorbs(r, done, marks.absorbed)]
        again = [*order.redo_bounced, (t, order.bounced)]
        bounced = [f for r, frames in again if protocol.absorbs(r, done, marks.absorbed) for f in frames]
        res = node_round(setup, state, node, t, [handed[i][1] for i in keep], bounced)
        refused, refusals = rejections(groups, refusals, [keep[r.index] for r in res.rejected])
        resent = sorted(pending.items())
        pending[t] = sorted(res.messages.items())
        holder.save(t, join(state_to_flat(state), pending, marks, refusals), order.snapshot)
        return protocol.train_reply_content(t, pending[t], refused, resent, res.loss, state.y)

    def merge(self, content: RecordDict, context: Context, cfg, setup, node: int) -> RecordDict:
        """A merge phase (node_merge.py): the node's state, its reply, its state saved."""
        order = protocol.read_merge(content)
        holder = NodeHolder(context, cfg, node, order.token or "run")
        state, pending, done, marks, refusals = self.open_node(holder, setup, order.restore)
        pending = {r: f for r, f in pending.items() if r > order.acked}
        if order.phase == "give":
            reply = node_merge.give(setup, state, node, done, marks, order)
        else:
            reply = node_merge.PHASES[order.phase](setup, state, node, marks, order)
        holder.save(done, join(state_to_flat(state), pending, marks, refusals), order.snapshot)
        return reply

    def fedavg_train(self, content: RecordDict, context: Context, cfg: dict, setup, node: int) -> RecordDict:
        z = torch.from_numpy(np.array(content["arrays"]["z"].numpy()))
        rnd = protocol.core_round(int(content["config"]["server-round"]))
        holder = NodeHolder(context, cfg, node, str(content["config"].get("token", "fedavg")))
        got = holder.load()
        mom = got[1]["m"] if got is not None and "m" in got[1] else None
        z_new, mom, loss = local_sgd(setup, z, mom, node, rnd)
        if mom is not None:
            holder.save(rnd, {"m": mom}, snapshot=False)
        metrics = MetricRecord({"num-examples": len(setup.shards[node][1]), "train_loss": loss})
        return RecordDict({"arrays": ArrayRecord({"z": Array(z_new.numpy())}), "metrics": metrics})

    def evaluate(self, content: RecordDict, context: Context) -> RecordDict:
        self.setup_threads()
        cfg = self.cfg_of(context)
        setup = get_setup(cfg)
        conf = content[protocol.CONFIG]
        holder = NodeHolder(context, cfg, self.node_id(context), str(conf.get("token", "run")))
        state, pending, done, marks, _ = self.open_node(holder, setup, int(conf.get("restore", -1)))
        pending = {r: f for r, f in pending.items() if r > int(conf.get("acked", -1))}  # routed ones are in mailboxes
        z = state.z.to(torch.float32)
        acc, loss = evaluate(setup, z, cfg.eval_node_samples)
        val_acc = None if setup.val is None else evaluate(setup, z, cfg.eval_node_samples, "val")[0]
        y_pending = pending_weight(pending)
        return protocol.eval_reply_content(
            z.numpy(), acc, loss, state.y, y_pending, done, absorbed=marks.absorbed, val_acc=val_acc
        )
