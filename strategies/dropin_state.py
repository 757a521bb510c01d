"""The drop-in strategy's node states seen from outside: models as flat vectors and ArrayRecords, the consensus,
push-sum mass and the traffic counters (a mixin of :class:`~flower_sparsepush.strategies.dropin.DecentralizedFedAvg`,
which sets ``layout``, ``nodes``, ``router``, ``fixed``, ``bits_sent`` and the ``flower_bits_*`` lists)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from flower_sparsepush.core.pushsum import NodeState

from .base import EvalReport, Report, eval_report


class DropinStates:
    """Models, consensus, mass and traffic of the nodes the strategy holds."""

    # -- models <-> flat vectors ---------------------------------------------------------------------------------------

    def _mixed(self, key: str) -> bool:
        return next(m for k, _, _, m in self.layout if k == key)

    def _flatten(self, record: ArrayRecord, who: str = "initial_arrays") -> torch.Tensor:
        keys = [k for k, *_ in self.layout]
        if list(record.keys()) != keys and sorted(record.keys()) != sorted(keys):
            raise ValueError(f"{who}: expected arrays {keys}, got {list(record.keys())}")
        parts = []
        for key, shape, _, mixed in self.layout:
            if not mixed:
                continue
            a = record[key].numpy()
            if tuple(a.shape) != shape:
                raise ValueError(f"{who}: array {key!r} has shape {tuple(a.shape)}, expected {shape}")
            if a.dtype.kind not in "fiu" or not np.isfinite(a).all():  # one NaN would spread to every node
                raise ValueError(f"{who}: array {key!r} is not all finite numbers")
            parts.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(-1))
        return torch.cat(parts)

    def _record(self, vec: torch.Tensor, fixed: dict[str, np.ndarray]) -> ArrayRecord:
        """A flat vector back into an ArrayRecord with the initial keys, shapes and dtypes."""
        v = vec.detach().cpu().numpy()
        out, off = {}, 0
        for key, shape, dtype, mixed in self.layout:
            if mixed:
                size = int(np.prod(shape))
                out[key] = Array(np.ascontiguousarray(v[off : off + size].reshape(shape).astype(dtype)))
                off += size
            else:
                out[key] = Array(np.ascontiguousarray(fixed[key]))
        return ArrayRecord(out)

    def node_vectors(self) -> list[torch.Tensor]:
        """Every node's de-biased model z_i as a flat float32 vector (node-index order)."""
        return [s.z.to(torch.float32) for s in self.states]

    @property
    def states(self) -> list[NodeState]:
        """Every node's push-sum state (node-index order)."""
        return [node.state for node in self.nodes]

    def node_arrays(self) -> list[ArrayRecord]:
        """Every node's de-biased model z_i with the initial keys, shapes and dtypes (node-index order)."""
        return [self._record(z, f) for z, f in zip(self.node_vectors(), self.fixed)]

    def consensus_arrays(self) -> ArrayRecord:
        """The consensus model mean_i z_i (non-floating arrays are node 0's)."""
        zbar = torch.stack([s.z.to(torch.float64) for s in self.states]).mean(0)
        return self._record(zbar, self.fixed[0])

    def mass(self) -> dict[str, float]:
        """Push-sum weight held by the nodes and by messages in transit; together they are always n."""
        y_nodes = float(sum(s.y for s in self.states))
        y_transit = self.router.in_transit_mass() if self.router else 0.0
        return {"y_nodes": y_nodes, "y_in_transit": y_transit, "y_total": y_nodes + y_transit}

    @property
    def peer_bits_sent(self) -> list[int]:
        """Bits of the encoded push-sum messages each node sent (what the graph carries)."""
        return self.bits_sent

    @property
    def peer_bits_received(self) -> list[int]:
        return list(self.router.delivered_bits) if self.router else []

    def consensus(self, server_round: int) -> EvalReport:
        """The nodes' models, weights and their consensus now, as the native routers report it (no accuracies: the
        ClientApp's metrics are its own)."""
        mass = self.mass()
        return eval_report(
            server_round,
            {i: z.numpy() for i, z in enumerate(self.node_vectors())},
            {i: s.y for i, s in enumerate(self.states)},
            {},
            y_pending=0.0,
            y_mailboxes=mass["y_in_transit"],
        )

    def report(self) -> Report:
        return Report(
            bits_sent=list(self.bits_sent),
            bits_received=self.peer_bits_received,
            last_eval=self.last_eval,
            messages_dropped=self.router.dropped if self.router else 0,
            straggler_events=list(self.failures),
            registration_left_out=list(self.left_out),
        )

    def traffic(self) -> dict[str, float]:
        """Bits so far, per node on average: peer-to-peer (what the graph carries) and dense Flower arrays."""
        n = max(self.n, 1)
        return {
            "peer_bits_sent_per_node": sum(self.peer_bits_sent) / n,
            "peer_bits_received_per_node": sum(self.peer_bits_received) / n,
            "flower_bits_down_per_node": sum(self.flower_bits_down) / n,
            "flower_bits_up_per_node": sum(self.flower_bits_up) / n,
        }
