"""The same ServerApp/ClientApp on Flower's Deployment Engine: one SuperLink and N SuperNodes on loopback.

``sparsepush deploy-local`` (and :class:`LocalDeployment`) starts, all on 127.0.0.1 and on ports the OS reports free:

- ``flower-superlink --insecure --isolation subprocess --host 127.0.0.1 --port P
  --disable-runtime-dependency-installation`` (no ``--simulation``: the Deployment Engine);
- per node i, ``flower-supernode --insecure --superlink 127.0.0.1:P --port Q_i
  --node-config "partition-id=i num-partitions=N"`` (each SuperNode needs its own runtime port on one host);
- ``flwr run <project> sparsepush --stream --run-config ...`` with a temporary ``$FLWR_HOME/config.toml`` holding
  ``[superlink.sparsepush] address = "127.0.0.1:P" insecure = true``.

Every process is started in its own session and remembered by PID. At the end, also after errors, Ctrl-C or a
timeout, each started process and every descendant found under it in /proc (the SuperExec, ServerApp and ClientApp
processes Flower spawns) gets SIGTERM, then SIGKILL after a grace period; :meth:`LocalDeployment.stop` returns only
when all of them are gone and :attr:`LocalDeployment.seen_pids` lists them for checking. Nothing is killed by name.

Results are written by the ServerApp exactly as in a simulation run (config.json, metrics.jsonl, summary.json,
accuracy.png in ``<out-dir>/<run-name>/``); the process logs go to a separate log folder (a temporary one unless
``--log-dir`` is given), which is kept and named when the run fails. See docs/deployment.md for real deployments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flower_sparsepush.flower.launch import (
    PROJECT_DIR,
    add_run_command,
    cfg_from_args,
    checked_config,
    quiet_env,
    record_command,
)
from flower_sparsepush.run.config import KEYS, validate
from flower_sparsepush.run.processes import (
    descendants,
    flwr_run_command,
    free_port,
    pid_alive,
    port_open,
    signal_pids,
    superlink_command,
    superlink_connection,
    venv_exe,
    wait_for_port,
)
from flower_sparsepush.run.progress import follow_run
from flower_sparsepush.run.results import run_dir

FEDERATION = "sparsepush"
# deploy-local's defaults (a short synthetic Sparse-Push run); every run-config key can still be overridden
DEPLOY_DEFAULTS = {
    "strategy": "sparse-push",
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 4,
    "num-rounds": 3,
    "eval-every": 1,
    "compressor": "topk:0.1+q:4",
    "gamma": 0.3,
    "local-steps": 2,
    "batch-size": 16,
    "out-dir": "runs/deploy",
    "run-name": "sparse-push-deploy",
}
SUPERNODE_POLL = 0.1  # deploy-local's cap on the SuperNodes' idle waits (Flower's: 3 s; supernode_poll.py)
DEPLOY_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def run_config_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``--run-config`` overrides for ``cfg``: every key pyproject.toml declares, plus any other key whose value
    differs from its default (``flwr run`` refuses keys that pyproject's [tool.flwr.app.config] lacks)."""
    import tomllib

    declared = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {k: v for k, v in cfg.items() if k in declared or k not in KEYS or v != KEYS[k].default}


