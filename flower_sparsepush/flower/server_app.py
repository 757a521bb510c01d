"""Flower ServerApp: validates the run config, builds the strategy, runs it, evaluates, writes results.

- ``sgp`` / ``sparse-push`` / ``scsp``: :class:`~flower_sparsepush.strategies.routing.RoutingStrategy` routes push-sum
  messages between nodes (no averaging). On evaluation rounds every node reports its de-biased model z_i and its
  own accuracy; the ServerApp computes z_bar = mean_i z_i, evaluates z_bar on the whole test set (consensus
  accuracy, loss) and the consensus distance mean_i ||z_i - z_bar||^2. The consensus model is a measurement only;
  it is never sent back to the nodes. A global merge (``final-merge``, ``merge-every``) adds three Flower rounds of
  messages after its training round (passed to ``Strategy.start``); rows, progress and checkpoints stay per
  training round, taken after the merge.
- ``fedavg``: Flower's own FedAvg (``CountingFedAvg`` only adds bit counters) on the same ClientApp training code,
  data, model, optimizer and seed; the global model is evaluated by the ServerApp, so the node accuracies equal the
  consensus accuracy and the consensus distance is 0.
"""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flower_sparsepush.flower.linkstate import indexed_message_lookup, scale_pull_interval
from flower_sparsepush.flower.store import CONTEXT, NodeStore
from flower_sparsepush.learn.evaluate import evaluate
from flower_sparsepush.run.checkpoint import read_checkpoint, write_checkpoint
from flower_sparsepush.run.config import RunConfig, validate
from flower_sparsepush.run.merging import merge_relay
from flower_sparsepush.run.preflight import preflight
from flower_sparsepush.run.results import Recorder
from flower_sparsepush.run.schedule import merge_due
from flower_sparsepush.run.setup import get_setup, network_of, reply_checks
from flower_sparsepush.strategies.fedavg import CountingFedAvg
from flower_sparsepush.strategies.routing import RoutingStrategy

ROUND_TIMEOUT_S = 3600.0  # the default of the round-timeout key
FLOWER_CHECKPOINT = "flower"  # the engine a Flower checkpoint belongs to (the in-process loop writes "inprocess")


def build_strategy(cfg: RunConfig, token: str = "run"):
    n = cfg.num_nodes
    if cfg.strategy == "fedavg":
        return _registering(CountingFedAvg(n, fraction_train=1.0, min_train_nodes=n), n)
    total = cfg.num_rounds + cfg.final_gossip_rounds
    merge_after = [t for t in range(total) if merge_due(cfg, t + 1, total)]  # the nodes merge after these rounds
    strategy = RoutingStrategy(
        n,
        algorithm=cfg.strategy,
        eval_every=cfg.eval_every,
        sample_seed=cfg.seed,
        network=network_of(cfg),
        bounce=cfg.bounce,
        token=token,
        checkpoint_every=cfg.checkpoint_every,
        checks=reply_checks(get_setup(cfg)),  # every reply is checked before anything of it is routed (guard.py)
        merges=merge_relay(get_setup(cfg)) if merge_after else None,
        merge_after=merge_after,
    )
    return _registering(strategy, n)


REGISTER_S_PER_NODE = 0.1  # the registration query round: one message per node (10,000 nodes took minutes here)


def _registering(strategy, n: int):
    """Give the strategy's registration (wait for n nodes, one query each) time that grows with n: the 120 s
    default ran out at 10,000 simulated nodes on 2 cores."""
    strategy.register_timeout = max(strategy.register_timeout, REGISTER_S_PER_NODE * n)
    return strategy


def save_flower_checkpoint(cfg: RunConfig, done: int, strategy, history: list[dict]) -> None:
    """The relay's side after ``done`` rounds (the nodes keep their own copies: store.NodeStore.snapshot)."""
    write_checkpoint(cfg, FLOWER_CHECKPOINT, done, {"strategy": strategy.state_dict(), "history": list(history)})


_REPORT_FIELDS = (
    "mailbox_messages",
    "mailbox_bits",
    "rejected_messages",
    "messages_rejected",
    "rejected_replies",
    "replies_rejected_by_node",
    "messages_rejected_by_sender",
    "messages_bounced_after_rejection",
    "excluded_nodes",
    "messages_dropped",
    "straggler_events",
    "nodes_not_returned",
    "eval_failures",
    "messages_resent",
    "weight_corrections",
    "reconnected_nodes",
    "registration_left_out",
    "missing_partitions",
)


