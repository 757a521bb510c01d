# ruff: noqa: B023  (the timed lambdas are called at once, inside the loop that defines them)
"""``sparsepush bench``: performance and scale, measured. Writes ``results/bench.json`` and ``results/bench.md``.

Sections (each figure a median of several samples with min and max; each comparison a ratio measured in the same
invocation, one right after the other):

1. ``overhead``: wall time per round of Sparse-Push through Flower's simulation engine
   (``flwr.simulation.run_simulation``, the path of :func:`launch.simulate`) vs :func:`training.run_inprocess` on the
   same config (same nodes, data, model, local steps, compressor). Flower rounds are timed from the server side: the
   strategy records a timestamp when each round starts (``configure_train``) and ends (``aggregate_train``), so Ray's
   start-up, the registration query and the final evaluation are not in the per-round figure. Round 0 (actors load
   the data and build the model) is left out on both sides. Flower runs with one ClientApp actor
   (``client_resources.num_cpus`` = all cores), so both sides do the same work serially with one torch thread each:
   the ratio is Flower's own cost. The real two-actor configuration is measured as well (``*_2actors``).
2. ``scale``: the small CNN at 16, 64, 256, 1000 nodes through Flower (default BACKEND_CONFIG, one CPU per client):
   peak memory of the whole process tree (the run's driver process and every descendant, Ray's GCS, raylet and
   workers included) sampled from /proc every 0.5 s, as summed RSS (over-counts shared pages) and summed PSS (shared
   pages split between processes); seconds per round. A run is stopped when the tree passes ``--mem-limit-gib``.
3. ``wire``: bits per encoded message / entropy bound (``codec.message_entropy_bits``: log2 C(d,k) + value bits) for
   top-10%, 1%, 0.1% of ResNet-20-sized vectors: a model difference (ResNet-20 after a few SGD steps minus its
   initialisation) and a Gaussian vector; also the index section alone vs log2 C(d,k).
4. ``codec``: top-k selection, encode, decode at 0.27M and 11M entries vs ``torch.topk`` alone on the magnitudes.
5. ``topk``: the whole top-k compressor call (``TopK(frac)(v)``: selection + values) vs the old ``torch.topk`` path
   vs one ``v.abs().sum()`` pass over the same vector (a memory-bound reference), at 11M and 0.27M entries.
- ``store``: one node state written by the node store (store.py) vs the ``torch.save`` + rename it replaced vs its
   CRC-32 vs a pickle round trip of the same state as a Flower ``ArrayRecord`` (``node-store=context``).
6. ``data``: batches per second of the loader (``training.node_batch``, ``data.NodeData.next_batch``) vs model
   steps per second (forward + backward) at the same batch size.
- ``ray`` (not a timing): the Flower simulation on a two-node Ray cluster started on this machine vs a
  single-machine run of the same config and seed (``simulations/ray_cluster.py``, results/ray_cluster.json): the
  Ray nodes that hosted ClientApp actors and whether the metrics are equal.

All timings use ``torch.set_num_threads(1)``: the ClientApp runs with one thread per actor, and on this 2-core
machine shared with other jobs two intra-op threads were measured slower, not faster. The load average before and
after each section is recorded. Flower and in-process runs go to subprocesses so that each one's memory is measured
on its own and a run that grows too large can be stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.run.processes import descendants
from flower_sparsepush.run.progress import Progress

QUIET_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
REQUIRED_KEYS = (
    "flower_overhead_ratio_resnet20_16",
    "flower_overhead_ratio_cnn_16",
    "flower_overhead_ratio_cnn_64",
    "max_nodes_run",
    "peak_mem_gib_at_max_nodes",
    "entropy_ratio_topk_0.1",
    "entropy_ratio_topk_0.01",
    "entropy_ratio_topk_0.001",
    "codec_vs_topk_ratio_0.27M",
    "codec_vs_topk_ratio_11M",
    "topk_vs_memory_pass_ratio_11M",
    "scale_per_node_ratio_1000_vs_16",
    "ray_cluster_nodes_used",
    "ray_cluster_metrics_equal",
    "deploy_s_per_round_4_nodes",
    "sim_s_per_round_4_nodes",
    "machine",
    "command",
)
GIB = 2**30
FRACTIONS = (0.1, 0.01, 0.001)


# --------------------------------------------------------------------------- small helpers


def stats(xs: list[float]) -> dict[str, float]:
    """Median, min, max and count of samples."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def timeit(fn, repeat: int) -> tuple[list[float], Any]:
    """Wall seconds of ``repeat`` calls of ``fn`` (after one warm-up call) and the last result."""
    out = fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return ts, out


def machine_info() -> dict[str, Any]:
    import torch

    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import flwr

        flwr_version = flwr.__version__
    except Exception:  # noqa: BLE001 - informative only
        flwr_version = "unknown"
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem / GIB, 2),
        "torch": torch.__version__,
        "flwr": flwr_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": 1,
    }


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- memory of a process tree


