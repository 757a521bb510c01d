"""Flower ClientApp (Message API): each virtual client is one push-sum node (node id = partition id).

The handlers (query, train, evaluate) are in node_handlers.py. This module imports neither torch nor the data:

- no node worker configured (simulation, or a SuperNode started plainly): the ClientApp imports node_handlers on
  its first message and runs it in this process;
- a node worker configured (``$SPARSEPUSH_NODE_WORKER`` or node-config ``node-worker``: a Unix socket path, set by
  ``sparsepush node``): the ClientApp forwards each message over the worker link (worker_link.py) to the long-lived
  worker next to the SuperNode, which holds the node's data and model and runs the same handlers (node_worker.py).
  Flower starts a fresh ClientApp process for every message on a SuperNode, so this saves importing torch and
  rebuilding data and model each time.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_sparsepush.flower.worker_link import forward, worker_address


def make_client_app(run_config: dict | None = None, mods: list | None = None, use_worker: bool = True) -> ClientApp:
    """The ClientApp; ``run_config`` replaces ``context.run_config`` (used by tests and ``run_simulation``);
    ``mods`` are Flower client mods around every message (the tests' hostile node is one); ``use_worker=False``:
    run every message here, never forward it to a node worker (the node worker's own ClientApp)."""
    app = ClientApp(mods=mods)
    local: list = []  # the in-process NodeHandlers, built on the first message run here

    def handle(kind: str, msg: Message, context: Context) -> Message:
        path = worker_address(context) if use_worker else None
        if path is not None:
            return Message(forward(path, kind, msg.content, context, run_config), reply_to=msg)
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


app = make_client_app()
