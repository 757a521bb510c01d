"""Flower's own FedAvg with the same traffic counters as the routing strategy: the federated baseline of every
comparison (run-config ``strategy=fedavg``)."""

from __future__ import annotations

from logging import WARNING

from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from .base import Report, wait_and_register


class CountingFedAvg(FedAvg):
    """Flower's own FedAvg, counting communication as the routing strategy does: dense model bytes each way.

    Each sampled node receives the global model (8 x its array bytes, counted as received) and sends its trained
    model back (8 x the reply's array bytes, counted as sent). The constructor takes ``num_nodes`` plus FedAvg's
    own arguments; ``fraction_evaluate`` is forced to 0 (the ServerApp evaluates the global model centrally).
    """

    def __init__(self, num_nodes: int, **kwargs) -> None:
        kwargs.setdefault("min_available_nodes", num_nodes)
        kwargs.setdefault("min_train_nodes", 2)
        kwargs["fraction_evaluate"] = 0.0
        super().__init__(**kwargs)
        self.num_nodes = num_nodes
        self.bits_sent = [0] * num_nodes
        self.bits_received = [0] * num_nodes
        self.node_to_part: dict[int, int] = {}
        self.register_timeout = 120.0

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kw):
        self.node_to_part = wait_and_register(grid, self.num_nodes, self.register_timeout).node_to_part
        return super().start(grid, initial_arrays, num_rounds=num_rounds, **kw)

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        size = 8 * sum(a.numpy().nbytes for a in arrays.values())
        for m in msgs:
            if m.metadata.dst_node_id in self.node_to_part:  # a node left out at registration is not counted
                self.bits_received[self.node_to_part[m.metadata.dst_node_id]] += size
        return msgs

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for r in replies:
            if not r.has_error() and r.metadata.src_node_id in self.node_to_part:
                size = 8 * sum(a.numpy().nbytes for a in r.content["arrays"].values())
                self.bits_sent[self.node_to_part[r.metadata.src_node_id]] += size
            else:
                log(WARNING, "FedAvg round %s: a node failed: %s", server_round, r.error.reason)
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def report(self) -> Report:
        """The traffic counters, in the report the ServerApp reads from every strategy (no push-sum fields)."""
        return Report(bits_sent=list(self.bits_sent), bits_received=list(self.bits_received))
