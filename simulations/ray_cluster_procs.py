"""The processes of the two-node Ray cluster (:mod:`ray_cluster`): free ports, the ``ray start`` commands, starting
the head and the worker node, and finding and stopping by PID everything started here (each carries an environment
marker that Ray's daemons, agents and workers inherit)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from flower_sparsepush.run.processes import descendants, free_port, pid_alive, venv_exe

MARKER = "SPARSEPUSH_RAY_CLUSTER"
NODE_STORE_ENV = "SPARSEPUSH_NODE_STORE"  # store.ENV: where the nodes' state files go when node-store is ''
QUIET_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
HEAD_PORT_NAMES = (
    "port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
WORKER_PORT_NAMES = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def log(msg: str) -> None:
    print(f"[ray-cluster {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- commands and ports


def pick_ports(names: tuple[str, ...], taken: set[int] | None = None) -> dict[str, int]:
    """One distinct free port per name (not in ``taken``, which is updated)."""
    taken = set() if taken is None else taken
    out: dict[str, int] = {}
    for name in names:
        p = free_port()
        while p in taken:
            p = free_port()
        taken.add(p)
        out[name] = p
    return out


def node_commands(
    temp_dir: str, head_ports: dict[str, int], worker_ports: dict[str, int], object_store_bytes: int = 200_000_000
) -> tuple[list[str], list[str]]:
    """``ray start`` for the head and for one worker node on the same host: 1 CPU each, the dashboard off, every port
    explicit (two nodes on one host must not share any), one private temp dir. The worker's ``--address`` is a
    placeholder ``{address}``: the head's address is known once it runs (its ``ray_current_cluster`` file)."""
    ray = venv_exe("ray")
    common = ["--num-cpus=1", f"--object-store-memory={object_store_bytes}", "--disable-usage-stats"]
    head = [ray, "start", "--head", f"--temp-dir={temp_dir}", "--include-dashboard=false", *common]
    head += [f"--{k}={v}" for k, v in head_ports.items()]
    worker = [ray, "start", "--address={address}", f"--temp-dir={temp_dir}", *common]
    worker += [f"--{k}={v}" for k, v in worker_ports.items()]
    return head, worker


# --------------------------------------------------------------------------- processes started here


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def marked_pids(token: str, temp_dir: str | None = None) -> list[int]:
    """Live PIDs whose environment carries ``MARKER=token`` or whose command line names ``temp_dir``, with all their
    descendants (Ray renames its agents and workers, so the command line alone is not enough)."""
    marker = f"{MARKER}={token}".encode()
    me = os.getpid()
    found: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        pid = int(d.name)
        hit = _environ_has(pid, marker)
        if not hit and temp_dir:
            try:
                hit = temp_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                hit = False
        if hit:
            found.add(pid)
    for pid in list(found):
        found.update(descendants(pid))
    found.discard(me)
    return sorted(p for p in found if pid_alive(p))


def signal_pids(pids, sig=signal.SIGTERM) -> None:
    """Send ``sig`` to each PID; one that is gone or not ours is passed over."""
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_pids(pids: list[int], grace: float = 3.0) -> list[int]:
    """SIGTERM, up to ``grace`` seconds, then SIGKILL; returns the PIDs still alive after that (should be none)."""
    signal_pids(pids, signal.SIGTERM)
    end = time.time() + grace
    while time.time() < end and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if pid_alive(p)]
    signal_pids(left, signal.SIGKILL)
    end = time.time() + 5
    while time.time() < end and any(pid_alive(p) for p in left):
        time.sleep(0.1)
    return [p for p in left if pid_alive(p)]


class Processes:
    """Everything this script starts carries one marker; :meth:`cleanup` stops all of it by PID."""

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.temp_dir = tempfile.mkdtemp(prefix="sprc-")  # short: Ray's socket paths must stay under 107 bytes
        self.leftover: list[int] = []
        self.stopped = 0

    def env(self, **extra: str) -> dict[str, str]:
        """This environment without RAY_ADDRESS, with the marker, and the node store (the nodes' state files,
        ``store.py``) in the temp dir: both Ray nodes share this machine's disk, and nothing stays in ~/.cache."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | QUIET_ENV | {MARKER: self.token}
        env[NODE_STORE_ENV] = str(Path(self.temp_dir) / "node-store")
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env | extra

    def cleanup(self, keep_temp: bool = False, grace: float = 3.0) -> list[int]:
        pids = marked_pids(self.token, self.temp_dir)
        self.stopped += len(pids)
        stop_pids(pids, grace=grace)
        time.sleep(0.5)
        self.leftover = marked_pids(self.token, self.temp_dir)  # also anything that started meanwhile
        if self.leftover:
            stop_pids(self.leftover, grace=1.0)
            self.leftover = marked_pids(self.token, self.temp_dir)
        if not keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return self.leftover


def start_cluster(procs: Processes, timeout: float = 90.0) -> dict[str, Any]:
    """Head and one worker node; returns the address, the two ``ray start`` commands and the start-up seconds."""
    taken: set[int] = set()
    head_ports = pick_ports(HEAD_PORT_NAMES, taken)
    worker_ports = pick_ports(WORKER_PORT_NAMES, taken)
    head_cmd, worker_tmpl = node_commands(procs.temp_dir, head_ports, worker_ports)
    t0 = time.time()
    env = procs.env()
    log(f"starting the head node: {shlex.join(head_cmd[1:])}")
    _ray_start(head_cmd, env, Path(procs.temp_dir) / "head.log", timeout)
    address = (Path(procs.temp_dir) / "ray_current_cluster").read_text().strip()
    worker_cmd = [a.replace("{address}", address) for a in worker_tmpl]
    log(f"head at {address}; starting the worker node: {shlex.join(worker_cmd[1:])}")
    _ray_start(worker_cmd, env, Path(procs.temp_dir) / "worker.log", timeout)
    return {
        "address": address,
        "head_command": shlex.join(["ray", *head_cmd[1:]]),
        "worker_command": shlex.join(["ray", *worker_cmd[1:]]),
        "startup_s": round(time.time() - t0, 2),
    }


def _ray_start(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> None:
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0:
        tail = log_path.read_text()[-1500:]
        raise RuntimeError(f"`{shlex.join(cmd[1:3])} ...` exited with {rc}:\n{tail}")