class DeploymentError(RuntimeError):
    """A SuperLink/SuperNode that failed to start or died, a failed ``flwr run``, or a timeout."""


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on loopback (insecure), a FLWR_HOME pointing at them, and cleanup.

    Use as a context manager; :meth:`run` submits one run with ``flwr run``. ``seen_pids`` holds every PID this
    object started or found below one it started; after :meth:`stop` none of them is alive.
    """

    def __init__(
        self,
        num_nodes: int,
        log_dir: str | os.PathLike | None = None,
        port: int = 0,
        start_timeout: float = 60.0,
        workers: bool = True,
        worker_mode: str = "executor",
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.num_nodes = num_nodes
        self.workers = workers  # each SuperNode with a long-lived node worker (`sparsepush node`, node_worker.py)
        self.worker_mode = worker_mode  # `sparsepush node --mode`: executor (no process per message) or link
        self.home = tempfile.mkdtemp(prefix="sparsepush-deploy-")
        self.log_dir = Path(log_dir) if log_dir else Path(self.home, "logs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.node_ports: list[int] = []
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen] = {}  # name -> process, in start order
        self.seen_pids: set[int] = set()
        self._logs: list[Any] = []

    # ------------------------------------------------------------------ start / stop

    def _env(self) -> dict[str, str]:
        return os.environ | DEPLOY_ENV | {"FLWR_HOME": self.home}

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        self._logs.append(log)
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(),
            cwd=self.home,
            start_new_session=True,
        )
        self.procs[name] = proc
        self.seen_pids.add(proc.pid)
        return proc

    def start(self) -> LocalDeployment:
        if not 0 < self.port < 65536:
            raise DeploymentError(f"port {self.port} is not a TCP port (1-65535; --port 0 picks a free one)")
        if port_open(self.port):  # else our SuperLink fails to bind while the SuperNodes reach the other process
            raise DeploymentError(
                f"127.0.0.1:{self.port} is already in use by another process (a SuperLink left from an earlier run?); "
                "choose another --port, or --port 0 for a free one"
            )
        quiet_env()
        Path(self.home, "config.toml").write_text(superlink_connection(FEDERATION, self.port))
        superlink = self._spawn("superlink", superlink_command(self.port, simulation=False))
        end = time.time() + self.start_timeout

        def superlink_alive() -> None:
            if superlink.poll() is not None:
                raise DeploymentError(f"flower-superlink exited ({superlink.returncode}); {self.tail('superlink')}")

        if not wait_for_port(self.port, end, superlink_alive):
            raise DeploymentError(f"flower-superlink did not open port {self.port} in {self.start_timeout:.0f} s")
        for i in range(self.num_nodes):
            self.node_ports.append(self._spawn_supernode(i))
        # each SuperNode opens its runtime port once it is up; the ServerApp itself waits for all to register
        for i, port in enumerate(self.node_ports):
            if not wait_for_port(port, end, self.check_alive):
                raise DeploymentError(
                    f"supernode-{i} did not open port {port} in {self.start_timeout:.0f} s; {self.tail(f'supernode-{i}')}"
                )
        return self

    def _spawn_supernode(self, i: int) -> int:
        """Start SuperNode ``i`` (partition i) on a free ClientAppIo port; returns the port."""
        port = free_port()
        while port == self.port or port in self.node_ports:
            port = free_port()
        cmd = self._node_command(i, port) if self.workers else self._supernode_command(i, port)
        self._spawn(f"supernode-{i}", cmd)
        return port

    def _node_command(self, i: int, port: int) -> list[str]:
        """``sparsepush node``: SuperNode ``i`` and its node worker, stopped together."""
        socket = str(Path(self.home, f"worker-{i}.sock"))
        cmd = [sys.executable, "-m", "flower_sparsepush.cli", "node", "--insecure"]
        cmd += ["--superlink", f"127.0.0.1:{self.port}", "--port", str(port)]
        cmd += ["--partition-id", str(i), "--num-partitions", str(self.num_nodes)]
        return cmd + ["--socket", socket, "--supernode-poll", str(SUPERNODE_POLL), "--mode", self.worker_mode]

    def _supernode_command(self, i: int, port: int) -> list[str]:
        """A plain ``flower-supernode`` for partition ``i``: every message in a fresh ClientApp process."""
        cmd = [venv_exe("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}"]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        return cmd + ["--node-config", f"partition-id={i} num-partitions={self.num_nodes}"]

    def restart_supernode(self, i: int) -> None:
        """Kill SuperNode ``i`` (SIGKILL, its whole process tree, as a crash would) and start it again with the same
        partition. It reconnects with a new node id; its nodes' state is in the node store (docs/node-store.md)."""
        name = f"supernode-{i}"
        old = self.procs[name]
        tree = [old.pid, *descendants(old.pid)]
        self.seen_pids.update(tree)
        signal_pids(tree, signal.SIGKILL)
        old.wait(timeout=10)
        self.procs.pop(name)
        self.node_ports[i] = port = self._spawn_supernode(i)
        if not wait_for_port(port, time.time() + self.start_timeout):
            raise DeploymentError(f"{name} did not come back on port {port}; {self.tail(name)}")

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def check_alive(self) -> None:
        """Raise :class:`DeploymentError` if the SuperLink or a SuperNode has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DeploymentError(f"{name} exited with code {proc.returncode}; {self.tail(name)}")

    def collect_pids(self) -> set[int]:
        """Add the current descendants of every started process to ``seen_pids``; returns ``seen_pids``."""
        for proc in self.procs.values():
            self.seen_pids.update(descendants(proc.pid))
        return self.seen_pids

    def alive_pids(self) -> list[int]:
        return sorted(p for p in self.seen_pids if pid_alive(p))

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every started process tree (its session and every descendant), SIGKILL what is left after
        ``grace`` seconds, reap our children; returns when none of ``seen_pids`` is alive."""
        self.collect_pids()
        for proc in self.procs.values():  # the sessions we created (each started process leads its own)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        signal_pids(self.alive_pids(), signal.SIGTERM)  # SuperExec & co. start their own sessions: by PID
        end = time.time() + grace
        while time.time() < end:
            for proc in self.procs.values():
                proc.poll()  # reap
            self.collect_pids()  # catch a process spawned while we were stopping
            if not self.alive_pids():
                break
            time.sleep(0.2)
        signal_pids(self.alive_pids(), signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        end = time.time() + 5
        while self.alive_pids() and time.time() < end:
            time.sleep(0.1)
        for log in self._logs:
            log.close()
        self._logs.clear()

    # ------------------------------------------------------------------ run

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {path})"
        return f"last lines of {path}:\n" + "\n".join(text)

    def run(self, cfg: dict[str, Any], timeout: float | None = None, stream_to=None, on_poll=None) -> int:
        """``flwr run <project> sparsepush --stream --run-config ...``; returns its exit code.

        While it runs, the SuperLink and SuperNodes are watched: if one exits, or ``timeout`` passes, ``flwr run`` is
        stopped and :class:`DeploymentError` is raised (the caller's ``stop()`` then ends the rest). ``on_poll(self,
        rounds_done)`` is called every half second before the checks (tests restart a SuperNode from it).
        """
        cmd = flwr_run_command(PROJECT_DIR, FEDERATION, run_config_overrides(cfg))
        env = self._env() | {"SPARSEPUSH_COMMAND": os.environ.get("SPARSEPUSH_COMMAND", "")}
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=PROJECT_DIR,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=stream_to,
            stderr=subprocess.STDOUT if stream_to else None,
        )
        self.procs["flwr-run"] = proc
        self.seen_pids.add(proc.pid)
        end = None if timeout is None else time.time() + timeout
        follower = follow_run(cfg)  # rounds done, written by the ServerApp every round
        try:
            while proc.poll() is None:
                status = follower.poll() or {}
                if on_poll is not None:
                    on_poll(self, int(status.get("done", 0)))
                self.collect_pids()
                for name, p in self.procs.items():
                    if name != "flwr-run" and p.poll() is not None:
                        raise DeploymentError(
                            f"{name} exited with code {p.returncode} during the run; {self.tail(name)}"
                        )
                if end is not None and time.time() > end:
                    raise DeploymentError(f"flwr run did not finish in {timeout:.0f} s")
                time.sleep(0.5)
            follower.poll()
            return proc.returncode
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            raise


