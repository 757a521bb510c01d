"""An ordinary Flower ClientApp (Message API), as in quickstart-pytorch: train and evaluate the model it is sent."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_dropin.task import Net, load_partition, run_config, test, train

app = ClientApp()


def _setup(msg: Message, context: Context):
    torch.set_num_threads(1)
    cfg = run_config(context.run_config)
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    return net, load_partition(cfg, pid, parts), cfg, pid


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    net, (x, y, _, _), cfg, pid = _setup(msg, context)
    seed = 100_000 * int(cfg["seed"]) + 1000 * int(msg.content["config"]["server-round"]) + pid
    lr = float(msg.content["config"]["lr"])
    loss = train(net, x, y, int(cfg["local-epochs"]), lr, float(cfg["momentum"]), int(cfg["batch-size"]), seed)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    net, (_, _, xe, ye), _, _ = _setup(msg, context)
    loss, acc = test(net, xe, ye)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(ye)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