def proc_mem(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process; (0, 0) when it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeSampler(threading.Thread):
    """Samples the summed RSS/PSS of ``pid`` and its descendants; calls ``on_limit`` once above ``limit`` bytes."""

    def __init__(self, pid: int, limit: float, on_limit, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.limit, self.on_limit, self.interval = pid, limit, on_limit, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.seen: set[int] = set()
        self.tripped = False
        self._stop_evt = threading.Event()

    def sample(self) -> None:
        pids = [self.pid, *descendants(self.pid)]
        self.seen.update(pids)
        rss = pss = 0
        for p in pids:
            r, s = proc_mem(p)
            rss, pss = rss + r, pss + s
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        if pss > self.limit and not self.tripped:
            self.tripped = True
            self.on_limit()

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)


def _kill(pids, sig=signal.SIGTERM) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def run_worker(spec: dict[str, Any], mem_limit_gib: float, timeout: float) -> dict[str, Any]:
    """Run one measurement (:func:`worker`) in a subprocess, sampling its process tree's memory."""
    with tempfile.TemporaryDirectory(prefix="sparsepush-bench-") as tmp:
        out_path = Path(tmp) / "out.json"
        spec = spec | {"out_dir": tmp}
        env = os.environ | QUIET_ENV
        cmd = [sys.executable, "-m", "flower_sparsepush.simulations.bench", "--worker", json.dumps(spec), str(out_path)]
        t0 = time.time()
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log: list[str] = []
        reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
        reader.start()

        def stop_tree() -> None:
            _kill([proc.pid, *descendants(proc.pid)], signal.SIGKILL)

        sampler = TreeSampler(proc.pid, mem_limit_gib * GIB, stop_tree)
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_tree()
            proc.wait(timeout=30)
        finally:
            sampler.stop()
            reader.join(timeout=5)
            # leave nothing behind: Ray's daemons of this run are among the PIDs the sampler saw
            time.sleep(1.0)
            left = [p for p in sampler.seen if p != proc.pid and Path(f"/proc/{p}").exists()]
            _kill(left)
            time.sleep(0.5)
            _kill([p for p in left if Path(f"/proc/{p}").exists()], signal.SIGKILL)
        res: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
        res.update(
            ok=proc.returncode == 0 and out_path.exists() and not sampler.tripped,
            returncode=proc.returncode,
            wall_s=round(time.time() - t0, 2),
            peak_rss_gib=round(sampler.peak_rss / GIB, 3),
            peak_pss_gib=round(sampler.peak_pss / GIB, 3),
            peak_processes=sampler.peak_procs,
            mem_limit_hit=sampler.tripped,
            timed_out=timed_out,
        )
        if not res["ok"]:
            res["log_tail"] = "".join(log)[-2000:]
        return res


# --------------------------------------------------------------------------- the worker (runs in a subprocess)


def bench_cfg(
    model: str, nodes: int, rounds: int, local_steps: int, dataset: str, out_dir: str, extra: dict | None = None
) -> dict[str, Any]:
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
        from flower_sparsepush.run.training import get_setup, run_inprocess

        get_setup(cfg)
        t0 = time.perf_counter()
        res = run_inprocess(cfg)
        return {"round_s": res.round_seconds, "total_s": time.perf_counter() - t0}

    import logging

    from flwr.simulation import run_simulation

    from flower_sparsepush.flower import server_app
    from flower_sparsepush.flower.client_app import make_client_app

    logging.getLogger("flwr").setLevel(logging.ERROR)
    starts: list[float] = []
    ends: list[float] = []
    build = server_app.build_strategy

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
        if spec.get("linear"):  # the ServerApp polls for replies at an interval that grows with the node count
            from flower_sparsepush.flower.linkstate import scale_pull_interval

            st = s.start

            def start(grid, *a, **k):
                scale_pull_interval(grid, c["num-nodes"])
                return st(grid, *a, **k)

            s.start = start
        return s

    server_app.build_strategy = timed_strategy
    cpus = spec.get("cpus_per_client", 1)
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"log_to_driver": False, "logging_level": "ERROR", "num_cpus": spec.get("ray_cpus", 2)},
    }
    import contextlib

    from flower_sparsepush.flower.linkstate import indexed_message_lookup

    # scale runs: Flower's link state finds each node's messages through an index (linkstate.py), not a scan
    lookup = indexed_message_lookup() if spec.get("linear") else contextlib.nullcontext()
    t0 = time.perf_counter()
    with lookup:
        run_simulation(
            server_app.make_server_app(cfg),
            make_client_app(cfg),
            num_supernodes=cfg["num-nodes"],
            backend_config=backend,
            verbose_logging=False,
        )
    total = time.perf_counter() - t0
    summary = Path(cfg["out-dir"], cfg["run-name"], "summary.json")
    if not summary.exists() or len(starts) != cfg["num-rounds"]:
        raise RuntimeError(f"Flower run ended without results ({len(starts)} rounds timed)")
    first = starts[0] - t0 if starts else float("nan")
    return {
        "round_s": _round_times(starts, ends),
        "total_s": total,
        "startup_s": first,
        "rejected": json.loads(summary.read_text()).get("rejected_messages", []),
    }


# --------------------------------------------------------------------------- sections


def _per_round(res: dict[str, Any], skip: int = 1) -> dict[str, float]:
    return stats(res.get("round_s", [])[skip:])


def section_overhead(cases, rounds: int, local_steps: int, dataset: str, mem_limit: float, log, two_actors=()):
    """Flower (one actor) vs in-process seconds per round for each (model, nodes)."""
    out = {}
    cores = os.cpu_count() or 2
    for model, nodes in cases:
        key = f"{model}_{nodes}"
        base = {"model": model, "nodes": nodes, "rounds": rounds, "local_steps": local_steps, "dataset": dataset}
        inp = run_worker(base | {"mode": "inprocess"}, mem_limit, 1800)
        fl = run_worker(base | {"mode": "flower", "cpus_per_client": cores, "ray_cpus": cores}, mem_limit, 1800)
        row = {
            "inprocess_s_per_round": _per_round(inp),
            "flower_s_per_round": _per_round(fl),
            "flower_startup_s": fl.get("startup_s"),
            "flower_total_s": fl.get("total_s"),
            "flower_peak_pss_gib": fl["peak_pss_gib"],
            "inprocess_peak_pss_gib": inp["peak_pss_gib"],
            "ok": inp["ok"] and fl["ok"],
            "load_after": loadavg(),
        }
        if row["ok"]:
            row["ratio"] = row["flower_s_per_round"]["median"] / row["inprocess_s_per_round"]["median"]
        else:
            row["errors"] = [r.get("log_tail", "") for r in (inp, fl) if not r["ok"]]
        if row["ok"]:  # the node-store choice: state files (default) against the whole state in context.state
            flc = run_worker(
                base
                | {"mode": "flower", "cpus_per_client": cores, "ray_cpus": cores, "config": {"node-store": "context"}},
                mem_limit,
                1800,
            )
            if flc["ok"]:
                row["flower_context_s_per_round"] = _per_round(flc)
                row["ratio_context"] = (
                    row["flower_context_s_per_round"]["median"] / row["inprocess_s_per_round"]["median"]
                )
        if (model, nodes) in two_actors:
            fl2 = run_worker(base | {"mode": "flower", "cpus_per_client": 1, "ray_cpus": cores}, mem_limit, 1800)
            row["flower_2actors_s_per_round"] = _per_round(fl2)
            if fl2["ok"] and row["ok"]:
                row["ratio_2actors"] = (
                    row["flower_2actors_s_per_round"]["median"] / row["inprocess_s_per_round"]["median"]
                )
        out[key] = row
        log(
            f"overhead {key}: in-process {row['inprocess_s_per_round']['median']:.3f} s/round, Flower "
            f"{row['flower_s_per_round']['median']:.3f} s/round, ratio {row.get('ratio', float('nan')):.2f}"
        )
    return out


SCALE_MODELS = ("cnn", "mlp", "logreg")


def section_scale(
    ladder,
    rounds: int,
    local_steps: int,
    dataset: str,
    mem_limit: float,
    log,
    timeout: float,
    model: str = "cnn",
    linear: bool = True,
):
    """``model`` through Flower (two actors, one CPU each) at growing node counts; stops at the first failure.

    With ``linear`` (the default) the runs use what keeps a round O(N) on Flower's simulation engine
    (linkstate.py: indexed message lookup, reply polling scaled to the node count); ``linear=False`` measures
    Flower's engine as it comes. Each row has ``s_per_node_round`` (median seconds per round / nodes)."""
    if model not in SCALE_MODELS:
        raise ValueError(f"scale model {model!r}: one of {', '.join(SCALE_MODELS)}")
    out = {}
    for nodes in ladder:
        spec = {
            "linear": linear,
            "model": model,
            "nodes": nodes,
            "rounds": rounds,
            "local_steps": local_steps,
            "dataset": dataset,
            "mode": "flower",
            "cpus_per_client": 1,
            "ray_cpus": os.cpu_count() or 2,
        }
        res = run_worker(spec, mem_limit, timeout)
        row = {
            "ok": res["ok"],
            "model": model,
            "linear": linear,
            "s_per_round": _per_round(res),
            "peak_rss_gib": res["peak_rss_gib"],
            "peak_pss_gib": res["peak_pss_gib"],
            "peak_processes": res["peak_processes"],
            "startup_s": res.get("startup_s"),
            "total_s": res.get("total_s"),
            "wall_s": res["wall_s"],
            "mem_limit_hit": res["mem_limit_hit"],
            "timed_out": res["timed_out"],
            "load_after": loadavg(),
        }
        row["s_per_node_round"] = row["s_per_round"]["median"] / nodes if row["s_per_round"]["n"] else float("nan")
        if not res["ok"]:
            row["log_tail"] = res.get("log_tail", "")
        out[str(nodes)] = row
        log(
            f"scale {model} {nodes} nodes: ok={row['ok']} {row['s_per_round']['median']:.2f} s/round "
            f"({1000 * row['s_per_node_round']:.1f} ms per node), peak PSS "
            f"{row['peak_pss_gib']:.2f} GiB (RSS sum {row['peak_rss_gib']:.2f} GiB), wall {row['wall_s']:.0f} s"
        )
        if not res["ok"]:
            break
    return out


