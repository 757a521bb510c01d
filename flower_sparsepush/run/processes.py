"""Helpers for the processes this project starts (SuperLink, SuperNodes, ``flwr run``, benchmark workers): free
ports, command lines, and process trees, so that everything started is stopped by PID."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, deadline: float, check: Callable[[], None] | None = None) -> bool:
    """Wait until something listens on 127.0.0.1:``port``; False once ``deadline`` (a ``time.time()``) has passed.
    ``check()`` runs between tries and raises to give up early (the process that should open the port exited)."""
    while not port_open(port):
        if check is not None:
            check()
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


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


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is neither a zombie nor dead (this machine's PID 1 does not reap orphans, so
    dead daemons linger as zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def signal_pids(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each PID in turn, passing over those already gone."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


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


def toml_value(v: Any) -> str:
    """``v`` as a TOML value for ``flwr run --run-config``: true/false, a number, or a quoted string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def flwr_run_command(project: Path, federation: str, run_config: dict[str, Any], *extra: str) -> list[str]:
    """``flwr run PROJECT FEDERATION --stream --run-config "key=value ..." EXTRA...`` (values as TOML)."""
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    return [venv_exe("flwr"), "run", str(project), federation, "--stream", "--run-config", overrides, *extra]
