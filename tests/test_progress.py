"""Tests for flower_sparsepush.run.progress: the status file, the estimate of the time left, the terminal line, and its
use by a run's results folder and by ``sparsepush bench``."""

from __future__ import annotations

import io
import json
import os
import types

import pytest

from flower_sparsepush.run import progress
from flower_sparsepush.run.progress import Progress, StatusFollower, format_status, read_status


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "time", c)
    return c


def test_status_file_counts_and_estimate(tmp_path, clock):
    path = tmp_path / "run" / "status.json"  # the folder is created
    p = Progress(10, path, "claims", unit="rows")
    st = read_status(path)
    assert st["done"] == 0 and st["total"] == 10 and st["eta_s"] is None and not st["finished"]
    clock.t += 20
    p.update(4, "row-4")
    st = read_status(path)
    assert (st["done"], st["total"], st["note"], st["unit"]) == (4, 10, "row-4", "rows")
    assert st["elapsed_s"] == 20.0 and st["eta_s"] == pytest.approx(6 * 20 / 4)
    assert st["pid"] == os.getpid() and st["updated"] >= st["started"]
    clock.t += 10
    p.close()
    st = read_status(path)
    assert st["finished"] and st["done"] == 4 and st["eta_s"] == 0.0
    assert not list(tmp_path.glob("run/*.tmp"))  # written through a renamed temporary file


def test_resumed_work_counts_only_this_process(tmp_path, clock):
    p = Progress(40, tmp_path / "s.json", "claims", unit="rows", initial=30)
    assert read_status(tmp_path / "s.json")["done"] == 30
    clock.t += 100
    st = p.update(32)
    assert st["eta_s"] == pytest.approx(8 * 100 / 2)  # 2 rows in 100 s here, not 32 rows in 100 s
    assert p.update(99)["done"] == 40  # clipped to the total


def test_terminal_lines_only_on_a_terminal_and_throttled(tmp_path, clock):
    quiet = io.StringIO()  # not a tty: nothing printed, the file is still written
    Progress(5, tmp_path / "a.json", "x", stream=quiet).update(1)
    assert quiet.getvalue() == "" and read_status(tmp_path / "a.json")["done"] == 1

    out = io.StringIO()
    p = Progress(100, None, "[run]", unit="rounds", stream=out, show=True, min_interval=10)
    clock.t += 5
    p.update(10, "acc 0.5")
    clock.t += 1
    p.update(11)  # within min_interval: no line
    clock.t += 10
    p.update(30)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "10/100 rounds" in lines[0] and "acc 0.5" in lines[0] and "elapsed 00:05" in lines[0]
    assert "30/100 rounds" in lines[1] and "ETA 00:37" in lines[1]  # 70 rounds at 20 rounds / 16 s
    assert lines[2].endswith("stopped")  # closed before the last round


def test_unwritable_status_file_warns_once_and_keeps_going(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = Progress(3, blocker / "status.json", "x")  # its folder would be a file
    p.update(1)
    p.close()
    err = capsys.readouterr().err
    assert err.count("cannot write the status file") == 1


def test_format_status_and_follower(tmp_path, clock):
    st = {"label": "bench", "unit": "sections", "done": 2, "total": 5, "note": "running: data", "elapsed_s": 60.0}
    assert format_status(st | {"eta_s": 90.0}).endswith("2/5 sections, elapsed 01:00, ETA 01:30  running: data")
    assert "ETA ?" in format_status(st | {"eta_s": None})
    assert format_status(st | {"done": 5, "eta_s": 0.0, "finished": True}).split("  ")[-2].endswith("finished")

    path = tmp_path / "status.json"
    path.write_text(json.dumps(st | {"eta_s": 1.0}))
    os.utime(path, (0, 0))  # a previous run's file: ignored
    out = io.StringIO()
    f = StatusFollower(path, stream=out, show=True, min_interval=0)
    assert f.poll() is None and out.getvalue() == ""
    Progress(4, path, "[run]", unit="rounds").update(1)  # another writer (here: this process)
    os.utime(path, (clock.t, clock.t))
    assert f.poll()["done"] == 1
    assert f.poll()["done"] == 1  # unchanged: printed once
    assert out.getvalue().count("1/4 rounds") == 1


def test_inprocess_run_writes_rounds_status(tmp_path):
    from flower_sparsepush.run.inprocess import train_inprocess

    cfg = {
        "dataset": "synthetic",
        "model": "logreg",
        "num-nodes": 4,
        "num-rounds": 6,
        "eval-every": 3,
        "compressor": "topk:0.5",
        "out-dir": str(tmp_path),
        "run-name": "r",
    }
    train_inprocess(cfg, echo=None)
    st = read_status(tmp_path / "r" / "status.json")
    assert (st["done"], st["total"], st["unit"], st["finished"]) == (6, 6, "rounds", True)
    assert st["label"] == "[r]" and st["note"].startswith("acc ")


def test_bench_reports_sections(tmp_path, monkeypatch):
    from flower_sparsepush.simulations import bench

    seen = []

    def fake(name):
        def run(*a, **k):
            seen.append((name, read_status(tmp_path / bench.STATUS_NAME)))
            return {}

        return run

    monkeypatch.setattr(bench, "section_codec", fake("codec"))
    monkeypatch.setattr(bench, "section_data", fake("data"))
    monkeypatch.setattr(bench, "assemble", lambda *a, **k: {})
    args = types.SimpleNamespace(
        quick=True, only="codec,data", out_dir=str(tmp_path), dataset="fashion_mnist", nodes="", local_steps=1
    )
    bench.run_bench(args)
    assert [(n, s["done"], s["total"], s["note"]) for n, s in seen] == [
        ("codec", 0, 2, "running: codec"),
        ("data", 1, 2, "running: data"),
    ]
    st = read_status(tmp_path / bench.STATUS_NAME)
    assert st["done"] == 2 and st["finished"] and st["unit"] == "sections"
    with pytest.raises(ValueError, match="unknown section 'wired'"):
        bench.run_bench(types.SimpleNamespace(**(vars(args) | {"only": "wired"})))


def test_follow_run_needs_no_run_folder(tmp_path):
    """The launchers follow a raw config too (one that flwr run will refuse): nothing to show, no error."""
    from flower_sparsepush.run.progress import follow_run

    assert follow_run({"no-such-key": 1}).poll() is None
    f = follow_run({"out-dir": str(tmp_path), "run-name": "r"})
    assert f.path == tmp_path / "r" / "status.json" and f.poll() is None
    Progress(2, f.path, "[r]").update(1)
    assert f.poll()["done"] == 1