def trained_difference(dim_model: str = "resnet20", steps: int = 10, dataset: str = "fashion_mnist"):
    """ResNet-20 parameters after ``steps`` SGD steps minus its initialisation (a realistic update), float32."""
    import torch
    import torch.nn.functional as F

    from flower_sparsepush.learn import models

    try:
        from flower_sparsepush.learn.data import load_dataset

        ds = load_dataset(dataset)
        x, y = ds.x_train[: 32 * steps].float(), ds.y_train[: 32 * steps]
        x = (x - x.mean()) / (x.std() + 1e-8)
        in_ch, shape = ds.in_channels, ds.input_shape
    except Exception:  # noqa: BLE001 - no data set here: random images still give a realistic update structure
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32 * steps, 1, 28, 28, generator=g), torch.randint(0, 10, (32 * steps,), generator=g)
        in_ch, shape = 1, (1, 28, 28)
    model = models.build_model(dim_model, 10, in_ch, "group", input_shape=shape, seed=0)
    x0 = models.flat_params(model).clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[32 * s : 32 * s + 32]), y[32 * s : 32 * s + 32]).backward()
        opt.step()
    return (models.flat_params(model) - x0).float()


def wire_ratio(v, spec: str) -> dict[str, float]:
    """Bits of one real encoded message of ``v`` under compressor ``spec`` vs its entropy bound."""
    from flower_sparsepush.core import codec
    from flower_sparsepush.core.compression import make_compressor

    c = make_compressor(spec)(v)
    data = codec.encode(codec.Message(0, 0, 0.5, 0.5, c))
    bits = 8 * len(data)
    value_bits = c.k * (c.bits if c.codes is not None else 8 * c.values.dtype.itemsize) + (
        32 if c.codes is not None else 0
    )
    pos_bound = codec.entropy_bits(c.dim, c.k, 0)
    index_bits = min(codec.index_bits(c.indices, c.dim).values()) if c.indices is not None else 0
    return {
        "bits": bits,
        "entropy_bits": codec.message_entropy_bits(data),
        "k": c.k,
        "dim": c.dim,
        "ratio": bits / codec.message_entropy_bits(data),
        "index_ratio": index_bits / pos_bound if pos_bound else float("nan"),
        "value_bits": value_bits,
        "header_bits": 8 * codec.HEADER.size,
        "coding": codec.CODING_NAMES[(data[3] >> 1) & 3] if c.indices is not None else "dense",
    }


def section_wire(vectors: dict[str, Any], log) -> dict[str, Any]:
    out = {}
    for name, v in vectors.items():
        for frac in FRACTIONS:
            for spec in (f"topk:{frac:g}", f"topk:{frac:g}+q:4"):
                r = wire_ratio(v, spec)
                out[f"{name}|{spec}"] = r
                log(
                    f"wire {name} {spec}: {r['bits']} bits, ratio {r['ratio']:.4f}, index part "
                    f"{r['index_ratio']:.4f} ({r['coding']})"
                )
    return out


def section_codec(dims: dict[str, int], repeat: dict[str, int], log, fractions=FRACTIONS) -> dict[str, Any]:
    """torch.topk alone vs selection (TopK compressor), encode, decode, add_to_ on Gaussian vectors."""
    import torch

    from flower_sparsepush.core import codec
    from flower_sparsepush.core.compression import TopK

    out = {}
    for label, d in dims.items():
        v = torch.randn(d, generator=torch.Generator().manual_seed(1))
        mag = v.abs()
        target = torch.zeros(d)
        for frac in fractions:
            comp = TopK(frac)
            k = comp.count(d)
            n = repeat[label]
            t_topk, t_sel, t_enc, t_dec, t_add = [], [], [], [], []
            for _ in range(n):  # interleaved, so that load changes hit every part alike
                t_topk += timeit(lambda: torch.topk(mag, k, sorted=False), 1)[0]
                ts, c = timeit(lambda: comp(v), 1)
                t_sel += ts
                msg = codec.Message(0, 0, 0.5, 0.5, c)
                te, data = timeit(lambda: codec.encode(msg), 1)
                t_enc += te
                td, m2 = timeit(lambda: codec.decode(data, expected_dim=d), 1)
                t_dec += td
                t_add += timeit(lambda: m2.payload.add_to_(target), 1)[0]
            topk_med = statistics.median(t_topk)
            row = {
                "k": k,
                "topk_s": stats(t_topk),
                "select_s": stats(t_sel),
                "encode_s": stats(t_enc),
                "decode_s": stats(t_dec),
                "add_to_s": stats(t_add),
                "encdec_vs_topk": (statistics.median(t_enc) + statistics.median(t_dec)) / topk_med,
                "encdec_vs_topk_per_run": stats([(e + dd) / t for e, dd, t in zip(t_enc, t_dec, t_topk)]),
                "pipeline_vs_topk": (
                    statistics.median(t_sel)
                    + statistics.median(t_enc)
                    + statistics.median(t_dec)
                    + statistics.median(t_add)
                )
                / topk_med,
            }
            out[f"{label}|{frac:g}"] = row
            log(
                f"codec {label} top-{frac:g}: topk {topk_med * 1e3:.2f} ms, select {row['select_s']['median'] * 1e3:.2f}"
                f", encode {row['encode_s']['median'] * 1e3:.2f}, decode {row['decode_s']['median'] * 1e3:.2f} ms; "
                f"(enc+dec)/topk {row['encdec_vs_topk']:.3f}, pipeline/topk {row['pipeline_vs_topk']:.2f}"
            )
    return out


def _old_topk(v, k: int):
    """The compressor's selection before linear-time top-k: torch.topk on |v|, sorted positions, their values."""
    import torch

    from flower_sparsepush.core.compression import sorted_indices

    idx = sorted_indices(torch.topk(v.abs(), k, sorted=False).indices.numpy(), len(v))
    return idx, v.numpy()[idx].copy()


