"""Run the FedAvg and the drop-in ServerApp through Flower's simulation engine; write a results JSON and a Markdown
table (accuracy of the consensus model and of the nodes' own models per round, bits per node).

    python compare.py --out ../../results/quickstart_dropin            # both apps, test split (the table)
    python compare.py --only dropin --split val --kwargs '{"gamma": 0.5}' --out /tmp/x   # one run, for tuning

Each run is a fresh Python process (one Ray session each). ``--kwargs`` (tuning only) adds arguments to the
drop-in strategy line; the table is made with the ServerApps as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
APPS = {"fedavg": "server_app_fedavg", "dropin": "server_app"}


def run_one(which: str, split: str, kwargs: dict, results_file: Path, extra: dict) -> dict:
    """One simulation in a child process; returns what the ServerApp wrote plus the wall time."""
    cfg = {"eval-split": split, "results-file": str(results_file), **extra}
    env = {**os.environ, "QUICKSTART_DROPIN_CONFIG": json.dumps(cfg), "PYTHONPATH": str(HERE)}
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    args = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--kwargs", json.dumps(kwargs)]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:  # the ServerApp writes final_model.pt in its working directory
        subprocess.run(args, env=env, check=True, cwd=work)
    out = json.loads(results_file.read_text())
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def child(which: str, kwargs: dict) -> None:
    """Inside the child: build the app's ServerApp (or, with kwargs, the drop-in line with those arguments) and run."""
    import logging

    from flwr.simulation import run_simulation
    from quickstart_dropin import client_app
    from quickstart_dropin.task import run_config

    n = int(run_config({})["num-nodes"])
    if kwargs:
        from flower_sparsepush.strategies import DecentralizedFedAvg
        from flwr.serverapp import ServerApp
        from quickstart_dropin.task import serve

        server = ServerApp()

        @server.main()
        def main(grid, context) -> None:
            cfg = run_config(context.run_config)
            serve(
                grid, context, DecentralizedFedAvg(fraction_train=1.0, min_available_nodes=cfg["num-nodes"], **kwargs)
            )
    else:
        server = __import__(f"quickstart_dropin.{APPS[which]}", fromlist=["app"]).app
    logging.getLogger("flwr").setLevel(logging.WARNING)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"log_to_driver": False}}
    run_simulation(server, client_app.app, num_supernodes=n, backend_config=backend, verbose_logging=False)


def per_round(run: dict) -> list[dict]:
    """Rows: round, consensus accuracy (ServerApp evaluation of what the strategy returns), nodes' mean accuracy
    (federated evaluation, each node its own model), cumulative bits per node."""
    rounds = run["rounds"]
    dense = 32 * run["params"]  # one float32 model, in bits
    rows = []
    for r in sorted(int(k) for k in rounds["train"]):
        tr = rounds["train"][str(r)]
        if "peer_bits_sent_per_node" in tr:
            bits = tr["peer_bits_sent_per_node"]
        else:  # FedAvg: the model down and the update up, dense, every round
            bits = 2 * dense * r
        rows.append(
            {
                "round": r,
                "consensus_acc": rounds["central"][str(r)]["central_acc"],
                "nodes_acc": rounds["nodes"][str(r)]["eval_acc"],
                "bits_per_node": bits,
            }
        )
    return rows


def summarize(runs: dict[str, dict]) -> dict:
    fed = per_round(runs["fedavg"]) if "fedavg" in runs else None
    out = {}
    for name, run in runs.items():
        rows = per_round(run)
        last = rows[-1]
        half = rows[len(rows) // 2 - 1]  # the round that starts the last half
        out[name] = {
            "final_consensus_acc": last["consensus_acc"],
            "final_nodes_acc": last["nodes_acc"],
            "best_consensus_acc": max(r["consensus_acc"] for r in rows),
            "last_half_trend_consensus": last["consensus_acc"] - half["consensus_acc"],
            "last_half_trend_nodes": last["nodes_acc"] - half["nodes_acc"],
            "bits_per_node": last["bits_per_node"],
            "wall_s": run.get("wall_s"),
            "rounds": rows,
        }
        if fed:
            out[name]["traffic_vs_fedavg"] = fed[-1]["bits_per_node"] / last["bits_per_node"]
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        f"# quickstart-dropin: FedAvg vs DecentralizedFedAvg (defaults), {meta['split']} split",
        "",
        f"{meta['setup']}",
        "",
        "| strategy | consensus acc | nodes' mean acc | best consensus | last-10 trend (consensus / nodes) "
        "| Mbit per node | FedAvg traffic / this | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {100 * s['final_consensus_acc']:.1f}% | {100 * s['final_nodes_acc']:.1f}% "
            f"| {100 * s['best_consensus_acc']:.1f}% | {100 * s['last_half_trend_consensus']:+.1f} / "
            f"{100 * s['last_half_trend_nodes']:+.1f} | {s['bits_per_node'] / 1e6:.2f} "
            f"| {s.get('traffic_vs_fedavg', 1.0):.1f}x | {s['wall_s']} |"
        )
    lines += ["", "Per round (consensus / nodes' mean accuracy, %):", "", "| round | " + " | ".join(summary) + " |"]
    lines.append("|---" * (len(summary) + 1) + "|")
    n = len(next(iter(summary.values()))["rounds"])
    for k in range(n):
        cells = [
            f"{100 * s['rounds'][k]['consensus_acc']:.1f} / {100 * s['rounds'][k]['nodes_acc']:.1f}"
            for s in summary.values()
        ]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE.parent.parent / "results" / "quickstart_dropin"), help="path stem")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--only", choices=list(APPS), action="append")
    ap.add_argument("--kwargs", default="{}", help="tuning: extra DecentralizedFedAvg arguments (JSON)")
    ap.add_argument("--config", default="{}", help="run-config overrides (JSON), e.g. '{\"num-server-rounds\": 2}'")
    ap.add_argument("--child", choices=list(APPS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, json.loads(a.kwargs))
        return
    stem = Path(a.out).resolve()
    stem.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for which in a.only or list(APPS):
        runs[which] = run_one(
            which, a.split, json.loads(a.kwargs), stem.with_name(f"{stem.name}.{which}.raw.json"), json.loads(a.config)
        )
        stem.with_name(f"{stem.name}.{which}.raw.json").unlink()
    summary = summarize(runs)
    cfg = next(iter(runs.values()))["config"]
    meta = {
        "split": a.split,
        "kwargs": json.loads(a.kwargs),
        "setup": (
            f"CIFAR-10 (JPEG q75 copy), {cfg['train-size']} training images split IID over {cfg['num-nodes']} nodes "
            f"({cfg['val-size']} more held out for validation), evaluated on {cfg['test-size'] if a.split == 'test' else cfg['val-size']} "
            f"{a.split} images; quickstart-pytorch CNN ({next(iter(runs.values()))['params']} parameters), "
            f"{cfg['local-epochs']} local epochs per round, SGD lr {cfg['lr']} momentum {cfg['momentum']}, batch "
            f"{cfg['batch-size']}, {cfg['num-server-rounds']} rounds, seed {cfg['seed']}; Flower simulation engine (Ray), 1 CPU per node."
        ),
    }
    stem.with_name(stem.name + ".json").write_text(
        json.dumps({"meta": meta, "config": cfg, "summary": summary}, indent=1)
    )
    stem.with_name(stem.name + ".md").write_text(markdown(summary, meta))
    print(stem.with_name(stem.name + ".md").read_text())


if __name__ == "__main__":
    main()
