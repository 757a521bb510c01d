"""Choose the drop-in strategy's defaults on the validation split, without the simulation engine (fast, one process).

Drives ``DecentralizedFedAvg`` through its own ``configure_train`` / ``aggregate_train`` with the example's ClientApp
training (``task.train``, same seeds, node i = partition i) and evaluates on the held-out validation images (never
the test set): the consensus model and every node's own model after each round. FedAvg is played the same way
(the mean of the nodes' replies). ``compare.py`` then measures the chosen defaults through Flower on the test split.

    python tune.py '{}' '{"gamma": 0.5, "gossip_steps": 4}' ...      # one line of JSON per configuration
    python tune.py fedavg
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from flower_sparsepush.strategies import DecentralizedFedAvg
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from quickstart_dropin.task import DEFAULTS, Net, load_partition, test, train


def train_node(cfg: dict, arrays: ArrayRecord, pid: int, server_round: int) -> ArrayRecord:
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    x, y, _, _ = load_partition(cfg, pid, cfg["num-nodes"])
    seed = 1000 * server_round + pid
    train(net, x, y, cfg["local-epochs"], cfg["lr"], cfg["momentum"], cfg["batch-size"], seed)
    return ArrayRecord(net.state_dict())


def accuracy(cfg: dict, arrays: ArrayRecord) -> float:
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    _, _, xe, ye = load_partition(cfg, 0, 1)
    return test(net, xe, ye)[1]


def run(kwargs: dict | str, cfg: dict) -> dict:
    torch.manual_seed(0)
    initial = ArrayRecord(Net().state_dict())
    n, rounds = cfg["num-nodes"], cfg["num-server-rounds"]
    params = sum(a.numpy().size for a in initial.values())
    rows = []
    if kwargs == "fedavg":
        model = initial
        for r in range(1, rounds + 1):
            outs = [train_node(cfg, model, i, r) for i in range(n)]
            model = ArrayRecord(
                {k: type(v)(np.mean([o[k].numpy() for o in outs], 0).astype(v.numpy().dtype)) for k, v in model.items()}
            )
            acc = accuracy(cfg, model)
            rows.append({"round": r, "consensus": acc, "nodes": acc, "bits": 2 * 32 * params * r})
        return {"rows": rows}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    s = DecentralizedFedAvg(min_available_nodes=n, **kwargs)
    s.num_rounds_planned = rounds
    s.setup(list(range(1, n + 1)), initial)
    for r in range(1, rounds + 1):
        msgs = list(s.configure_train(r, initial, ConfigRecord({"lr": cfg["lr"]}), None))
        replies = []
        for m in msgs:
            pid = m.metadata.dst_node_id - 1
            arrays = train_node(cfg, m.content["arrays"], pid, r)
            metrics = MetricRecord({"num-examples": 1})
            replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=m))
        s.aggregate_train(r, replies)
        cons = accuracy(cfg, s.consensus_arrays())
        nodes = float(np.mean([accuracy(cfg, a) for a in s.node_arrays()]))
        dist = s.consensus(r).consensus_distance
        rows.append(
            {
                "round": r,
                "consensus": cons,
                "nodes": nodes,
                "bits": s.traffic()["peer_bits_sent_per_node"],
                "dist": dist,
            }
        )
    return {"rows": rows}


def main() -> None:
    cfg = {**DEFAULTS, "eval-split": "val"}
    torch.set_num_threads(1)
    for arg in sys.argv[1:]:
        kwargs = "fedavg" if arg == "fedavg" else json.loads(arg)
        t0 = time.time()
        rows = run(kwargs, cfg)["rows"]
        fed_bits = 2 * 32 * 62006 * cfg["num-server-rounds"]
        last, mid = rows[-1], rows[9]
        line = {
            "kwargs": kwargs,
            "cons": round(100 * last["consensus"], 1),
            "nodes": round(100 * last["nodes"], 1),
            "best": round(100 * max(r["consensus"] for r in rows), 1),
            "last5": round(100 * float(np.mean([r["consensus"] for r in rows[-5:]])), 1),
            "nodes5": round(100 * float(np.mean([r["nodes"] for r in rows[-5:]])), 1),
            "trend10": round(100 * (last["consensus"] - mid["consensus"]), 1),
            "ratio": round(fed_bits / last["bits"], 1),
            "dist": round(last.get("dist", 0.0), 2),
            "curve": [round(100 * r["consensus"], 1) for r in rows],
            "s": round(time.time() - t0),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
