"""An ordinary Flower ClientApp (Message API): train and evaluate the model it is sent. Nothing decentralized here."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dropin_example.task import Net, in_features, load_partition, run_config, test, train

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[Net, tuple[torch.Tensor, ...], dict]:
    torch.set_num_threads(1)
    cfg = run_config(context.run_config)
    net = Net(in_features(cfg["dataset"]))
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_partition(
        cfg["dataset"], int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    return net, data, cfg


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    net, (x, y, _, _), cfg = _setup(msg, context)
    seed = 1000 * int(msg.content["config"]["server-round"]) + int(context.node_config["partition-id"])
    loss = train(net, x, y, int(cfg["local-epochs"]), float(msg.content["config"]["lr"]), int(cfg["batch-size"]), seed)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    net, (_, _, xt, yt), _ = _setup(msg, context)
    loss, acc = test(net, xt, yt)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(yt)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
