"""Running the Flower app: offline ``flwr run`` against a private SuperLink, or ``run_simulation`` in-process.

- :func:`flwr_run` (used by ``sparsepush train`` and ``sparsepush demo``): starts
  ``flower-superlink --insecure --simulation --isolation subprocess --disable-runtime-dependency-installation`` on a
  free local port, writes a temporary ``$FLWR_HOME/config.toml`` with a ``[superlink.sparsepush]`` connection, runs
  ``flwr run . sparsepush --stream --run-config ... --federation-config "num-supernodes=N client-resources-num-cpus=1"``
  and always stops the SuperLink (its whole process group) at the end, also on errors and Ctrl-C.
- :func:`simulate` (used by the tests): ``flwr.simulation.run_simulation`` with apps built around an explicit run
  config (deprecated in Flower 1.42 but works; no SuperLink, no subprocesses), with the link state's per-node
  message index of :mod:`flower_sparsepush.flower.linkstate` (a round stays linear in the node count).

The run config is validated before anything starts, so a bad value never reaches Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.run.config import KEYS, ConfigError, RunConfig, validate
from flower_sparsepush.run.preflight import hf_dataset, preflight
from flower_sparsepush.run.processes import (
    descendants,
    flwr_run_command,
    free_port,
    signal_pids,
    superlink_command,
    superlink_connection,
    wait_for_port,
)

PROJECT_DIR = Path(__file__).resolve().parents[2]
QUIET_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
BACKEND_CONFIG = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"log_to_driver": False, "logging_level": "ERROR"},
}


def quiet_env() -> None:
    """Ray and Flower quiet (no telemetry, no log dedup), and this venv's bin/ on PATH for the processes Flower
    starts by name."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    bindir = str(Path(sys.executable).parent)  # flower-superlink starts flower-superexec by name
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


# --------------------------------------------------------------------------- run_simulation path


def simulate(raw_cfg: dict[str, Any], verbose: bool = False, client_mods: list | None = None) -> Path:
    """Run one validated config through Flower's simulation engine in this process; returns the results folder.
    ``client_mods`` are Flower mods around every ClientApp message (tests use one to make a node misbehave)."""
    cfg = validate(raw_cfg)
    preflight(cfg, flower=True)  # graph, data, model size, out-dir: before Ray starts
    quiet_env()
    import logging

    from flwr.simulation import run_simulation

    from flower_sparsepush.flower.client_app import make_client_app
    from flower_sparsepush.flower.linkstate import indexed_message_lookup
    from flower_sparsepush.flower.server_app import make_server_app
    from flower_sparsepush.run.results import run_dir

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    with indexed_message_lookup():  # a node's messages found through an index, not a scan (linkstate.py)
        run_simulation(
            make_server_app(cfg.as_dict()),
            make_client_app(cfg.as_dict(), mods=client_mods),
            num_supernodes=cfg.num_nodes,
            backend_config=BACKEND_CONFIG,
            verbose_logging=False,
        )
    out = run_dir(cfg)
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without results in {out} (see the log above)")
    return out


# --------------------------------------------------------------------------- flwr run path


