"""Flower ClientApp (Message API): each virtual client is one push-sum node (node id = partition id).

- ``query``: answers its ``partition-id`` (the ServerApp learns node id -> partition id before round 1).
- ``train`` (sgp / sparse-push): takes back the mass of its bounced messages (``inbox.bounced``; router.py),
  absorbs the packed inbox (each frame's sender is the one the router names; a message that says otherwise is
  rejected), runs the local SGD steps and replies with its outgoing encoded push-sum messages (one frame per
  out-neighbour), the positions of the inbox messages it rejected (the server bounces them to their senders) and
  metrics. The work is :func:`training.node_round`,
  the same function the in-process loop runs.
- ``train`` (fedavg): local SGD steps from the received global model, replies the model and ``num-examples``.
- ``evaluate``: accuracy/loss of the node's de-biased model z on the test set (its first ``eval-node-samples``
  samples), and z itself so the ServerApp computes the consensus model and the consensus distance.

Push-sum state lives in ``context.state`` as one ArrayRecord (x, momentum, error memory, per-edge references)
and one ConfigRecord (y); it is pickled with every message, so nothing else is kept there.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_sparsepush.config import validate
from flower_sparsepush.pushsum import NodeState
from flower_sparsepush.strategies.routing import pack_frames, unpack_frames
from flower_sparsepush.training import absorb_bounces, evaluate, get_setup, init_state, local_sgd, node_round

STATE_ARRAYS = "ps"
STATE_META = "ps-meta"


def _np(t: torch.Tensor) -> Array:
    return Array(t.detach().cpu().numpy())


def save_state(context: Context, state: NodeState) -> None:
    arrays = {"x": _np(state.x)}
    if state.momentum is not None:
        arrays["m"] = _np(state.momentum)
    if state.error is not None:
        arrays["e"] = _np(state.error)
    if state.anchor is not None:
        arrays["a"] = _np(state.anchor)
    for j, ref in state.refs_out.items():
        arrays[f"ro.{j}"] = _np(ref)
    for j, ref in state.refs_in.items():
        arrays[f"ri.{j}"] = _np(ref)
    context.state[STATE_ARRAYS] = ArrayRecord(arrays)
    context.state[STATE_META] = ConfigRecord({"y": float(state.y)})


def load_state(context: Context) -> NodeState | None:
    if STATE_ARRAYS not in context.state:
        return None
    arr = context.state[STATE_ARRAYS]

    def t(key: str) -> torch.Tensor:
        return torch.from_numpy(np.array(arr[key].numpy()))

    state = NodeState(x=t("x"), y=float(context.state[STATE_META]["y"]))
    state.momentum = t("m") if "m" in arr else None
    state.error = t("e") if "e" in arr else None
    state.anchor = t("a") if "a" in arr else None
    for key in arr:
        if key.startswith("ro."):
            state.refs_out[int(key[3:])] = t(key)
        elif key.startswith("ri."):
            state.refs_in[int(key[3:])] = t(key)
    return state


def make_client_app(run_config: dict | None = None, mods: list | None = None) -> ClientApp:
    """The ClientApp; ``run_config`` replaces ``context.run_config`` (used by tests and ``run_simulation``);
    ``mods`` are Flower client mods around every message (the tests' hostile node is one)."""
    app = ClientApp(mods=mods)
    cache: dict = {}

    def cfg_of(context: Context) -> dict:
        raw = dict(run_config if run_config is not None else context.run_config)
        key = tuple(sorted((k, str(v)) for k, v in raw.items()))
        if key not in cache:
            cache.clear()
            cache[key] = validate(raw)
        return cache[key]

    def setup_threads() -> None:
        torch.set_num_threads(max(1, int(os.environ.get("SPARSEPUSH_CLIENT_THREADS", "1"))))

    def node_id(context: Context) -> int:
        return int(context.node_config["partition-id"])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"info": ConfigRecord({"partition-id": node_id(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        setup_threads()
        cfg = cfg_of(context)
        setup = get_setup(cfg)
        node = node_id(context)
        if cfg["strategy"] == "fedavg":
            z = torch.from_numpy(np.array(msg.content["arrays"]["z"].numpy()))
            rnd = int(msg.content["config"]["server-round"]) - 1
            mom = torch.from_numpy(np.array(context.state["m"]["m"].numpy())) if "m" in context.state else None
            z_new, mom, loss = local_sgd(setup, z, mom, node, rnd)
            if mom is not None:
                context.state["m"] = ArrayRecord({"m": _np(mom)})
            return Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({"z": _np(z_new)}),
                        "metrics": MetricRecord({"num-examples": len(setup.shards[node][1]), "train_loss": loss}),
                    }
                ),
                reply_to=msg,
            )
        state = load_state(context) or init_state(setup)
        rnd = int(msg.content["config"]["round"])
        box = msg.content["inbox"]
        inbox = unpack_frames(box["frames"])  # (sender, bytes): the sender is the router's, not the message's
        bounced = unpack_frames(box["bounced"]) if "bounced" in box else []
        absorb_bounces(setup, state, node, rnd, bounced)  # before node_round absorbs the inbox, as in-process
        res = node_round(setup, state, node, rnd, inbox)
        save_state(context, state)
        refused = np.array([r.index for r in res.rejected], dtype="<u4").tobytes()  # the server bounces them
        return Message(
            RecordDict(
                {
                    "out": ConfigRecord(
                        {"round": rnd, "frames": pack_frames(sorted(res.messages.items())), "rejected": refused}
                    ),
                    "metrics": MetricRecord(
                        {"train_loss": res.loss, "rejected": len(res.rejected), "y": float(state.y)}
                    ),
                }
            ),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        setup_threads()
        cfg = cfg_of(context)
        setup = get_setup(cfg)
        state = load_state(context) or init_state(setup)
        z = state.z.to(torch.float32)
        acc, loss = evaluate(setup, z, cfg["eval-node-samples"])
        return Message(
            RecordDict(
                {
                    "model": ArrayRecord({"z": _np(z)}),
                    "metrics": MetricRecord({"acc": acc, "loss": loss, "y": float(state.y)}),
                }
            ),
            reply_to=msg,
        )

    return app


app = make_client_app()