def section_topk(dims: dict[str, int], repeat: dict[str, int], log, fractions=FRACTIONS) -> dict[str, Any]:
    """``TopK(frac)(v)`` (selection + values) vs the old torch.topk path vs one ``v.abs().sum()`` pass, float32
    Gaussian vectors; the three are timed one after the other in every repeat, so load changes hit them alike."""
    import numpy as np
    import torch

    from flower_sparsepush.core.compression import TopK

    out = {}
    for label, d in dims.items():
        v = torch.randn(d, generator=torch.Generator().manual_seed(2))
        for frac in fractions:
            comp = TopK(frac)
            k = comp.count(d)
            t_new, t_old, t_pass = [], [], []
            for _ in range(repeat[label]):
                ts, c = timeit(lambda: comp(v), 1)
                t_new += ts
                ts, (old_idx, _) = timeit(lambda: _old_topk(v, k), 1)
                t_old += ts
                t_pass += timeit(lambda: v.abs().sum(), 1)[0]
            new, old, mem = (statistics.median(t) for t in (t_new, t_old, t_pass))
            row = {
                "k": k,
                "dim": d,
                "topk_s": stats(t_new),
                "torch_topk_path_s": stats(t_old),
                "abs_sum_pass_s": stats(t_pass),
                "topk_vs_pass": new / mem,
                "torch_topk_vs_pass": old / mem,
                "speedup_vs_torch_topk": old / new,
                "topk_vs_pass_per_run": stats([a / b for a, b in zip(t_new, t_pass)]),
                "same_set_as_torch_topk": bool(np.array_equal(c.indices, old_idx)),
            }
            out[f"{label}|{frac:g}"] = row
            log(
                f"topk {label} top-{frac:g}: TopK {new * 1e3:.2f} ms, torch.topk path {old * 1e3:.2f} ms, abs().sum() "
                f"{mem * 1e3:.2f} ms; TopK/pass {row['topk_vs_pass']:.2f}, torch.topk/pass "
                f"{row['torch_topk_vs_pass']:.2f}, same set {row['same_set_as_torch_topk']}"
            )
    return out


def section_store(dims: dict[str, int], repeat: int, log) -> dict[str, Any]:
    """Writing one node's state (store.py) on the store's own filesystem: the store's save (safetensors written from
    the tensors' memory, in place over the older of two slots, CRC-32 included) vs the store before it (``torch.save`` to a
    temporary file renamed over the old one) vs the CRC-32 alone vs one pickle round trip of the same state as a
    Flower ``ArrayRecord`` (what ``node-store=context`` pays in each direction of every message). The state is the
    shape a node holds in the overhead runs: x, momentum, 4 outgoing and 4 incoming references, y, one outbox."""
    import pickle
    import shutil

    import torch
    from flwr.app import Array, ArrayRecord

    from flower_sparsepush.flower.store import NodeStore, checksum, default_root

    out = {}
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=_mkdir(default_root())))
    try:
        for label, d in dims.items():
            g = torch.Generator().manual_seed(3)
            names = ["x", "m", *(f"ro.{j}" for j in (1, 2, 4, 8)), *(f"ri.{j}" for j in (15, 14, 12, 8))]
            flat = {n: torch.randn(d, generator=g) for n in names}
            flat |= {
                "y": torch.ones(1, dtype=torch.float64),
                "out.5": torch.randint(0, 255, (1636,), dtype=torch.uint8),
            }
            store = NodeStore(root, f"bench-{label}")
            old = root / f"old-{label}.pt"
            rec = ArrayRecord({k: Array(v.numpy()) for k, v in flat.items()})

            def old_save():
                tmp = old.with_suffix(".tmp")
                torch.save({"flat": flat, "round": 1, "checksum": checksum(flat)}, tmp)
                os.replace(tmp, old)

            t_new, t_old, t_crc, t_ctx = [], [], [], []
            for i in range(repeat):  # interleaved: load changes hit all four alike
                t_new += timeit(lambda: store.save(0, i, flat), 1)[0]
                t_old += timeit(old_save, 1)[0]
                t_crc += timeit(lambda: checksum(flat), 1)[0]
                t_ctx += timeit(lambda: pickle.loads(pickle.dumps(rec)), 1)[0]
            NodeStore.forget()
            row = {
                "dim": d,
                "state_mb": sum(v.numel() * v.element_size() for v in flat.values()) / 1e6,
                "store_save_s": stats(t_new),
                "torch_save_rename_s": stats(t_old),
                "checksum_s": stats(t_crc),
                "arrayrecord_pickle_round_trip_s": stats(t_ctx),
            }
            row["torch_save_rename_vs_store"] = row["torch_save_rename_s"]["median"] / row["store_save_s"]["median"]
            out[label] = row
            ms = lambda k: row[k]["median"] * 1e3  # noqa: E731
            log(
                f"store {label} ({row['state_mb']:.1f} MB): store save {ms('store_save_s'):.2f} ms (CRC "
                f"{ms('checksum_s'):.2f}), torch.save + rename {ms('torch_save_rename_s'):.2f} ms, ArrayRecord "
                f"pickle round trip {ms('arrayrecord_pickle_round_trip_s'):.2f} ms"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def section_data(models_: tuple[str, ...], dataset: str, batches: int, log) -> dict[str, Any]:
    """Loader batches/s (training.node_batch, data.NodeData) vs model steps/s at batch 32."""
    import torch
    import torch.nn.functional as F

    from flower_sparsepush.learn import data
    from flower_sparsepush.run import training

    out = {}
    for model in models_:
        cfg = bench_cfg(model, 16, 1, 1, dataset, tempfile.gettempdir())
        setup = training.get_setup(cfg)
        aug = training.generator(0, 0, "aug", 0)
        t_nb, _ = timeit(lambda: [training.node_batch(setup, 0, r, 0, aug) for r in range(batches)], 3)
        x, y = setup.shards[0]
        nd = data.NodeData(x, y, setup.ds.mean, setup.ds.std, setup.ds.augment)
        g = torch.Generator().manual_seed(0)
        t_nd, _ = timeit(lambda: [nd.next_batch(32, g) for _ in range(batches)], 3)
        xb, yb = training.node_batch(setup, 0, 0, 0, aug)
        m = setup.model
        m.train()

        def step():
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), yb).backward()

        steps = max(3, batches // 10)
        t_step, _ = timeit(lambda: [step() for _ in range(steps)], 3)
        row = {
            "node_batch_per_s": stats([batches / t for t in t_nb]),
            "nodedata_batch_per_s": stats([batches / t for t in t_nd]),
            "model_steps_per_s": stats([steps / t for t in t_step]),
        }
        row["loader_vs_step_speed"] = row["node_batch_per_s"]["median"] / row["model_steps_per_s"]["median"]
        row["loader_share_of_step"] = 1 / (1 + row["loader_vs_step_speed"])
        out[model] = row
        log(
            f"data {model}: node_batch {row['node_batch_per_s']['median']:.0f}/s, NodeData "
            f"{row['nodedata_batch_per_s']['median']:.0f}/s, model steps {row['model_steps_per_s']['median']:.1f}/s"
        )
    return out


def section_ray(out_dir: str, log) -> dict[str, Any]:
    """Two Ray nodes on this machine, the Flower run attached to them vs a single-machine run
    (:mod:`flower_sparsepush.simulations.ray_cluster`, which also writes ray_cluster.json/.md to ``out_dir``)."""
    from flower_sparsepush.simulations import ray_cluster

    command = (
        shlex.join(["sparsepush", "bench", *sys.argv[2:]])
        if sys.argv[1:2] == ["bench"]
        else "sparsepush bench --only ray"
    )
    rep = ray_cluster.run(out_dir, command=command)
    cmp_ = rep.get("comparison", {})
    out = {
        "nodes_used": rep.get("nodes_used", 0),
        "metrics_equal": bool(rep.get("metrics_equal", False)),
        "max_abs_metric_diff": rep.get("max_abs_metric_diff", float("nan")),
        "metrics_bitwise_equal": cmp_.get("metrics_bitwise_equal"),
        "differing_fields": cmp_.get("differing_fields"),
        "max_abs_model_diff": cmp_.get("max_abs_model_diff"),
        "per_node": rep.get("cluster_run", {}).get("per_node", {}),
        "cluster_startup_s": rep.get("cluster", {}).get("startup_s"),
        "cluster_run_s": rep.get("cluster_run", {}).get("wall_s"),
        "single_run_s": rep.get("single_run", {}).get("wall_s"),
        "leftover_pids": rep.get("leftover_pids", []),
        "report": str(Path(out_dir) / "ray_cluster.json"),
    }
    fr = rep.get("flwr_run_cluster", {})  # the `flwr run` path (SuperLink with RAY_ADDRESS) on the same cluster
    if fr:
        out["flwr_run"] = {
            "actor_nodes": fr.get("actor_nodes", 0),
            "metrics_equal": bool(fr.get("comparison", {}).get("equal", False)),
            "wall_s": fr.get("wall_s"),
            **({"error": fr["error"]} if "error" in fr else {}),
        }
    if "error" in rep:
        out["error"] = rep["error"]
    log(f"ray: {out['nodes_used']} Ray node(s) hosted ClientApp actors, metrics equal: {out['metrics_equal']}")
    return out


def _s_per_round(metrics_path: Path) -> float:
    """Seconds per round from the ServerApp's cumulative ``wall_s``, after the first round (start-up)."""
    walls = [float(r["wall_s"]) for r in map(json.loads, metrics_path.read_text().splitlines()) if "wall_s" in r]
    return (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1 else float("nan")


def section_deploy(out_dir: str, log, rounds: int = 6, nodes: int = 4) -> dict[str, Any]:
    """The same small config (deploy-local's: synthetic, mlp, 4 nodes, eval every round) through ``simulate`` (in a
    subprocess) and through ``deploy-local`` with node workers (`sparsepush node`); s/round after round 1."""
    import tempfile

    from flower_sparsepush.deploy.local import DEPLOY_DEFAULTS, SUPERNODE_POLL, deploy_run, pid_alive
    from flower_sparsepush.run.config import validate

    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    base = dict(DEPLOY_DEFAULTS) | {"num-nodes": nodes, "num-rounds": rounds}
    out: dict[str, Any] = {"config": base, "rounds": rounds, "nodes": nodes, "supernode_poll_s": SUPERNODE_POLL}
    sim_cfg = validate(base | {"out-dir": str(tmp / "sim"), "run-name": "sim"})
    code = "import json,sys; from flower_sparsepush.flower.launch import simulate; simulate(json.loads(sys.argv[1]))"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(sim_cfg)], capture_output=True, text=True, timeout=1800
    )
    out["sim_wall_s"] = time.time() - t0
    if proc.returncode != 0:
        out["sim_error"] = proc.stderr[-2000:]
    else:
        out["sim_s_per_round"] = _s_per_round(tmp / "sim" / "sim" / "metrics.jsonl")
    dep_cfg = validate(base | {"out-dir": str(tmp / "dep"), "run-name": "dep"})
    t0 = time.time()
    try:
        res, dep = deploy_run(dep_cfg, log_dir=str(tmp / "logs"), timeout=1800, workers=True)
        out["deploy_s_per_round"] = _s_per_round(res / "metrics.jsonl")
        out["leftover_pids"] = sorted(p for p in dep.seen_pids if pid_alive(p))
    except Exception as err:  # noqa: BLE001 - recorded in the report
        out["deploy_error"] = str(err)[-2000:]
    out["deploy_wall_s"] = time.time() - t0
    out["logs"] = str(tmp / "logs")
    log(
        f"deploy: {nodes} nodes, simulate {out.get('sim_s_per_round', float('nan')):.2f} s/round, deploy-local with "
        f"node workers {out.get('deploy_s_per_round', float('nan')):.2f} s/round"
    )
    return out


