"""The claims table: FedAvg, SGP, Sparse-Push and SCSP on the same data, model, schedule and seeds.

``sparsepush claims`` runs every (row, partition, seed) with the in-process loop (inprocess.run_inprocess, the code
the Flower ClientApp runs; tests/test_flower.py ties the two together) and appends each finished run to
``<out>/claims_rows.jsonl``, so an interrupted table resumes where it stopped (``--max-hours`` ends a chunk cleanly
between runs). A run itself checkpoints about every 1/40 of its rounds to ``<out>/checkpoints/<run>/``: one cut off
mid-way (a session that ends, a killed process) continues from its last checkpoint when the same command runs
again, and ends on the journal entry an uninterrupted run writes (tests/test_claims.py); its folder is removed once
the run is journaled. ``--jobs N`` runs N rows at once in worker processes and ``--device cuda`` batches every node's local
SGD on a GPU (batched.py). Then it writes ``claims.json``, ``claims.md`` and the plots ``claims_<dataset>.png``;
``<out>/claims.status.json`` says how many runs are done of those planned.

Honesty of the numbers: every run holds out ``val-split`` of the training set (per class, seeded by the run seed).
Among the candidate rows of one goal (``group``), the one with the best *validation* score (the worst of consensus,
node mean and node min accuracy, mean over seeds) is marked ``chosen``; its test accuracy is what the goal reads.
SGP and every compressed row share epochs, seeds, data and the validation split.

Modules: ``claims_plan`` holds the rows, schedules, goals and the plan of runs (and the legend of the row names),
``claims_report`` the aggregation over seeds, the goals, claims.md and the plots; this one runs the plan and keeps
the journal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.simulations.claims_plan import ROWS, SCHEDULES, SEEDS, plan, run_config
from flower_sparsepush.simulations.claims_report import finish


def parse_rounds(text: str) -> list[int]:
    """``--rounds`` of the diagnostics that stop a claims row early (residual_energy, lookahead_distance)."""
    try:
        rounds = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--rounds {text!r}: give whole numbers separated by commas, e.g. 40,200") from None
    if min(rounds) < 1:
        raise SystemExit(f"--rounds {text!r}: every round must be 1 or more")
    return rounds


CHECKPOINTS = 40  # checkpoints per run (a cut-off run loses at most 1/40 of its rounds)


def checkpoint_dir(out: Path, run_id: str) -> Path:
    """Where the run ``run_id`` keeps its checkpoint while it runs."""
    return out / "checkpoints" / run_id.replace("/", "__")


def resumable(cfg, ckpt: Path | None):
    """``cfg`` checkpointing into ``ckpt`` about :data:`CHECKPOINTS` times over its rounds and resuming from what is
    there (nothing there: it starts at round 0); ``cfg`` unchanged without ``ckpt``."""
    if ckpt is None:
        return cfg
    total = cfg.num_rounds + (cfg.final_gossip_rounds if cfg.strategy != "fedavg" else 0)
    every = max(1, total // CHECKPOINTS)
    return cfg.replace(out_dir=str(ckpt.parent), run_name=ckpt.name, checkpoint_every=every, resume=True)


def eval_every(spec: dict[str, Any], cfg) -> int:
    """Rounds between the evaluations of a run: ``spec["evals"]`` over all its rounds (the last one always)."""
    total = cfg.num_rounds + (cfg.final_gossip_rounds if cfg.strategy != "fedavg" else 0)
    return max(1, total // spec["evals"])


def run_row(spec: dict[str, Any], command: str, device: str = "cpu", ckpt: Path | None = None) -> dict[str, Any]:
    """Train one run and return its journal entry (numbers measured in this run). With ``ckpt`` it checkpoints
    there and continues from a checkpoint it finds (:func:`resumable`)."""
    import torch

    from flower_sparsepush.core.energy import forward_flops, node_energy
    from flower_sparsepush.run.inprocess import run_inprocess
    from flower_sparsepush.run.setup import get_setup

    torch.set_num_threads(1)
    cfg = run_config(spec, device)
    rounds, steps = cfg.num_rounds, cfg.local_steps
    total = rounds + (cfg.final_gossip_rounds if cfg.strategy != "fedavg" else 0)
    start = time.perf_counter()
    res = run_inprocess(
        resumable(cfg, ckpt),
        eval_every=eval_every(spec, cfg),
        log=lambda m: print(f"  {spec['id']}: round {m['round']}/{total} acc {m['acc_consensus']:.4f}", flush=True),
    )
    wall = time.perf_counter() - start
    last = res.history[-1]
    n = cfg.num_nodes
    setup = get_setup(cfg)
    flops = forward_flops(setup.model, tuple(setup.ds.input_shape))
    samples = rounds * steps * cfg.batch_size  # per node; the final gossip phase trains nothing
    energy = node_energy(sum(res.bits_sent) / n, sum(res.bits_received) / n, samples, flops)
    keep = ("acc_consensus", "acc_node_mean", "acc_node_min", "val_acc_consensus", "val_acc_node_mean")
    return {
        "id": spec["id"],
        "name": spec["name"],
        "group": spec["group"],
        "switches": spec["switches"],
        "dataset": cfg.dataset,
        "model": cfg.model,
        "partition": cfg.partition,
        "strategy": cfg.strategy,
        "compressor": "none" if cfg.strategy == "fedavg" else cfg.compressor,
        "gamma": 1.0 if cfg.strategy == "fedavg" else cfg.gamma,
        "form": cfg.form,
        "nodes": n,
        "graph": cfg.graph,
        "epochs": spec["epochs"],
        "rounds": rounds,
        "local_steps": steps,
        "batch_size": cfg.batch_size,
        "val_split": cfg.val_split,
        "seed": cfg.seed,
        "device": device,
        **{k: last[k] for k in last if k in keep or k.startswith("val_") or k.startswith("acc_")},
        "consensus_distance": last["consensus_distance"],
        "node_eval": "each node on "
        + ("1,000 seeded test / validation samples" if spec["quick"] else "the whole test set and validation split"),
        "bits_per_node": sum(res.bits_sent) / n,
        "bits_received_per_node": sum(res.bits_received) / n,
        "forward_flops_per_sample": flops,
        "train_samples_per_node": samples,
        **energy,
        "wall_s": wall,  # of the last part when the run was resumed
        "resumed_from_round": res.start_round,
        "history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in res.history],
        "command": command,
    }


def _work(spec: dict[str, Any], command: str, device: str, ckpt: Path | None = None) -> dict[str, Any]:
    return run_row(spec, command, device, ckpt)


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The runs a journal holds, by run id (the last entry of an id wins); empty when there is no journal."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["id"]] = r
    return done


def _selected(args: argparse.Namespace, datasets: list[str], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """The planned runs of this call: ``--evals`` applied, only the ``--rows`` asked for."""
    specs = plan(datasets, args.quick, seeds)
    if args.evals:  # fewer evaluations (the last one always runs): the same result, cheaper on a CPU
        for s in specs:
            s["evals"] = args.evals
    if getattr(args, "epochs", 0):  # another schedule length (e.g. the paper's 200 on a GPU): use its own --out
        for s in specs:
            s["epochs"] = args.epochs
    if getattr(args, "model", ""):  # another model on the same rows (e.g. the paper's VGG-11): its own --out too
        from flower_sparsepush.learn.models import MODEL_NAMES

        if args.model not in MODEL_NAMES:
            raise ValueError(f"--model {args.model!r}: choose one of {', '.join(MODEL_NAMES)}")
        for s in specs:
            s["cfg"] = s["cfg"] | {"model": args.model}
    if args.rows:
        want = set(args.rows.split(","))
        unknown = want - set(ROWS)
        if unknown:
            raise ValueError(f"unknown claims row(s) {sorted(unknown)}; rows are: {', '.join(ROWS)}")
        specs = [s for s in specs if s["name"] in want]
    return specs


def check_journal_schedule(journal: Path, done: dict[str, dict[str, Any]], specs: list[dict[str, Any]]) -> None:
    """Refuse a call whose runs the journal holds under another model or number of epochs: run ids name neither,
    so such a run would be taken as done, and the table would mix two schedules."""
    for s in specs:
        r = done.get(s["id"])
        if r is None:
            continue
        held = (r.get("model"), float(r.get("epochs", s["epochs"])))
        asked = (s["cfg"]["model"], float(s["epochs"]))
        if held != asked:
            raise ValueError(
                f"{journal} holds {s['id']} with model {held[0]} at {held[1]:g} epochs, but this call asks for "
                f"{asked[0]} at {asked[1]:g} epochs: give this schedule its own --out (e.g. --out "
                f"results/{s['cfg']['dataset']}_{asked[0]}_{asked[1]:g}ep)"
            )


def _past(deadline: float | None) -> bool:
    return bool(deadline) and time.monotonic() > deadline


def _run_serial(todo: list[dict[str, Any]], record, cmd, device: str, deadline: float | None, ckpt) -> None:
    for k, spec in enumerate(todo):
        if _past(deadline):
            print(f"stopping after {k} runs: --max-hours reached; run the same command to continue", flush=True)
            break
        print(f"[{k + 1}/{len(todo)}] {spec['id']}", flush=True)
        record(run_row(spec, cmd(spec), device, ckpt(spec)))


def _run_parallel(
    todo: list[dict[str, Any]], record, cmd, device: str, jobs: int, deadline: float | None, ckpt
) -> None:
    """``jobs`` runs at once in spawned worker processes; a failed run is reported and the others go on."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from flower_sparsepush.simulations.claims import _work as work  # picklable by its module's name

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        queue = list(todo)
        running = {}
        while queue or running:
            while queue and len(running) < jobs and not _past(deadline):
                spec = queue.pop(0)
                running[pool.submit(work, spec, cmd(spec), device, ckpt(spec))] = spec
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                spec = running.pop(fut)
                try:
                    record(fut.result())
                except Exception as err:  # one failed run must not lose the others
                    print(f"run {spec['id']} failed: {err!r}", flush=True)


