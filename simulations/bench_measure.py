"""What the benchmark measures with: sample statistics, timing, the machine, and one measurement in a subprocess
with the memory of its whole process tree sampled (:func:`run_worker`, which runs :mod:`bench_worker`)."""

from __future__ import annotations

import json
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

from flower_sparsepush.simulations.ray_cluster_procs import QUIET_ENV, signal_pids

from flower_sparsepush.run.processes import descendants

GIB = 2**30


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


def bench_command(fallback: str) -> str:
    """The command line to record: this one when it is ``sparsepush bench ...``, else ``fallback``."""
    return shlex.join(["sparsepush", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else fallback


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


def _reap(sampler: TreeSampler, root: int) -> None:
    """Leave nothing behind: Ray's daemons of a run are among the PIDs the sampler saw (all but ``root``)."""
    time.sleep(1.0)
    left = [p for p in sampler.seen if p != root and Path(f"/proc/{p}").exists()]
    signal_pids(left)
    time.sleep(0.5)
    signal_pids([p for p in left if Path(f"/proc/{p}").exists()], signal.SIGKILL)


def run_worker(spec: dict[str, Any], mem_limit_gib: float, timeout: float) -> dict[str, Any]:
    """Run one measurement (:func:`bench_worker.worker`) in a subprocess, sampling its process tree's memory."""
    with tempfile.TemporaryDirectory(prefix="sparsepush-bench-") as tmp:
        out_path = Path(tmp) / "out.json"
        spec = spec | {"out_dir": tmp}
        env = os.environ | QUIET_ENV
        cmd = [sys.executable, "-m", "flower_sparsepush.simulations.bench_worker", json.dumps(spec), str(out_path)]
        t0 = time.time()
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log: list[str] = []
        reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
        reader.start()

        def stop_tree() -> None:
            signal_pids([proc.pid, *descendants(proc.pid)], signal.SIGKILL)

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
            _reap(sampler, proc.pid)
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