# --------------------------------------------------------------------------- report


def assemble(
    sections: dict[str, Any], machine: dict[str, Any], command: str, mode: str, load: dict[str, Any]
) -> dict[str, Any]:
    """The flat headline keys of bench.json from the section results (NaN where a part was not run)."""
    nan = float("nan")
    ov, sc, wi, co, tk = (sections.get(k, {}) for k in ("overhead", "scale", "wire", "codec", "topk"))
    rep: dict[str, Any] = {"machine": machine, "command": command, "mode": mode, "load": load}
    for model, nodes in (("resnet20", 16), ("cnn", 16), ("cnn", 64), ("resnet20", 64)):
        rep[f"flower_overhead_ratio_{model}_{nodes}"] = ov.get(f"{model}_{nodes}", {}).get("ratio", nan)
    ok = [int(n) for n, r in sc.items() if r.get("ok")]
    rep["max_nodes_run"] = max(ok) if ok else 0
    rep["peak_mem_gib_at_max_nodes"] = sc[str(max(ok))]["peak_pss_gib"] if ok else nan
    rep["peak_rss_sum_gib_at_max_nodes"] = sc[str(max(ok))]["peak_rss_gib"] if ok else nan
    rep["scale_model"] = sc[str(max(ok))].get("model", "cnn") if ok else None
    rep["scale_per_node_ratio_1000_vs_16"] = per_node_ratio(sc, 1000, 16)
    for frac in FRACTIONS:
        rep[f"entropy_ratio_topk_{frac:g}"] = wi.get(f"resnet20_update|topk:{frac:g}", {}).get("ratio", nan)
        rep[f"entropy_ratio_topk_{frac:g}_q4"] = wi.get(f"resnet20_update|topk:{frac:g}+q:4", {}).get("ratio", nan)
        rep[f"index_entropy_ratio_topk_{frac:g}"] = wi.get(f"resnet20_update|topk:{frac:g}", {}).get("index_ratio", nan)
    for label in ("0.27M", "11M"):
        rep[f"codec_vs_topk_ratio_{label}"] = co.get(f"{label}|0.01", {}).get("encdec_vs_topk", nan)
        rep[f"codec_vs_topk_ratio_{label}_max_over_fractions"] = max(
            (r["encdec_vs_topk"] for k, r in co.items() if k.startswith(f"{label}|")), default=nan
        )
    for frac in FRACTIONS:
        rep[f"topk_vs_memory_pass_ratio_11M_{frac:g}"] = tk.get(f"11M|{frac:g}", {}).get("topk_vs_pass", nan)
    tk_11m = [rep[f"topk_vs_memory_pass_ratio_11M_{frac:g}"] for frac in FRACTIONS]
    rep["topk_vs_memory_pass_ratio_11M"] = nan if any(math.isnan(x) for x in tk_11m) else max(tk_11m)
    ra = sections.get("ray", {})
    ray_ok = bool(ra) and "error" not in ra
    rep["ray_cluster_nodes_used"] = int(ra.get("nodes_used", 0)) if ray_ok else 0
    rep["ray_cluster_metrics_equal"] = bool(ray_ok and ra.get("metrics_equal"))
    de = sections.get("deploy", {})
    rep["deploy_s_per_round_4_nodes"] = de.get("deploy_s_per_round", nan)
    rep["sim_s_per_round_4_nodes"] = de.get("sim_s_per_round", nan)
    rep["sections"] = sections
    return rep