def main(args: argparse.Namespace) -> int:
    from flower_sparsepush.run.progress import Progress

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "claims_quick" if args.quick else "claims"
    datasets = args.datasets.split(",")
    for ds in datasets:
        if ds not in SCHEDULES:
            raise ValueError(f"unknown dataset {ds!r} for claims; choose from {', '.join(SCHEDULES)}")
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((0,) if args.quick else SEEDS)
    specs = _selected(args, datasets, seeds)
    journal = out / f"{name}_rows.jsonl"
    done = read_journal(journal)
    check_journal_schedule(journal, done, specs)  # also with --rerun: the table would mix the two schedules
    todo = [s for s in specs if s["id"] not in done or args.rerun]
    flags = " --quick" if args.quick else ""
    if getattr(args, "model", ""):
        flags += f" --model {args.model}"
    if getattr(args, "epochs", 0):
        flags += f" --epochs {args.epochs:g}"
    prog = Progress(len(specs), out / f"{name}.status.json", "claims", unit="runs", initial=len(specs) - len(todo))
    deadline = time.monotonic() + 3600 * args.max_hours if args.max_hours else None

    def record(row: dict[str, Any]) -> None:
        done[row["id"]] = row
        with journal.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shutil.rmtree(checkpoint_dir(out, row["id"]), ignore_errors=True)  # journaled: its checkpoint is spent
        prog.update(sum(s["id"] in done for s in specs), note=row["id"])

    def ckpt(spec: dict[str, Any]) -> Path:
        return checkpoint_dir(out, spec["id"])

    def cmd(spec: dict[str, Any]) -> str:
        return f"sparsepush claims{flags} --datasets {spec['cfg']['dataset']} --rows {spec['name']}"

    if args.jobs <= 1:
        _run_serial(todo, record, cmd, args.device, deadline, ckpt)
    else:
        _run_parallel(todo, record, cmd, args.device, args.jobs, deadline, ckpt)
    prog.close()
    # the table holds every run of these datasets in the journal, also those of other --rows / --seeds calls
    order = {s["id"]: k for k, s in enumerate(plan(datasets, args.quick, SEEDS + seeds))}
    runs = sorted((r for r in done.values() if r["id"] in order), key=lambda r: order[r["id"]])
    if runs:
        finish(runs, out, name, f"sparsepush claims{flags} --datasets {','.join(datasets)}")
        print((out / f"{name}.md").read_text())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("claims", help="the claims table: FedAvg vs SGP vs Sparse-Push vs SCSP (long)")
    p.add_argument("--quick", action="store_true", help="tiny schedules, one seed: a check that takes minutes")
    p.add_argument("--datasets", default="fashion_mnist", help="comma-separated: fashion_mnist, cifar10")
    p.add_argument("--rows", default="", help="run only these rows (comma-separated names, e.g. sgp,sp-h4-merge)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--rerun", action="store_true", help="run again even what the journal already holds")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | auto | cuda: where local SGD runs (batched on a GPU)")
    p.add_argument("--evals", type=int, default=0, help="evaluations per run (0 = the schedule's; the last is kept)")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="epochs of every run (0 = the schedule's: Fashion-MNIST 20, CIFAR-10 20); journal ids do not "
                   "name the epochs, so give another schedule its own --out")  # fmt: skip
    p.add_argument("--model", default="",
                   help="the model of every run ('' = the schedule's: Fashion-MNIST cnn, CIFAR-10 resnet20; e.g. "
                   "vgg11, the paper's other model); journal ids do not name the model, so give it its own --out")  # fmt: skip
    p.add_argument("--max-hours", type=float, default=0.0, help="start no new run after this many hours (0 = no limit)")
    p.add_argument("--out", default="results", help="output folder")
    p.set_defaults(func=main)


if __name__ == "__main__":  # python -m flower_sparsepush.simulations.claims ... (machines without the CLI's deps)
    import sys

    _parser = argparse.ArgumentParser(prog="claims")
    register(_parser.add_subparsers())
    _args = _parser.parse_args(["claims", *sys.argv[1:]])
    raise SystemExit(_args.func(_args))