def deploy_run(
    raw_cfg: dict[str, Any],
    log_dir: str | None = None,
    port: int = 0,
    timeout: float | None = 1800.0,
    stream_to=None,
    workers: bool = True,
    worker_mode: str = "executor",
) -> tuple[Path, LocalDeployment]:
    """Validate ``raw_cfg``, start a SuperLink and ``num-nodes`` SuperNodes, run it, stop everything.

    Returns (results folder, the stopped deployment: ``seen_pids``, ``log_dir``). Raises :class:`DeploymentError`
    when the run fails; every process is stopped in either case.
    """
    cfg = validate(raw_cfg)
    cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).resolve()))
    out = run_dir(cfg)
    stale = out / "summary.json"
    if stale.exists():
        stale.unlink()  # so that a failed run is never mistaken for a finished one
    dep = LocalDeployment(cfg.num_nodes, log_dir=log_dir, port=port, workers=workers, worker_mode=worker_mode)
    with dep:
        rc = dep.run(cfg.as_dict(), timeout=timeout, stream_to=stream_to)
    if rc != 0 or not (out / "summary.json").exists():
        raise DeploymentError(
            f"flwr run failed (exit {rc}); no summary.json in {out}. Logs: {dep.log_dir}\n{dep.tail('superlink', 30)}"
        )
    return out, dep


