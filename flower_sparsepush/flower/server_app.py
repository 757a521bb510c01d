"""Flower ServerApp: validates the run config, builds the strategy, runs it, evaluates, writes results.

- ``sgp`` / ``sparse-push``: :class:`~flower_sparsepush.strategies.routing.SGP` / ``SparsePush`` route push-sum
  messages between nodes (no averaging). On evaluation rounds every node reports its de-biased model z_i and its
  own accuracy; the ServerApp computes z_bar = mean_i z_i, evaluates z_bar on the whole test set (consensus
  accuracy, loss) and the consensus distance mean_i ||z_i - z_bar||^2. The consensus model is a measurement only;
  it is never sent back to the nodes.
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
from flower_sparsepush.run.config import preflight, validate
from flower_sparsepush.run.results import Recorder
from flower_sparsepush.run.setup import get_setup, network_of, relay_checks
from flower_sparsepush.strategies.routing import SCSP, SGP, CountingFedAvg, SparsePush

ROUND_TIMEOUT_S = 3600.0  # the default of the round-timeout key
FLOWER_CHECKPOINT = "flower"  # the engine a Flower checkpoint belongs to (the in-process loop writes "inprocess")


def build_strategy(cfg: dict[str, Any], token: str = "run"):
    n = cfg.num_nodes
    if cfg.strategy == "fedavg":
        return _registering(CountingFedAvg(n, fraction_train=1.0, min_train_nodes=n), n)
    cls = {"sgp": SGP, "sparse-push": SparsePush, "scsp": SCSP}[cfg.strategy]
    strategy = cls(
        n,
        eval_every=cfg.eval_every,
        sample_seed=cfg.seed,
        network=network_of(cfg),
        bounce=cfg.bounce,
        token=token,
        checkpoint_every=cfg.checkpoint_every,
        **relay_checks(get_setup(cfg)),  # every reply is checked before anything of it is routed (guard.py)
    )
    return _registering(strategy, n)


REGISTER_S_PER_NODE = 0.1  # the registration query round: one message per node (10,000 nodes took minutes here)


def _registering(strategy, n: int):
    """Give the strategy's registration (wait for n nodes, one query each) time that grows with n: the 120 s
    default ran out at 10,000 simulated nodes on 2 cores."""
    strategy.register_timeout = max(strategy.register_timeout, REGISTER_S_PER_NODE * n)
    return strategy


def save_flower_checkpoint(cfg: dict[str, Any], done: int, strategy, history: list[dict]) -> None:
    """The relay's side after ``done`` rounds (the nodes keep their own copies: store.NodeStore.snapshot)."""
    write_checkpoint(cfg, FLOWER_CHECKPOINT, done, {"strategy": strategy.state_dict(), "history": list(history)})


def run_server(grid: Grid, raw_cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one training run on ``grid``; returns the summary (also written to summary.json)."""
    cfg = validate(raw_cfg)
    preflight(cfg, flower=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setup = get_setup(cfg)
    rec = Recorder(cfg)
    token = f"{cfg.run_name}-{uuid.uuid4().hex[:10]}"  # this run's folder in every node's store
    ck = read_checkpoint(cfg, FLOWER_CHECKPOINT) if cfg.resume and cfg.strategy != "fedavg" else None
    strategy = build_strategy(cfg, token)
    n, last = cfg.num_nodes, cfg.num_rounds + cfg.final_gossip_rounds
    done0 = 0
    if ck is not None:
        done0 = int(ck["round"])
        strategy.num_rounds = last - done0
        strategy.load_state_dict(ck["strategy"], done0)
        token = strategy.token
        for row in ck["history"]:
            rec.log(dict(row))

    def row(rnd: int, acc_c: float, loss: float, node_mean: float, node_min: float, dist: float, rep=None, **extra):
        rep = rep or strategy.report()  # one report per row: it copies O(N) lists
        return rec.log(
            extra
            | {
                "round": rnd,
                "epoch": round(setup.epoch(min(rnd, cfg.num_rounds)), 4),
                "acc_consensus": acc_c,
                "acc_node_mean": node_mean,
                "acc_node_min": node_min,
                "loss": loss,
                "consensus_distance": dist,
                "bits_sent_per_node": float(np.mean(rep.bits_sent)),
                "bits_received_per_node": float(np.mean(rep.bits_received)),
            }
        )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Flower calls this after every round: the one per-round hook of Strategy.start, so progress and
        # checkpoints are kept here
        rnd = server_round + done0 if server_round else 0
        if server_round == 0 or not (rnd % cfg.eval_every == 0 or rnd == last):
            if server_round:
                rec.progress.update(rnd, rec.progress.note)
                checkpoint(rnd)
            return None
        if cfg.strategy == "fedavg":
            z = torch.from_numpy(np.array(arrays["z"].numpy()))
            acc, loss = evaluate(setup, z, 0)
            r = row(rnd, acc, loss, acc, acc, 0.0)
        else:
            rep = strategy.report()
            ev = rep.last_eval
            if ev is None or ev.round != server_round:
                raise RuntimeError(f"round {rnd}: no node evaluation arrived")
            acc, loss = evaluate(setup, torch.from_numpy(ev.zbar), 0)
            r = row(
                rnd,
                acc,
                loss,
                ev.acc_node_mean,
                ev.acc_node_min,
                ev.consensus_distance,
                rep=rep,
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
        checkpoint(rnd)
        return MetricRecord({k: float(v) for k, v in r.items()})

    def checkpoint(rnd: int) -> None:
        every = cfg.checkpoint_every
        if every and rnd % every == 0 and cfg.strategy != "fedavg":
            save_flower_checkpoint(cfg, rnd, strategy, rec.rows)

    scale_pull_interval(grid, cfg.num_nodes)  # reply polling O(N) per round, not O(N^2) (linkstate.py)
    strategy.start(
        grid,
        ArrayRecord({"z": Array(setup.x0.numpy())}),
        num_rounds=last - done0,
        timeout=cfg.round_timeout,
        evaluate_fn=evaluate_fn,
        **({"train_config": ConfigRecord({"token": token})} if cfg.strategy == "fedavg" else {}),
    )
    rep = strategy.report()
    extra: dict[str, Any] = {
        "bits_sent_per_node": float(np.mean(rep.bits_sent)),
        "bits_received_per_node": float(np.mean(rep.bits_received)),
        "bits_sent_by_node": list(map(int, rep.bits_sent)),
        "bits_received_by_node": list(map(int, rep.bits_received)),
        "num_params": int(setup.x0.numel()),
        "resumed_from_round": done0,
    }
    if cfg.strategy != "fedavg":
        ev = rep.last_eval
        extra["mass"] = {
            "y_nodes": ev.y_nodes,
            "y_pending": ev.y_pending,
            "y_mailboxes": ev.y_mailboxes,
            "n": n,
            "y_by_node": {str(p): y for p, y in ev.y_by_node.items()},
        }
        extra |= {
            k: getattr(rep, k)
            for k in (
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
                "reconnected_nodes",
            )
        }
        if cfg.save_nodes:
            np.savez(rec.dir / "nodes.npz", **{f"z{p}": z for p, z in sorted(ev.z_nodes.items())})
    if not cfg.checkpoint_every and cfg.node_store != CONTEXT:
        # the nodes' files of a finished run that keeps no checkpoints (where this process can see them)
        shutil.rmtree(NodeStore(cfg.node_store or None, token).dir, ignore_errors=True)
    return rec.finish(extra)


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