class SuperLink:
    """A private ``flower-superlink`` (simulation, subprocess isolation, offline) and a FLWR_HOME pointing at it."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.home = tempfile.mkdtemp(prefix="sparsepush-flwr-")
        self.proc: subprocess.Popen | None = None
        self.log_path = log_path or Path(self.home) / "superlink.log"

    def __enter__(self) -> SuperLink:
        quiet_env()
        Path(self.home, "config.toml").write_text(superlink_connection("sparsepush", self.port))
        cmd = superlink_command(self.port, simulation=True)
        env = os.environ | {"FLWR_HOME": self.home}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.home
        )

        def exited() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited ({self.proc.returncode}); log: {self.log_path}")

        if not wait_for_port(self.port, time.time() + 60, exited):
            raise RuntimeError(f"flower-superlink did not open port {self.port} in 60 s; log: {self.log_path}")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        # flower-superlink starts flower-superexec in its own session: collect the whole tree by parent PID first
        kids = descendants(self.proc.pid) if self.proc is not None else []
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        signal_pids(kids, signal.SIGTERM)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def run(self, cfg: RunConfig, timeout: float | None = None) -> int:
        """``flwr run . sparsepush --stream`` with ``cfg`` as run-config overrides; returns its exit code."""
        federation = f"num-supernodes={cfg.num_nodes} client-resources-num-cpus=1"
        cmd = flwr_run_command(PROJECT_DIR, "sparsepush", cfg.as_dict(), "--federation-config", federation)
        from flower_sparsepush.run.progress import follow_run

        env = os.environ | {"FLWR_HOME": self.home, "SPARSEPUSH_COMMAND": os.environ.get("SPARSEPUSH_COMMAND", "")}
        follower = follow_run(cfg.as_dict())  # the ServerApp's rounds, shown on this terminal
        proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_DIR, start_new_session=True)
        end = None if timeout is None else time.time() + timeout
        try:
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    follower.poll()
                    return rc
                except subprocess.TimeoutExpired:
                    follower.poll()
                    if end is not None and time.time() > end:
                        raise
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
            raise


def flwr_run(raw_cfg: dict[str, Any]) -> Path:
    """Validate, start a private SuperLink, ``flwr run`` the app, stop the SuperLink; returns the results folder."""
    from flower_sparsepush.run.results import run_dir

    cfg = validate(raw_cfg)
    cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).resolve()))
    with SuperLink() as superlink:
        rc = superlink.run(cfg)
    out = run_dir(cfg)
    if rc != 0 or not (out / "summary.json").exists():
        raise RuntimeError(f"flwr run failed (exit {rc}); no results in {out}")
    return out


def check_data(cfg: RunConfig) -> str | None:
    """None when the run's dataset can be found, else one message: what was looked for, what was found, the fix."""
    if cfg.dataset == "synthetic":
        return None
    from flower_sparsepush.learn import data

    try:
        if data.is_hf(cfg.dataset):
            hf_dataset(cfg)  # loads it (kept for the run in this process): columns and shapes are checked too
        else:
            data.find_data(cfg.dataset, cfg.data_dir or None)
    except ConfigError as err:
        return str(err)
    except (data.DataNotFoundError, FileNotFoundError, ValueError) as err:
        return f"run-config dataset={cfg.dataset!r}: {err}"
    return None


# --------------------------------------------------------------------------- CLI


def record_command() -> None:
    """Put this command line in ``$SPARSEPUSH_COMMAND``: the results' config.json records it (results.py)."""
    os.environ["SPARSEPUSH_COMMAND"] = shlex.join(["sparsepush", *sys.argv[1:]])


