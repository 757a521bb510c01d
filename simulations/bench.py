"""``sparsepush bench``: performance and scale, measured. Writes ``results/bench.json`` and ``results/bench.md``.

Sections (each figure a median of several samples with min and max; each comparison a ratio measured in the same
invocation, one right after the other):

1. ``overhead``: wall time per round of Sparse-Push through Flower's simulation engine
   (``flwr.simulation.run_simulation``, the path of :func:`launch.simulate`) vs :func:`inprocess.run_inprocess` on the
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
5. ``topk``: the whole top-k compressor call (``TopK(frac)(v)``: selection + values) vs the ``torch.topk`` path
   vs one ``v.abs().sum()`` pass over the same vector (a memory-bound reference), at 11M and 0.27M entries.
- ``store``: one node state written by the node store (store.py) vs ``torch.save`` to a temporary file + rename vs its
   CRC-32 vs a pickle round trip of the same state as a Flower ``ArrayRecord`` (``node-store=context``).
6. ``data``: batches per second of the loader (``node_train.node_batch``, ``data.NodeData.next_batch``) vs model
   steps per second (forward + backward) at the same batch size.
- ``ray`` (not a timing): the Flower simulation on a two-node Ray cluster started on this machine vs a
  single-machine run of the same config and seed (``simulations/ray_cluster.py``, results/ray_cluster.json): the
  Ray nodes that hosted ClientApp actors and whether the metrics are equal.

All timings use ``torch.set_num_threads(1)``: the ClientApp runs with one thread per actor, and on this 2-core
machine shared with other jobs two intra-op threads were measured slower, not faster. The load average before and
after each section is recorded. Flower and in-process runs go to subprocesses so that each one's memory is measured
on its own and a run that grows too large can be stopped.

Modules: this one runs the sections and writes the report (``sparsepush bench``); ``bench_micro`` (wire, codec,
topk, store, data) and ``bench_flower`` (overhead, scale, ray, deploy) measure; ``bench_measure`` holds the timing,
statistics and process-tree memory helpers, ``bench_worker`` the run that ``bench_measure.run_worker`` starts in a
subprocess, ``bench_report`` the headline keys and the Markdown.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.simulations.bench_flower import (
    SCALE_MODELS,
    section_deploy,
    section_overhead,
    section_ray,
    section_scale,
)
from flower_sparsepush.simulations.bench_measure import bench_command, loadavg, machine_info
from flower_sparsepush.simulations.bench_micro import (
    section_codec,
    section_data,
    section_store,
    section_topk,
    section_wire,
    trained_difference,
)
from flower_sparsepush.simulations.bench_report import assemble, growth, render_md

from flower_sparsepush.run.progress import Progress

SECTIONS = ("wire", "codec", "topk", "store", "data", "overhead", "scale", "ray", "deploy")
STATUS_NAME = "bench.status.json"


# --------------------------------------------------------------------------- one function a section
# Each takes the parsed arguments and the log and returns the entries it adds to the report's sections.


def _wire(args, log) -> dict[str, Any]:
    import torch

    upd = trained_difference(steps=3 if args.quick else 10, dataset=args.dataset)
    gauss = torch.randn(len(upd), generator=torch.Generator().manual_seed(0))
    return {"wire": section_wire({"resnet20_update": upd, "gaussian": gauss}, log)}


def _codec(args, log) -> dict[str, Any]:
    quick = args.quick
    repeat = {"0.27M": 9 if quick else 21, "11M": 3 if quick else 7}
    return {"codec": section_codec({"0.27M": 269_722, "11M": 11_000_000}, repeat, log)}


def _topk(args, log) -> dict[str, Any]:
    quick = args.quick
    repeat = {"11M": 3 if quick else 9, "0.27M": 9 if quick else 31}
    return {"topk": section_topk({"11M": 11_000_000, "0.27M": 269_722}, repeat, log)}


def _store(args, log) -> dict[str, Any]:
    return {"store": section_store({"cnn": 101_730, "resnet20": 269_722}, 9 if args.quick else 31, log)}


def _data(args, log) -> dict[str, Any]:
    return {"data": section_data(("cnn", "resnet20"), args.dataset, 50 if args.quick else 200, log)}


def _flower_options(args, log) -> dict[str, Any]:
    """The options the overhead and scale runs share."""
    return {"local_steps": args.local_steps, "dataset": args.dataset, "mem_limit": args.mem_limit_gib, "log": log}


def _overhead(args, log) -> dict[str, Any]:
    cases = [("cnn", 16), ("cnn", 64), ("resnet20", 16)] + ([("resnet20", 64)] if args.resnet64 else [])
    two_actors = () if args.quick else (("cnn", 16), ("resnet20", 16))
    rounds = 4 if args.quick else 6
    return {"overhead": section_overhead(cases, rounds=rounds, two_actors=two_actors, **_flower_options(args, log))}


def _scale(args, log) -> dict[str, Any]:
    ladder = [int(n) for n in (args.nodes or ("16,64" if args.quick else "16,64,256,1000")).split(",")]
    scale = section_scale(
        ladder,
        rounds=3 if args.quick else 4,
        timeout=args.run_timeout,
        model=args.scale_model,
        linear=not args.scale_flower_as_is,
        **_flower_options(args, log),
    )
    g = growth(scale)
    return {"scale": scale} | ({"growth": g} if g else {})


def _ray(args, log) -> dict[str, Any]:
    return {"ray": section_ray(args.out_dir, log)}


def _deploy(args, log) -> dict[str, Any]:
    return {"deploy": section_deploy(args.out_dir, log, rounds=4 if args.quick else 6)}


RUNNERS = {
    "wire": _wire,
    "codec": _codec,
    "topk": _topk,
    "store": _store,
    "data": _data,
    "overhead": _overhead,
    "scale": _scale,
    "ray": _ray,
    "deploy": _deploy,
}


# --------------------------------------------------------------------------- the command


def run_bench(args) -> dict[str, Any]:
    """Run the sections asked for (``--only``, else all), in :data:`SECTIONS` order; the assembled report."""
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
    for k, name in enumerate(planned):
        prog.update(k, f"running: {name}")
        sections |= RUNNERS[name](args, log)
    prog.update(len(planned), "writing the report")
    prog.close()
    load["after"] = loadavg()
    command = bench_command("sparsepush bench --quick" if quick else "sparsepush bench")
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
    from flower_sparsepush.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