# --------------------------------------------------------------------------- CLI


def cmd_deploy_local(args: argparse.Namespace) -> int:
    record_command()
    given = cfg_from_args(args)
    raw = ({} if given.get("preset") else dict(DEPLOY_DEFAULTS)) | given  # a preset brings its own settings
    raw["num-nodes"], raw["num-rounds"] = args.nodes, args.rounds
    cfg = checked_config(raw, flower_preflight=True)  # before any SuperLink or SuperNode starts
    if cfg is None:
        return 2
    t0 = time.time()
    try:
        out, dep = deploy_run(
            cfg,
            log_dir=args.log_dir,
            port=args.port,
            timeout=args.timeout or None,
            workers=not args.no_workers,
            worker_mode=args.worker_mode,
        )
    except DeploymentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"results: {out}\nprocess logs: {dep.log_dir}\n"
        f"{len(dep.seen_pids)} processes started and stopped; {time.time() - t0:.0f}s in all"
    )
    return 0


def register(subparsers) -> None:
    """Add ``deploy-local`` to the ``sparsepush`` CLI."""
    p = add_run_command(
        subparsers,
        "deploy-local",
        cmd_deploy_local,
        help="a SuperLink and N SuperNodes on 127.0.0.1 (Flower Deployment Engine), one `flwr run`, then stop all",
        usage="%(prog)s [-h] [--nodes N] [--rounds R] [--port P] [--log-dir DIR] [--timeout S] [--KEY V ...]",
        description="The same apps on Flower's Deployment Engine on loopback; every started process is stopped by "
        "PID at the end. Run-config keys are options (--key value); the defaults shown are deploy-local's.",
        defaults=DEPLOY_DEFAULTS,
        skip=("num-nodes", "num-rounds"),
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=DEPLOY_DEFAULTS["num-nodes"],
        help=f"number of SuperNodes (>= 2; run-config num-nodes); default {DEPLOY_DEFAULTS['num-nodes']}",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=DEPLOY_DEFAULTS["num-rounds"],
        help=f"gossip rounds (run-config num-rounds); default {DEPLOY_DEFAULTS['num-rounds']}",
    )
    p.add_argument("--port", type=int, default=0, help="SuperLink port on 127.0.0.1 (0: a free one)")
    p.add_argument("--log-dir", default=None, help="folder for the process logs (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is stopped (0: none)")
    p.add_argument(
        "--no-workers",
        action="store_true",
        help="plain SuperNodes: every message runs in a fresh ClientApp process (no node worker)",
    )
    p.add_argument(
        "--worker-mode",
        choices=("executor", "link"),
        default="executor",
        help="executor: each worker runs its SuperNode's tasks (no process per message); link: a torch-free "
        "ClientApp process per message forwards it to the worker over the worker link",
    )
