"""One measurement of the benchmark, run in its own process by :func:`bench_measure.run_worker` (so that its memory
is measured on its own and a run that grows too large can be stopped): a config through the in-process loop or
through Flower's simulation engine, timed per round.

``python -m flower_sparsepush.simulations.bench_worker SPEC_JSON OUT_PATH`` writes the result as JSON to OUT_PATH.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.run.config import RunConfig


def bench_cfg(
    model: str, nodes: int, rounds: int, local_steps: int, dataset: str, out_dir: str, extra: dict | None = None
) -> RunConfig:
    from flower_sparsepush.run.config import validate

    return validate(
        (extra or {})
        | {
            "strategy": "sparse-push",
            "dataset": dataset,
            "model": model,
            "num-nodes": nodes,
            "num-rounds": rounds,
            "local-steps": local_steps,
            "batch-size": 32,
            "compressor": "topk:0.01+q:4",
            "gamma": 0.1,
            "graph": "exponential",
            "partition": "iid",
            "eval-every": rounds,
            "eval-node-samples": 100,
            "out-dir": out_dir,
            "run-name": f"bench-{model}-{nodes}",
        }
    )


def _round_times(starts: list[float], ends: list[float]) -> list[float]:
    """Per-round seconds from round start/end stamps: start-to-next-start, and start-to-end for the last round."""
    out = [b - a for a, b in zip(starts, starts[1:])]
    if ends and len(ends) == len(starts):
        out.append(ends[-1] - starts[-1])
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` (mode ``inprocess`` or ``flower``) with one torch thread; seconds per round and in all."""
    import torch

    torch.set_num_threads(1)
    os.environ["SPARSEPUSH_CLIENT_THREADS"] = "1"
    cfg = bench_cfg(
        spec["model"],
        spec["nodes"],
        spec["rounds"],
        spec["local_steps"],
        spec["dataset"],
        spec["out_dir"],
        spec.get("config"),
    )
    if spec["mode"] == "inprocess":
        return _run_inprocess(cfg)
    return _run_flower(spec, cfg)


def _run_inprocess(cfg: dict[str, Any]) -> dict[str, Any]:
    from flower_sparsepush.run.inprocess import run_inprocess
    from flower_sparsepush.run.setup import get_setup

    get_setup(cfg)
    t0 = time.perf_counter()
    res = run_inprocess(cfg)
    return {"round_s": res.round_seconds, "total_s": time.perf_counter() - t0}


def _timed_strategy(build, starts: list[float], ends: list[float], linear: bool):
    """``build`` (server_app.build_strategy) wrapped so that its strategy stamps each round's start
    (``configure_train``) into ``starts`` and end (``aggregate_train``) into ``ends``; with ``linear`` the ServerApp
    polls for replies at an interval that grows with the node count."""

    def timed_strategy(c, *args, **kw):
        s = build(c, *args, **kw)
        ct, at = s.configure_train, s.aggregate_train

        def configure_train(*a, **k):
            starts.append(time.perf_counter())
            return ct(*a, **k)

        def aggregate_train(*a, **k):
            r = at(*a, **k)
            ends.append(time.perf_counter())
            return r

        s.configure_train, s.aggregate_train = configure_train, aggregate_train
        if linear:
            from flower_sparsepush.flower.linkstate import scale_pull_interval

            st = s.start

            def start(grid, *a, **k):
                scale_pull_interval(grid, c.num_nodes)
                return st(grid, *a, **k)

            s.start = start
        return s

    return timed_strategy


def _run_flower(spec: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    import contextlib
    import logging

    from flwr.simulation import run_simulation

    from flower_sparsepush.flower import server_app
    from flower_sparsepush.flower.client_app import make_client_app
    from flower_sparsepush.flower.linkstate import indexed_message_lookup

    logging.getLogger("flwr").setLevel(logging.ERROR)
    starts: list[float] = []
    ends: list[float] = []
    server_app.build_strategy = _timed_strategy(server_app.build_strategy, starts, ends, bool(spec.get("linear")))
    cpus = spec.get("cpus_per_client", 1)
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"log_to_driver": False, "logging_level": "ERROR", "num_cpus": spec.get("ray_cpus", 2)},
    }
    # scale runs: Flower's link state finds each node's messages through an index (linkstate.py), not a scan
    lookup = indexed_message_lookup() if spec.get("linear") else contextlib.nullcontext()
    t0 = time.perf_counter()
    with lookup:
        run_simulation(
            server_app.make_server_app(cfg.as_dict()),
            make_client_app(cfg.as_dict()),
            num_supernodes=cfg.num_nodes,
            backend_config=backend,
            verbose_logging=False,
        )
    total = time.perf_counter() - t0
    summary = Path(cfg.out_dir, cfg.run_name, "summary.json")
    if not summary.exists() or len(starts) != cfg.num_rounds:
        raise RuntimeError(f"Flower run ended without results ({len(starts)} rounds timed)")
    first = starts[0] - t0 if starts else float("nan")
    return {
        "round_s": _round_times(starts, ends),
        "total_s": total,
        "startup_s": first,
        "rejected": json.loads(summary.read_text()).get("rejected_messages", []),
    }


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(worker(json.loads(sys.argv[1]))))
    sys.exit(0)
