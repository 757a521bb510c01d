"""Results of one run: ``<out-dir>/<run-name>/`` with config.json, metrics.jsonl, summary.json and plots.

metrics.jsonl has one line per evaluation with the fields in :data:`METRIC_FIELDS`; bits are cumulative means
over nodes of 8 x the encoded length of the peer-to-peer messages each node sent / received (FedAvg: dense
model bytes each way). One line per evaluation goes to the terminal. ``status.json`` (:mod:`progress`) holds the
rounds done of the rounds planned, elapsed time and the estimate of what is left; the ServerApp updates it every
round, the in-process loop on every evaluation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

METRIC_FIELDS = (
    "round",
    "epoch",
    "acc_consensus",
    "acc_node_mean",
    "acc_node_min",
    "loss",
    "consensus_distance",
    "bits_sent_per_node",
    "bits_received_per_node",
    "wall_s",
)


def run_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg.out_dir) / cfg.run_name


def command_line() -> str:
    return os.environ.get("SPARSEPUSH_COMMAND") or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


class Recorder:
    """Writes the files of one run as it goes."""

    def __init__(self, cfg: dict[str, Any], echo=print) -> None:
        self.cfg = cfg
        self.dir = run_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.rows: list[dict[str, Any]] = []
        self.echo = echo
        (self.dir / "config.json").write_text(json.dumps(cfg.as_dict(), indent=2, sort_keys=True) + "\n")
        (self.dir / "metrics.jsonl").write_text("")
        from flower_sparsepush.run.config import total_rounds
        from flower_sparsepush.run.progress import STATUS_FILE, Progress

        self.progress = Progress(
            total_rounds(cfg), self.dir / STATUS_FILE, f"[{cfg.run_name}]", unit="rounds", min_interval=10.0
        )

    def log(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {k: row[k] for k in METRIC_FIELDS if k in row} | {k: v for k, v in row.items() if k not in METRIC_FIELDS}
        row.setdefault("wall_s", round(time.time() - self.t0, 3))
        missing = [k for k in METRIC_FIELDS if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.echo:
            self.echo(
                f"[{self.cfg.strategy}] round {row['round']:>5}/{self.cfg.num_rounds} epoch {row['epoch']:6.2f} "
                f"acc {row['acc_consensus']:.4f} (nodes mean {row['acc_node_mean']:.4f} min {row['acc_node_min']:.4f}) "
                f"loss {row['loss']:.4f} dist {row['consensus_distance']:.3g} "
                f"sent {row['bits_sent_per_node'] / 8e6:.3f} MB/node  {row['wall_s']:.1f}s",
                flush=True,
            )
        self.progress.update(int(row["round"]), f"acc {row['acc_consensus']:.4f}")  # after the row's own line
        return row

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        last = self.rows[-1] if self.rows else {}
        summary = {
            "run_name": self.cfg.run_name,
            "strategy": self.cfg.strategy,
            "command": command_line(),
            "final": last,
            "best_acc_consensus": max((r["acc_consensus"] for r in self.rows), default=None),
            "wall_s": round(time.time() - self.t0, 3),
            **(extra or {}),
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.progress.close()
        if self.rows:
            plot(self.rows, self.dir / "accuracy.png", self.cfg.run_name)
        return summary


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Consensus and mean node accuracy vs round and vs megabits sent per node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rnd = [r["round"] for r in rows]
    mbits = [r["bits_sent_per_node"] / 1e6 for r in rows]
    for ax, xs, label in ((axes[0], rnd, "round"), (axes[1], mbits, "Mbit sent per node")):
        ax.plot(xs, [r["acc_consensus"] for r in rows], "o-", label="consensus model")
        ax.plot(xs, [r["acc_node_mean"] for r in rows], "s--", label="node mean")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