def _fmt(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def render_md(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    sec = rep["sections"]
    max_ratio = lambda lab: rep.get(f"codec_vs_topk_ratio_{lab}_max_over_fractions", float("nan"))  # noqa: E731
    entropy_max = max(rep[f"entropy_ratio_topk_{f:g}"] for f in FRACTIONS)
    goals = [
        (
            "Flower overhead, ResNet-20, 16 nodes (Flower s/round / in-process s/round)",
            "<= 1.3",
            rep["flower_overhead_ratio_resnet20_16"],
            rep["flower_overhead_ratio_resnet20_16"] <= 1.3,
        ),
        (
            "Flower overhead, small CNN, 16 nodes (Flower s/round / in-process s/round)",
            "<= 1.5",
            rep["flower_overhead_ratio_cnn_16"],
            rep["flower_overhead_ratio_cnn_16"] <= 1.5,
        ),
        (
            f"1,000 virtual nodes run ({rep.get('scale_model') or 'cnn'}, within 24 GiB)",
            ">= 1000",
            rep["max_nodes_run"],
            rep["max_nodes_run"] >= 1000,
        ),
        (
            "Seconds per node per round, 1,000 nodes / 16 nodes (a round linear in the node count: 1)",
            "<= 1.3",
            rep.get("scale_per_node_ratio_1000_vs_16", float("nan")),
            rep.get("scale_per_node_ratio_1000_vs_16", float("nan")) <= 1.3,
        ),
        (
            f"10,000 virtual nodes run ({rep.get('scale_model') or 'small model'}), peak memory (PSS) <= 20 GiB",
            ">= 10000, <= 20 GiB",
            f"{rep['max_nodes_run']}, {_fmt(rep['peak_mem_gib_at_max_nodes'], 2)} GiB",
            rep["max_nodes_run"] >= 10000 and rep["peak_mem_gib_at_max_nodes"] <= 20,
        ),
        ("Wire bits / entropy bound, top-10/1/0.1% (worst)", "<= 1.10", entropy_max, entropy_max <= 1.10),
        (
            "(encode + decode) / torch.topk, 0.27M (worst of 3 fractions)",
            "<= 2",
            max_ratio("0.27M"),
            max_ratio("0.27M") <= 2,
        ),
        ("(encode + decode) / torch.topk, 11M (worst of 3 fractions)", "<= 2", max_ratio("11M"), max_ratio("11M") <= 2),
        (
            "TopK compressor / one abs().sum() pass, 11M (worst of 3 fractions)",
            "<= 5",
            rep.get("topk_vs_memory_pass_ratio_11M", float("nan")),
            rep.get("topk_vs_memory_pass_ratio_11M", float("nan")) <= 5,
        ),
        (
            "Flower on a 2-node Ray cluster: Ray nodes hosting ClientApp actors, metrics = single machine",
            "2, equal",
            f"{rep.get('ray_cluster_nodes_used', 0)}, {'equal' if rep.get('ray_cluster_metrics_equal') else 'not equal'}",
            rep.get("ray_cluster_nodes_used", 0) >= 2 and bool(rep.get("ray_cluster_metrics_equal")),
        ),
        (
            "Deployment Engine, 4 SuperNodes with node workers, synthetic MLP, loopback: s/round "
            f"(simulation, same config: {_fmt(rep.get('sim_s_per_round_4_nodes', float('nan')), 2)})",
            "<= 5",
            rep.get("deploy_s_per_round_4_nodes", float("nan")),
            rep.get("deploy_s_per_round_4_nodes", float("nan")) <= 5,
        ),
    ]
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, flwr {m['flwr']}, Python "
        f"{m['python']}; one torch thread. Mode: {rep['mode']}. Load average (1/5/15 min) before: "
        f"{rep['load'].get('before')}, after: {rep['load'].get('after')} (the machine is shared with other jobs).",
        "",
        f"Regenerate: `{rep['command']}`",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for name, target, val, met in goals:
        lines.append(
            f"| {name} | {target} | {_fmt(val) if isinstance(val, float) else val} | {'yes' if met else 'no'} |"
        )
    ov = sec.get("overhead", {})
    if ov:
        lines += [
            "",
            "## 1. Flower overhead (seconds per round, median [min, max] over rounds 2..R)",
            "",
            "Flower keeps node state in the node store (state files, the default); the last two columns are the same "
            "run with `node-store=context` (the whole state in Flower's context.state, pickled with every message).",
            "",
            "| model, nodes | in-process | Flower, 1 actor | ratio | Flower, 2 actors | ratio | Ray start + "
            "registration s | Flower, context.state | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in ov.items():
            i, f = r["inprocess_s_per_round"], r["flower_s_per_round"]
            f2 = r.get("flower_2actors_s_per_round")
            lines.append(
                f"| {key.replace('_', ', ')} | {_fmt(i['median'])} [{_fmt(i['min'])}, {_fmt(i['max'])}] | "
                f"{_fmt(f['median'])} [{_fmt(f['min'])}, {_fmt(f['max'])}] | {_fmt(r.get('ratio'), 2)} | "
                + (
                    f"{_fmt(f2['median'])} [{_fmt(f2['min'])}, {_fmt(f2['max'])}] | {_fmt(r.get('ratio_2actors'), 2)}"
                    if f2
                    else "- | -"
                )
                + f" | {_fmt(r.get('flower_startup_s'), 1)} | "
                + (
                    f"{_fmt(r['flower_context_s_per_round']['median'])} | {_fmt(r.get('ratio_context'), 2)} |"
                    if "flower_context_s_per_round" in r
                    else "- | - |"
                )
            )
    sc = sec.get("scale", {})
    if sc:
        lines += [
            "",
            f"## 2. Scale ({_scale_title(sc)} through Flower, 2 actors)",
            "",
            "| nodes | ran | s/round median [min, max] | ms per node per round | peak PSS GiB (tree) | "
            "peak RSS sum GiB | processes | start-up s | wall s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, r in sc.items():
            s = r["s_per_round"]
            per_node = s["median"] / int(n) * 1000 if s.get("n") else float("nan")
            lines.append(
                f"| {n} | {'yes' if r['ok'] else 'no'} | {_fmt(s['median'], 2)} [{_fmt(s['min'], 2)}, "
                f"{_fmt(s['max'], 2)}] | {_fmt(per_node, 1)} | {_fmt(r['peak_pss_gib'], 2)} | "
                f"{_fmt(r['peak_rss_gib'], 2)} | {r['peak_processes']} | {_fmt(r['startup_s'], 1)} | "
                f"{_fmt(r['wall_s'], 0)} |"
            )
        if "growth" in sec:
            g = sec["growth"]
            lines += [
                "",
                f"Growth from {g['from']} to {g['to']} nodes: time per round x{_fmt(g['time_factor'], 2)}, "
                f"memory (PSS) +{_fmt(g['mem_per_node_mib'], 2)} MiB per node "
                f"(nodes x{_fmt(g['node_factor'], 1)}).",
            ]
    wi = sec.get("wire", {})
    if wi:
        lines += [
            "",
            "## 3. Wire efficiency (bits of one real message / entropy bound)",
            "",
            "| vector | compressor | k | bits | bound | ratio | index part / log2 C(d,k) | index coding |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, r in wi.items():
            vec, spec = key.split("|")
            lines.append(
                f"| {vec} | {spec} | {r['k']} | {r['bits']} | {r['entropy_bits']:.0f} | {r['ratio']:.4f} | "
                f"{r['index_ratio']:.4f} | {r['coding']} |"
            )
    co = sec.get("codec", {})
    if co:
        lines += [
            "",
            "## 4. Codec speed (ms, median over interleaved repeats; Gaussian vectors)",
            "",
            "| size, fraction | torch.topk | TopK compressor | encode | decode | add_to_ | (enc+dec)/topk | all/topk |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, r in co.items():
            ms = lambda s: _fmt(r[s]["median"] * 1e3, 2)  # noqa: E731
            lines.append(
                f"| {key.replace('|', ', ')} | {ms('topk_s')} | {ms('select_s')} | {ms('encode_s')} | "
                f"{ms('decode_s')} | {ms('add_to_s')} | {r['encdec_vs_topk']:.3f} | "
                f"{r['pipeline_vs_topk']:.2f} |"
            )
    tk = sec.get("topk", {})
    if tk:
        lines += [
            "",
            "## 5. Top-k selection vs one memory pass (ms, median over interleaved repeats; Gaussian float32)",
            "",
            "`TopK(frac)(v)` is the whole compressor call (selection + values); the torch.topk path is the selection "
            "it replaced (torch.topk on |v|, sorted positions, values); `v.abs().sum()` is one pass over the vector "
            "(at 0.27M it runs from cache, so that ratio is for reference only).",
            "",
            "| size, fraction | k | abs().sum() | TopK compressor | torch.topk path | TopK / pass | torch.topk / pass | "
            "speed-up | same set |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in tk.items():
            ms = lambda s: _fmt(r[s]["median"] * 1e3, 2)  # noqa: E731
            lines.append(
                f"| {key.replace('|', ', ')} | {r['k']} | {ms('abs_sum_pass_s')} | {ms('topk_s')} | "
                f"{ms('torch_topk_path_s')} | {r['topk_vs_pass']:.2f} | {r['torch_topk_vs_pass']:.2f} | "
                f"{r['speedup_vs_torch_topk']:.1f}x | {'yes' if r['same_set_as_torch_topk'] else 'no'} |"
            )
    so = sec.get("store", {})
    if so:
        lines += [
            "",
            "## Node store: writing one node's state (ms, median over interleaved repeats)",
            "",
            "The store's save (safetensors written straight from the tensors' memory, in place over the older of two slots, CRC-32 included) "
            "vs the store before (torch.save to a temporary file, renamed over the old one) vs one pickle round trip "
            "of the state as a Flower ArrayRecord (`node-store=context`, each direction of every message).",
            "",
            "| model | state MB | store save | of which CRC-32 | torch.save + rename | ArrayRecord pickle round trip |",
            "|---|---|---|---|---|---|",
        ]
        for label, r in so.items():
            ms = lambda k: _fmt(r[k]["median"] * 1e3, 2)  # noqa: E731
            lines.append(
                f"| {label} | {r['state_mb']:.1f} | {ms('store_save_s')} | {ms('checksum_s')} | "
                f"{ms('torch_save_rename_s')} | {ms('arrayrecord_pickle_round_trip_s')} |"
            )
    da = sec.get("data", {})
    if da:
        lines += [
            "",
            "## 6. Data path (batch 32, per second, median)",
            "",
            "| model | training.node_batch | data.NodeData.next_batch | model steps (fwd+bwd) | loader share of a "
            "step |",
            "|---|---|---|---|---|",
        ]
        for model, r in da.items():
            lines.append(
                f"| {model} | {r['node_batch_per_s']['median']:.0f} | {r['nodedata_batch_per_s']['median']:.0f}"
                f" | {r['model_steps_per_s']['median']:.1f} | {100 * r['loader_share_of_step']:.1f}% |"
            )
    ra = sec.get("ray", {})
    if ra:
        lines += [
            "",
            "## Ray cluster (two Ray nodes on this machine; details in ray_cluster.md)",
            "",
            "| Ray node | role | ClientApp calls | actors |",
            "|---|---|---|---|",
        ]
        for node, r in ra.get("per_node", {}).items():
            lines.append(f"| `{node[:12]}` | {r['role']} | {r['calls']} | {r['actors']} |")
        lines += [
            "",
            f"Metrics equal to the single-machine run: {'yes' if ra.get('metrics_equal') else 'no'} (max abs "
            f"difference {ra.get('max_abs_metric_diff', float('nan')):.3g}); start-up "
            f"{_fmt(ra.get('cluster_startup_s'), 1)} s, cluster run {_fmt(ra.get('cluster_run_s'), 1)} s, "
            f"single-machine run {_fmt(ra.get('single_run_s'), 1)} s"
            + (
                f"; `flwr run` path on the same cluster: ClientAppActors on {ra['flwr_run'].get('actor_nodes', 0)} "
                f"Ray node(s), metrics equal: {'yes' if ra['flwr_run'].get('metrics_equal') else 'no'}"
                if ra.get("flwr_run")
                else ""
            )
            + (f"; error: `{ra['error']}`" if "error" in ra else "")
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _scale_title(sc: dict[str, Any]) -> str:
    """``small CNN`` / ``logreg`` ..., and whether Flower's engine ran as it comes (rows from before the model and
    the linear switch were recorded are the small CNN, as it comes)."""
    rows = list(sc.values())
    model = rows[0].get("model", "cnn") if rows else "cnn"
    name = "small CNN" if model == "cnn" else model
    linear = rows[0].get("linear", False) if rows else False
    return f"{name}, {'indexed message lookup (linkstate.py)' if linear else 'Flower engine as it comes'}"


def per_node_ratio(scale: dict[str, Any], big: int, small: int) -> float:
    """Seconds per node per round at ``big`` nodes / at ``small`` nodes (1.0: a round is linear in the node count);
    NaN unless both ran."""
    a, b = scale.get(str(small), {}), scale.get(str(big), {})
    if not (a.get("ok") and b.get("ok")):
        return float("nan")
    return (b["s_per_round"]["median"] / big) / (a["s_per_round"]["median"] / small)


def growth(scale: dict[str, Any]) -> dict[str, Any] | None:
    ok = sorted(int(n) for n, r in scale.items() if r.get("ok"))
    if len(ok) < 2:
        return None
    a, b = scale[str(ok[0])], scale[str(ok[-1])]
    return {
        "from": ok[0],
        "to": ok[-1],
        "node_factor": ok[-1] / ok[0],
        "time_factor": b["s_per_round"]["median"] / a["s_per_round"]["median"],
        "mem_per_node_mib": (b["peak_pss_gib"] - a["peak_pss_gib"]) * 1024 / (ok[-1] - ok[0]),
    }


SECTIONS = ("wire", "codec", "topk", "store", "data", "overhead", "scale", "ray", "deploy")
STATUS_NAME = "bench.status.json"


def run_bench(args) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    quick = args.quick
    log = lambda s: print(f"[bench {time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    sections: dict[str, Any] = {}
    load = {"before": loadavg()}
    parts = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = sorted(parts - set(SECTIONS))
    if unknown:
        raise ValueError(f"--only {args.only!r}: unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    planned = [name for name in SECTIONS if name in parts]
    # sections done of planned, elapsed, ETA: on the terminal and in <out-dir>/bench.status.json
    prog = Progress(len(planned), Path(args.out_dir) / STATUS_NAME, "bench", unit="sections", min_interval=0)

    def starting(name: str) -> None:
        prog.update(planned.index(name), f"running: {name}")

    if "wire" in parts:
        starting("wire")
        import torch

        upd = trained_difference(steps=3 if quick else 10, dataset=args.dataset)
        gauss = torch.randn(len(upd), generator=torch.Generator().manual_seed(0))
        sections["wire"] = section_wire({"resnet20_update": upd, "gaussian": gauss}, log)
    if "codec" in parts:
        starting("codec")
        sections["codec"] = section_codec(
            {"0.27M": 269_722, "11M": 11_000_000}, {"0.27M": 9 if quick else 21, "11M": 3 if quick else 7}, log
        )
    if "topk" in parts:
        starting("topk")
        sections["topk"] = section_topk(
            {"11M": 11_000_000, "0.27M": 269_722}, {"11M": 3 if quick else 9, "0.27M": 9 if quick else 31}, log
        )
    if "store" in parts:
        starting("store")
        sections["store"] = section_store({"cnn": 101_730, "resnet20": 269_722}, 9 if quick else 31, log)
    if "data" in parts:
        starting("data")
        sections["data"] = section_data(("cnn", "resnet20"), args.dataset, 50 if quick else 200, log)
    if "overhead" in parts:
        starting("overhead")
        cases = [("cnn", 16), ("cnn", 64), ("resnet20", 16)] + ([("resnet20", 64)] if args.resnet64 else [])
        sections["overhead"] = section_overhead(
            cases,
            rounds=4 if quick else 6,
            local_steps=args.local_steps,
            dataset=args.dataset,
            mem_limit=args.mem_limit_gib,
            log=log,
            two_actors=() if quick else (("cnn", 16), ("resnet20", 16)),
        )
    if "scale" in parts:
        starting("scale")
        ladder = [int(n) for n in (args.nodes or ("16,64" if quick else "16,64,256,1000")).split(",")]
        sections["scale"] = section_scale(
            ladder,
            rounds=3 if quick else 4,
            local_steps=args.local_steps,
            dataset=args.dataset,
            mem_limit=args.mem_limit_gib,
            log=log,
            timeout=args.run_timeout,
            model=args.scale_model,
            linear=not args.scale_flower_as_is,
        )
        g = growth(sections["scale"])
        if g:
            sections["growth"] = g
    if "ray" in parts:
        starting("ray")
        sections["ray"] = section_ray(args.out_dir, log)
    if "deploy" in parts:
        starting("deploy")
        sections["deploy"] = section_deploy(args.out_dir, log, rounds=4 if quick else 6)
    prog.update(len(planned), "writing the report")
    prog.close()
    load["after"] = loadavg()
    command = (
        shlex.join(["sparsepush", "bench", *sys.argv[2:]])
        if sys.argv[1:2] == ["bench"]
        else shlex.join(["sparsepush", "bench", *(["--quick"] if quick else [])])
    )
    return assemble(sections, machine_info(), command, "quick" if quick else "full", load)


def merge_previous(rep: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """``rep`` (a ``--only`` run) with the sections it did not run taken from ``previous`` (the bench.json already
    there), each section keeping the command, time and load it was measured with (``section_runs``), and the
    headline keys assembled again from the merged sections."""
    runs = dict(previous.get("section_runs", {}))
    for name in previous.get("sections", {}):
        runs.setdefault(name, {"command": previous.get("command"), "mode": previous.get("mode")})
    for name in rep["sections"]:
        runs[name] = {"command": rep["command"], "mode": rep["mode"], "when": time.strftime("%Y-%m-%d %H:%M")}
    sections = dict(previous.get("sections", {})) | rep["sections"]
    merged = assemble(sections, rep["machine"], rep["command"], rep["mode"], rep["load"])
    merged["section_runs"] = {k: runs[k] for k in sections if k in runs}
    return merged


def cmd_bench(args) -> int:
    rep = run_bench(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prev_path = out / "bench.json"
    if args.only and prev_path.exists():  # refresh the sections asked for, keep the others
        try:
            rep = merge_previous(rep, json.loads(prev_path.read_text()))
        except (ValueError, KeyError) as err:
            print(f"warning: {prev_path} is not readable ({err}); writing only the sections of this run")
    (out / "bench.json").write_text(json.dumps(rep, indent=2, default=float) + "\n")
    (out / "bench.md").write_text(render_md(rep))
    print(render_md(rep))
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


def register(subparsers) -> None:
    """Add ``bench`` to the ``sparsepush`` CLI."""
    p = subparsers.add_parser("bench", help="performance and scale benchmarks -> results/bench.json, bench.md")
    p.add_argument("--quick", action="store_true", help="fewer repeats and rounds, nodes 16 and 64 (a few minutes)")
    p.add_argument("--out-dir", default="results", help="where bench.json and bench.md go")
    p.add_argument("--only", default="", help=f"comma list of sections: {','.join(SECTIONS)}")
    p.add_argument(
        "--nodes", default="", help="node counts of the scale ladder, up to 10000 (default 16,64,256,1000; quick 16,64)"
    )
    p.add_argument("--dataset", default="fashion_mnist", help="data set of the Flower runs and the data section")
    p.add_argument("--local-steps", type=int, default=2, help="local SGD steps per round in the Flower runs")
    p.add_argument("--resnet64", action="store_true", help="also measure the overhead of ResNet-20 at 64 nodes")
    p.add_argument("--mem-limit-gib", type=float, default=18.0, help="stop a run whose process tree passes this")
    p.add_argument("--run-timeout", type=float, default=1500.0, help="seconds before a scale run is stopped")
    p.add_argument(
        "--scale-model", default="cnn", choices=SCALE_MODELS, help="model of the scale runs (logreg/mlp: 10,000 nodes)"
    )
    p.add_argument(
        "--scale-flower-as-is",
        action="store_true",
        help="scale runs without linkstate.py's indexed lookup and scaled polling (Flower's engine as it comes)",
    )
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        result = worker(json.loads(sys.argv[2]))
        Path(sys.argv[3]).write_text(json.dumps(result))
        sys.exit(0)
    from flower_sparsepush.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
