"""Flower ClientApp (Message API): each virtual client is one push-sum node (node id = partition id).

The handlers (query, train, evaluate) are in node_handlers.py. This module imports neither torch nor the data:

- no node worker configured (simulation, or a SuperNode started plainly): the ClientApp imports node_handlers on
  its first message and runs it in this process (as before);
- a node worker configured (``$SPARSEPUSH_NODE_WORKER`` or node-config ``node-worker``: a Unix socket path, set by
  ``sparsepush node``): the ClientApp is a thin relay (relay.py) to the long-lived worker next to the SuperNode,
  which holds the node's data and model and runs the same handlers (node_worker.py). Flower starts a fresh ClientApp
  process for every message on a SuperNode, so this saves importing torch and rebuilding data and model each time.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_sparsepush.flower.worker_link import relay, worker_address


def make_client_app(run_config: dict | None = None, mods: list | None = None, relay_ok: bool = True) -> ClientApp:
    """The ClientApp; ``run_config`` replaces ``context.run_config`` (used by tests and ``run_simulation``);
    ``mods`` are Flower client mods around every message (the tests' hostile node is one); ``relay_ok=False``: never
    relay (the node worker's own ClientApp)."""
    app = ClientApp(mods=mods)
    local: list = []  # the in-process NodeHandlers, built on the first message that is not relayed

    def handle(kind: str, msg: Message, context: Context) -> Message:
        path = worker_address(context) if relay_ok else None
        if path is not None:
            return Message(relay(path, kind, msg.content, context, run_config), reply_to=msg)
        if not local:
            from flower_sparsepush.flower.node_handlers import NodeHandlers  # torch, data: only on this path

            local.append(NodeHandlers(run_config))
        return Message(local[0].handle(kind, msg.content, context), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle("query", msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle("train", msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle("evaluate", msg, context)

    return app


def __getattr__(name: str) -> Any:  # the helpers that lived here before node_handlers.py (torch: imported lazily)
    if name in ("NodeHolder", "split", "join", "pending_weight", "STAMP", "STATE", "SNAPSHOT", "NodeHandlers"):
        from flower_sparsepush.flower import node_handlers

        return getattr(node_handlers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


app = make_client_app()