class _ServerRun:
    """One run on the ServerApp: the strategy, the results files, and the per-round hook Flower calls
    (``evaluate_fn``, the one per-round hook of ``Strategy.start``, so progress and checkpoints are kept there).
    :class:`_GossipRun` and :class:`_FedAvgRun` say what differs between the routing strategies and FedAvg."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.setup = get_setup(cfg)
        self.rec = Recorder(cfg)
        self.token = f"{cfg.run_name}-{uuid.uuid4().hex[:10]}"  # this run's folder in every node's store
        self.strategy = build_strategy(cfg, self.token)
        self.last = cfg.num_rounds + cfg.final_gossip_rounds
        self.done0 = 0  # rounds done before this Flower run (a resumed run)

    def row(self, rnd: int, acc_c: float, loss: float, node_mean: float, node_min: float, dist: float, rep, **extra):
        return self.rec.log(
            extra
            | {
                "round": rnd,
                "epoch": round(self.setup.epoch(min(rnd, self.cfg.num_rounds)), 4),
                "acc_consensus": acc_c,
                "acc_node_mean": node_mean,
                "acc_node_min": node_min,
                "loss": loss,
                "consensus_distance": dist,
                "bits_sent_per_node": float(np.mean(rep.bits_sent)),
                "bits_received_per_node": float(np.mean(rep.bits_received)),
            }
        )

    def val_metrics(self, z: torch.Tensor, node_mean: float | None = None, node_min: float | None = None):
        """The consensus model's accuracy and loss on the validation split, with the nodes' own (the same keys as
        the in-process loop's ``val_*``; None: every node holds the consensus model); nothing when the run holds
        out no validation split."""
        if self.setup.val is None:
            return {}
        acc, loss = evaluate(self.setup, z, 0, "val")
        node_mean, node_min = (acc, acc) if node_mean is None else (node_mean, node_min)
        return {
            "val_acc_consensus": acc,
            "val_loss": loss,
            "val_acc_node_mean": node_mean,
            "val_acc_node_min": node_min,
        }

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = self.round_done(server_round) if server_round else None
        if rnd is None:  # before the first round, or a merge phase (or a round a merge follows) not yet done
            return None
        if not (rnd % self.cfg.eval_every == 0 or rnd == self.last):
            self.rec.progress.update(rnd, self.rec.progress.note)
            self.checkpoint(rnd)
            return None
        r = self.evaluate_round(rnd, server_round, arrays)
        self.checkpoint(rnd)
        return MetricRecord({k: float(v) for k, v in r.items()})

    def round_done(self, server_round: int) -> int | None:
        """The training rounds done once Flower's ``server_round`` is (None: not at the end of a training round)."""
        return server_round + self.done0

    def flower_rounds(self) -> int:
        """The Flower rounds of the training rounds left."""
        return self.last - self.done0

    def start(self, grid: Grid) -> dict[str, Any]:
        scale_pull_interval(grid, self.cfg.num_nodes)  # reply polling O(N) per round, not O(N^2) (linkstate.py)
        self.strategy.start(
            grid,
            ArrayRecord({"z": Array(self.setup.x0.numpy())}),
            num_rounds=self.flower_rounds(),
            timeout=self.cfg.round_timeout,
            evaluate_fn=self.evaluate_fn,
            **self.start_kwargs(),
        )
        rep = self.strategy.report()
        extra: dict[str, Any] = {
            "bits_sent_per_node": float(np.mean(rep.bits_sent)),
            "bits_received_per_node": float(np.mean(rep.bits_received)),
            "bits_sent_by_node": list(map(int, rep.bits_sent)),
            "bits_received_by_node": list(map(int, rep.bits_received)),
            "num_params": int(self.setup.x0.numel()),
            "resumed_from_round": self.done0,
        }
        extra |= self.summary_extra(rep)
        if not self.cfg.checkpoint_every and self.cfg.node_store != CONTEXT:
            # the nodes' files of a finished run that keeps no checkpoints (where this process can see them)
            shutil.rmtree(NodeStore(self.cfg.node_store or None, self.token).dir, ignore_errors=True)
        return self.rec.finish(extra)

    def checkpoint(self, rnd: int) -> None:
        """Nothing by default (FedAvg keeps no checkpoints)."""

    def start_kwargs(self) -> dict[str, Any]:
        return {}

    def summary_extra(self, rep) -> dict[str, Any]:
        return {}


class _FedAvgRun(_ServerRun):
    """Flower's own FedAvg: the ServerApp evaluates the global model it holds."""

    def evaluate_round(self, rnd: int, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        z = torch.from_numpy(np.array(arrays["z"].numpy()))
        acc, loss = evaluate(self.setup, z, 0)
        return self.row(rnd, acc, loss, acc, acc, 0.0, self.strategy.report(), **self.val_metrics(z))

    def start_kwargs(self) -> dict[str, Any]:
        return {"train_config": ConfigRecord({"token": self.token})}  # names the nodes' store folder


class _GossipRun(_ServerRun):
    """The routing strategies (sgp, sparse-push, scsp): the nodes report their models on evaluation rounds; the
    run resumes from and keeps checkpoints, and reports mass, refusals and stragglers."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        ck = read_checkpoint(cfg, FLOWER_CHECKPOINT) if cfg.resume else None
        if ck is not None:
            self.done0 = int(ck["round"])
            self.strategy.load_state_dict(ck["strategy"], self.done0)
            self.token = self.strategy.token
            for row in ck["history"]:
                self.rec.log(dict(row))

    def round_done(self, server_round: int) -> int | None:
        return self.strategy.round_done(server_round)

    def flower_rounds(self) -> int:
        """Every training round left, and the three message rounds of each merge (strategies/merge_steps.py)."""
        return self.strategy.plan_rounds(self.done0, self.last)

    def evaluate_round(self, rnd: int, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        rep = self.strategy.report()  # one report per row: it copies O(N) lists
        ev = rep.last_eval
        if ev is None or ev.round != server_round:
            raise RuntimeError(f"round {rnd}: no node evaluation arrived")
        zbar = torch.from_numpy(ev.zbar)
        acc, loss = evaluate(self.setup, zbar, 0)
        return self.row(
            rnd,
            acc,
            loss,
            ev.acc_node_mean,
            ev.acc_node_min,
            ev.consensus_distance,
            rep,
            **self.val_metrics(zbar, ev.val_acc_node_mean, ev.val_acc_node_min),
            y_nodes=ev.y_nodes,
            y_mailboxes=ev.y_mailboxes,
            y_pending=ev.y_pending,
            messages_dropped=rep.messages_dropped,
            messages_rejected=rep.messages_rejected,
            replies_rejected=len(rep.rejected_replies),
            nodes_excluded=len(rep.excluded_nodes),
            stragglers=len(rep.straggler_events),
            messages_resent=rep.messages_resent,
            num_evaluated=ev.num_evaluated,
        )

    def checkpoint(self, rnd: int) -> None:
        every = self.cfg.checkpoint_every
        if every and rnd % every == 0:
            save_flower_checkpoint(self.cfg, rnd, self.strategy, self.rec.rows)

    def summary_extra(self, rep) -> dict[str, Any]:
        ev = rep.last_eval
        mass = {
            "y_nodes": ev.y_nodes,
            "y_pending": ev.y_pending,
            "y_mailboxes": ev.y_mailboxes,
            "n": self.cfg.num_nodes,
        }
        mass["y_by_node"] = {str(p): y for p, y in ev.y_by_node.items()}
        if self.cfg.save_nodes:
            np.savez(self.rec.dir / "nodes.npz", **{f"z{p}": z for p, z in sorted(ev.z_nodes.items())})
        return {"mass": mass} | {k: getattr(rep, k) for k in _REPORT_FIELDS}


def run_server(grid: Grid, raw_cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one training run on ``grid``; returns the summary (also written to summary.json)."""
    cfg = validate(raw_cfg)
    preflight(cfg, flower=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = _FedAvgRun(cfg) if cfg.strategy == "fedavg" else _GossipRun(cfg)
    return run.start(grid)


def make_server_app(run_config: dict | None = None) -> ServerApp:
    """The ServerApp; ``run_config`` replaces ``context.run_config`` (used by tests and ``run_simulation``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # flwr run's simulation runs this ServerApp in the process of the engine's link state: index its messages
        with indexed_message_lookup():
            run_server(grid, dict(run_config if run_config is not None else context.run_config))

    return app


app = make_server_app()
