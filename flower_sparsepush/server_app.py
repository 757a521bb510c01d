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

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flower_sparsepush.config import preflight, validate
from flower_sparsepush.results import Recorder
from flower_sparsepush.strategies.routing import SCSP, SGP, CountingFedAvg, SparsePush
from flower_sparsepush.training import evaluate, get_setup, network_of, relay_checks

ROUND_TIMEOUT_S = 3600.0  # the default of the round-timeout key


def build_strategy(cfg: dict[str, Any]):
    n = cfg["num-nodes"]
    if cfg["strategy"] == "fedavg":
        return CountingFedAvg(n, fraction_train=1.0, min_train_nodes=n)
    cls = {"sgp": SGP, "sparse-push": SparsePush, "scsp": SCSP}[cfg["strategy"]]
    return cls(
        n,
        eval_every=cfg["eval-every"],
        sample_seed=cfg["seed"],
        network=network_of(cfg),
        bounce=cfg["bounce"],
        **relay_checks(get_setup(cfg)),  # every reply is checked before anything of it is routed (guard.py)
    )


def run_server(grid: Grid, raw_cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one training run on ``grid``; returns the summary (also written to summary.json)."""
    cfg = validate(raw_cfg)
    preflight(cfg, flower=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setup = get_setup(cfg)
    rec = Recorder(cfg)
    strategy = build_strategy(cfg)
    n, last = cfg["num-nodes"], cfg["num-rounds"] + cfg["final-gossip-rounds"]

    def row(rnd: int, acc_c: float, loss: float, node_mean: float, node_min: float, dist: float, **extra) -> dict:
        return rec.log(
            extra
            | {
                "round": rnd,
                "epoch": round(setup.epoch(rnd), 4),
                "acc_consensus": acc_c,
                "acc_node_mean": node_mean,
                "acc_node_min": node_min,
                "loss": loss,
                "consensus_distance": dist,
                "bits_sent_per_node": float(np.mean(strategy.bits_sent)),
                "bits_received_per_node": float(np.mean(strategy.bits_received)),
            }
        )

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Flower calls this after every round: the one per-round hook of Strategy.start, so progress is kept here
        if rnd == 0 or not (rnd % cfg["eval-every"] == 0 or rnd == last):
            if rnd:
                rec.progress.update(rnd, rec.progress.note)
            return None
        if cfg["strategy"] == "fedavg":
            z = torch.from_numpy(np.array(arrays["z"].numpy()))
            acc, loss = evaluate(setup, z, 0)
            r = row(rnd, acc, loss, acc, acc, 0.0)
        else:
            ev = strategy.last_eval
            if ev is None or ev["round"] != rnd:
                raise RuntimeError(f"round {rnd}: no node evaluation arrived")
            acc, loss = evaluate(setup, torch.from_numpy(ev["zbar"]), 0)
            r = row(
                rnd,
                acc,
                loss,
                ev["acc_node_mean"],
                ev["acc_node_min"],
                ev["consensus_distance"],
                y_nodes=ev["y_nodes"],
                y_mailboxes=ev["y_mailboxes"],
                messages_dropped=strategy.router.dropped,
                messages_rejected=strategy.messages_rejected,
                replies_rejected=len(strategy.guard.rejected_replies),
                nodes_excluded=len(strategy.guard.excluded),
                stragglers=len(strategy.stragglers),
                num_evaluated=ev["num_evaluated"],
            )
        return MetricRecord({k: float(v) for k, v in r.items()})

    strategy.start(
        grid,
        ArrayRecord({"z": Array(setup.x0.numpy())}),
        num_rounds=last,
        timeout=cfg["round-timeout"],
        evaluate_fn=evaluate_fn,
    )
    extra: dict[str, Any] = {
        "bits_sent_per_node": float(np.mean(strategy.bits_sent)),
        "bits_received_per_node": float(np.mean(strategy.bits_received)),
        "bits_sent_by_node": list(map(int, strategy.bits_sent)),
        "bits_received_by_node": list(map(int, strategy.bits_received)),
        "num_params": int(setup.x0.numel()),
    }
    if cfg["strategy"] != "fedavg":
        ev = strategy.last_eval
        extra["mass"] = {
            "y_nodes": ev["y_nodes"],
            "y_mailboxes": ev["y_mailboxes"],
            "n": n,
            "y_by_node": {str(p): y for p, y in ev["y_by_node"].items()},
        }
        extra["mailbox_messages"] = sum(len(b) for b in strategy.mailboxes)
        extra["mailbox_bits"] = sum(8 * len(d) for b in strategy.mailboxes for _, _, d in b)
        extra["rejected_messages"] = strategy.rejected
        extra["messages_rejected"] = strategy.messages_rejected
        extra["rejected_replies"] = strategy.guard.rejected_replies
        extra["replies_rejected_by_node"] = {str(k): v for k, v in sorted(strategy.guard.offences.items())}
        extra["messages_rejected_by_sender"] = {str(k): v for k, v in sorted(strategy.guard.rejected_by_sender.items())}
        extra["messages_bounced_after_rejection"] = strategy.guard.bounced_rejected
        extra["excluded_nodes"] = strategy.guard.excluded
        extra["messages_dropped"] = strategy.router.dropped
        extra["straggler_events"] = strategy.stragglers
        extra["nodes_not_returned"] = strategy.nodes_not_returned()
        extra["eval_failures"] = strategy.eval_failures
        if cfg["save-nodes"]:
            np.savez(rec.dir / "nodes.npz", **{f"z{p}": z for p, z in sorted(ev["z_nodes"].items())})
    return rec.finish(extra)


def make_server_app(run_config: dict | None = None) -> ServerApp:
    """The ServerApp; ``run_config`` replaces ``context.run_config`` (used by tests and ``run_simulation``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, dict(run_config if run_config is not None else context.run_config))

    return app


app = make_server_app()