def add_run_command(
    subparsers, name: str, func, help: str, usage: str, description: str, defaults=None, skip: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """Add the sub-command ``name`` (running ``func``) whose options are the run-config keys, ``--key V`` each, in a
    group of their own; ``defaults``: the command's own defaults, shown in the help. Returns the parser, for the
    command's own options."""
    from flower_sparsepush.run.keyhelp import add_key_options

    p = subparsers.add_parser(name, help=help, usage=usage, description=description)
    add_key_options(p, defaults=defaults, skip=skip)
    p.set_defaults(func=func)
    return p


def cfg_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys given on the command line (``--key value``), unvalidated."""
    return {k: getattr(args, k.replace("-", "_")) for k in KEYS if getattr(args, k.replace("-", "_"), None) is not None}


def checked_config(raw: dict[str, Any], flower_preflight: bool = False) -> RunConfig | None:
    """The validated config, or None after printing the one error line (bad key or value, data missing, and with
    ``flower_preflight`` the pre-start checks of :func:`config.preflight`)."""
    try:
        cfg = validate(raw, explicit=True)  # the keys of a command line: each one typed by the user
        msg = check_data(cfg)
        if msg:
            raise ConfigError(msg)
        if flower_preflight:
            preflight(cfg, flower=True)  # graph connectivity, top-k count vs model size, out-dir, engine support
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    record_command()
    cfg = checked_config(cfg_from_args(args), flower_preflight=True)
    if cfg is None:
        return 2
    out = simulate(cfg) if args.engine == "simulation" else flwr_run(cfg)
    print(f"results: {out}")
    return 0


# The demo's schedule, shared by all three strategies: 100 rounds x 3 local steps of batch 32 (2.56 epochs), cosine
# learning rate from 0.03. That and Sparse-Push's switches were chosen on a validation split (docs/results.md, "make
# demo: how its settings were chosen"; every candidate in results/demo_search.jsonl).
DEMO = {
    "dataset": "fashion_mnist",
    "model": "cnn",
    "num-nodes": 16,
    "graph": "exponential",
    "partition": "iid",
    "batch-size": 32,
    "local-steps": 3,
    "num-rounds": 100,
    "eval-every": 50,
    "lr": 0.03,
    "lr-schedule": "cosine",
    "momentum": 0.9,
    "eval-node-samples": 1000,
}
SPARSE_PUSH = {
    "compressor": "topk:0.0125+q:4",
    "gamma": 0.1,
    "sparsity-schedule": "lr",
    "gradient-lookahead": 0.5,
}
DEMO_RUNS = (("sparse-push", SPARSE_PUSH), ("sgp", {}), ("fedavg", {}))


def cmd_demo(args: argparse.Namespace) -> int:
    record_command()
    base = DEMO | {"out-dir": str(Path(args.out_dir, "demo").resolve()), "num-rounds": args.rounds, "seed": args.seed}
    if args.data_dir:
        base["data-dir"] = args.data_dir
    msg = check_data(validate(base))
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        return 2
    rows = []
    t0 = time.time()
    superlink = SuperLink() if args.engine == "flwr-run" else None
    try:
        if superlink:
            superlink.__enter__()
        for strategy, extra in DEMO_RUNS:
            cfg = validate(base | extra | {"strategy": strategy, "run-name": strategy})
            print(f"== demo: {strategy} ({time.time() - t0:.0f}s elapsed)", flush=True)
            if superlink:
                rc = superlink.run(cfg)
                if rc != 0:
                    raise RuntimeError(f"flwr run for {strategy} failed with exit code {rc}")
            else:
                simulate(cfg)
            summ = json.loads((Path(cfg.out_dir) / strategy / "summary.json").read_text())
            rows.append(
                {
                    "strategy": strategy,
                    "compressor": cfg.compressor if strategy != "fedavg" else "dense",
                    "acc_consensus": summ["final"]["acc_consensus"],
                    "acc_node_mean": summ["final"]["acc_node_mean"],
                    "bits_per_node": summ["bits_sent_per_node"],
                    "wall_s": summ["wall_s"],
                    "accuracy": summ["final"]["acc_consensus"],  # = acc_consensus; the name table.json had first
                }
            )
    finally:
        if superlink:
            superlink.stop()
    sgp_bits = next(r["bits_per_node"] for r in rows if r["strategy"] == "sgp")
    lines = [
        "| strategy | compressor | consensus acc | node mean acc | Mbit sent per node | reduction vs SGP | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["reduction_vs_sgp"] = sgp_bits / r["bits_per_node"] if r["bits_per_node"] else float("inf")
        lines.append(
            f"| {r['strategy']} | {r['compressor']} | {r['acc_consensus']:.4f} | {r['acc_node_mean']:.4f} | "
            f"{r['bits_per_node'] / 1e6:.2f} | {r['reduction_vs_sgp']:.1f}x | {r['wall_s']:.0f} |"
        )
    table = "\n".join(lines)
    out = Path(base["out-dir"])
    (out / "table.md").write_text(
        f"Demo: Fashion-MNIST, 16 nodes, exponential graph, small CNN, {args.rounds} rounds x "
        f"{DEMO['local-steps']} local steps, batch {DEMO['batch-size']}, {DEMO['lr-schedule']} learning rate from "
        f"{DEMO['lr']}, the same for all three; sparse-push: "
        + ", ".join(f"{k} {v}" for k, v in SPARSE_PUSH.items())
        + f". Bits: peer-to-peer payloads; FedAvg: dense model up.\n\n{table}\n"
    )
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"written: {out / 'table.md'}  ({time.time() - t0:.0f}s)")
    return 0


def register(subparsers) -> None:
    """Add ``train`` and ``demo`` to the ``sparsepush`` CLI (argparse sub-parsers)."""
    p = add_run_command(
        subparsers,
        "train",
        cmd_train,
        help="one training run through Flower (flwr run against a private SuperLink)",
        usage="%(prog)s [-h] [--engine {flwr-run,simulation}] [--KEY V ...]",
        description="One training run through Flower. Every run-config key is an option (--key value); keys not "
        "given keep the default shown. Results: <out-dir>/<run-name>/ (status.json shows the rounds done).",
    )
    p.add_argument(
        "--engine",
        choices=("flwr-run", "simulation"),
        default="flwr-run",
        help="flwr-run: private SuperLink + `flwr run` (default); simulation: flwr.simulation.run_simulation",
    )

    d = subparsers.add_parser(
        "demo", help="Sparse-Push vs SGP vs FedAvg on Fashion-MNIST, 16 nodes, through Flower (a few minutes)"
    )
    d.add_argument("--out-dir", default="runs", help="results go to <out-dir>/demo/")
    d.add_argument(
        "--rounds",
        type=int,
        default=DEMO["num-rounds"],
        help="rounds per strategy",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Fashion-MNIST IDX files; default: the search path of docs/data.md",
    )
    d.add_argument("--engine", choices=("flwr-run", "simulation"), default="flwr-run")
    d.set_defaults(func=cmd_demo)
