"""The ServerApp. server_app.py (decentralized) and server_app_fedavg.py (FedAvg) differ in the strategy line only."""

from __future__ import annotations

from flower_sparsepush.strategies import DecentralizedFedAvg  # noqa: F401
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg  # noqa: F401 (one of the two is used)

from quickstart_dropin.task import run_config, serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context.run_config)
    strategy = DecentralizedFedAvg(fraction_train=1.0, min_available_nodes=cfg["num-nodes"])
    serve(grid, context, strategy)
