"""Helpers for the processes this project starts (SuperLink, SuperNodes, benchmark workers): free ports and
process trees, so that everything started is stopped by PID."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (Linux /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def port_open(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def venv_exe(name: str) -> str:
    """The console script ``name`` next to this Python (the venv's), else ``name`` as found on PATH."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def superlink_command(port: int, simulation: bool) -> list[str]:
    """An offline, insecure loopback ``flower-superlink`` on ``port`` (with the simulation engine, or for
    SuperNodes of the Deployment Engine), that installs no runtime dependencies."""
    sim = ["--simulation"] if simulation else []
    return [
        venv_exe("flower-superlink"),
        "--insecure",
        *sim,
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]


def superlink_connection(name: str, port: int) -> str:
    """The ``$FLWR_HOME/config.toml`` entry that points ``flwr run . NAME`` at the local SuperLink."""
    return f'[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
