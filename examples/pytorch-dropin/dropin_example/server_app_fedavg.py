"""The example's ServerApp. server_app.py (decentralized) and server_app_fedavg.py (FedAvg) differ in one line."""

from __future__ import annotations

import torch
from flower_sparsepush.strategies import DecentralizedFedAvg  # noqa: F401
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg  # noqa: F401 (one of the two is used; see README)

from dropin_example.task import Net, in_features, load_all, run_config, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context.run_config)
    dataset = cfg["dataset"]
    net = Net(in_features(dataset))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        _, _, xt, yt = load_all(dataset)
        loss, acc = test(net, xt, yt)
        return MetricRecord({"central_loss": loss, "central_acc": acc})

    strategy = FedAvg(fraction_train=1.0, min_available_nodes=cfg["num-nodes"])
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        train_config=ConfigRecord({"lr": cfg["lr"]}),
        num_rounds=cfg["num-server-rounds"],
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
