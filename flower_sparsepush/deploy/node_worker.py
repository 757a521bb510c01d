"""The node worker: one long-lived process next to a SuperNode that holds the node's data, model and state.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message on a SuperNode (import torch and flwr,
rebuild data and model: seconds per message). The worker imports once and runs every message of its SuperNode with
the same handlers as the in-process ClientApp (node_handlers.NodeHandlers, through client_app.make_client_app): the
node store keeps the node's state in the same files (so a restarted SuperNode or worker continues), and the
per-process caches (validated config, ``get_setup``'s data and model, the store's last state) survive from one
message to the next. Two modes:

- executor (``python -m flower_sparsepush.deploy.node_worker --runtime-api HOST:PORT``): the SuperNode runs with
  ``--isolation process`` and the worker acquires its tasks on its runtime API and runs them in this process
  (node_executor.py): no process per message.
- link (``python -m flower_sparsepush.deploy.node_worker --socket PATH``): Flower's SuperExec starts a ClientApp
  process per message, a thin torch-free one (client_app.py) that forwards the message to this worker over the worker
  link (worker_link.py: a Unix domain socket in a folder only this user can enter, removed on exit), one message at a
  time.

``sparsepush node --superlink HOST:PORT --partition-id P --num-partitions N [--insecure] [--mode M] [-- ARGS]``
starts the worker and ``flower-supernode`` together; a worker that dies is started again, a SuperNode that exits
stops the worker and ends the command with its exit code; SIGTERM or Ctrl-C stops both, by PID. Each child also gets
SIGTERM from the kernel if this command dies (PR_SET_PDEATHSIG).

Each message is logged on stderr with the time its parts took in the worker.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from flower_sparsepush.flower import worker_link

RESTARTS = 5  # a worker that dies this many times within RESTART_WINDOW s stops the node
RESTART_WINDOW = 120.0
SUPEREXEC_POLL = "0.02"  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL for the SuperNode's SuperExec (Flower's default: 1 s)


def _log(text: str) -> None:
    print(f"[node-worker {os.getpid()}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the worker


def serve_link(path: str) -> None:
    """Serve the messages forwarded over the worker link, the Unix socket ``path``, until SIGTERM/SIGINT."""
    t0 = time.perf_counter()
    from flower_sparsepush.flower.node_handlers import NodeHandlers  # torch, flwr, the training code: once

    handlers: dict[str, NodeHandlers] = {}
    _log(f"imports took {time.perf_counter() - t0:.2f} s")

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            try:
                parts = worker_link.recv_parts(sock, 3)
            except ConnectionError:
                return
            t1 = time.perf_counter()
            try:
                kind, content, context, run_config, age = worker_link.decode_request(parts)
                key = repr(sorted(run_config.items())) if run_config is not None else ""
                h = handlers.setdefault(key, NodeHandlers(run_config))
                t2 = time.perf_counter()
                reply = h.handle(kind, content, context)
                t3 = time.perf_counter()
                out = worker_link.encode_reply(reply, context.state)
            except Exception as err:  # noqa: BLE001 - forward() raises it in the ClientApp, as the handler would
                _log(traceback.format_exc())
                worker_link.send_parts(sock, worker_link.encode_reply(None, None, f"{err.__class__.__name__}: {err}"))
                return
            t4 = time.perf_counter()
            worker_link.send_parts(sock, out)
            _log(
                f"{kind} node {context.node_config.get('partition-id')}: handler {1e3 * (t3 - t2):.0f} ms, "
                f"decode {1e3 * (t2 - t1):.1f} ms, encode {1e3 * (t4 - t3):.1f} ms; its ClientApp process had "
                f"started {age:.2f} s before"
            )

    if os.path.exists(path):
        os.unlink(path)  # a socket left by a worker that was killed
    server = socketserver.UnixStreamServer(path, Handler)
    os.chmod(path, 0o600)

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _log(f"listening on {path}")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def serve_executor(runtime_address: str, claim_file: str | None = None) -> None:
    """Acquire and run the SuperNode's ClientApp tasks in this process until SIGTERM/SIGINT (node_executor.py); the
    task held is recorded in ``claim_file``, for the next worker if this one is killed."""
    import threading

    t0 = time.perf_counter()
    import flower_sparsepush.flower.node_handlers  # noqa: F401 - torch, flwr, the training code: once, before any task
    from flower_sparsepush.deploy.node_executor import serve_tasks

    _log(f"imports took {time.perf_counter() - t0:.2f} s; serving the tasks of the SuperNode at {runtime_address}")
    stop = threading.Event()

    def on_signal(_signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve_tasks(runtime_address, stop, log=_log, claim_file=claim_file)


# --------------------------------------------------------------------------- worker + SuperNode


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def supernode_command(args: argparse.Namespace) -> list[str]:
    from flower_sparsepush.run.processes import venv_exe

    cmd = [venv_exe("flower-supernode"), "--superlink", args.superlink]
    if args.insecure:
        cmd.append("--insecure")
    cmd += ["--host", args.host, "--port", str(args.port)]
    cmd += ["--node-config", f"partition-id={args.partition_id} num-partitions={args.num_partitions}"]
    return cmd + list(args.supernode_args)


class NodeHost:
    """The worker and the SuperNode of one node, started and stopped together (by PID)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="sparsepush-node-")  # mode 0700: the socket and the executor's task claim
        self.socket = str(Path(args.socket).resolve()) if args.socket else os.path.join(self.tmp, "worker.sock")
        self.claim = os.path.join(self.tmp, "task.claim")  # outlives a killed worker (node_executor.TaskClaim)
        self.worker: subprocess.Popen | None = None
        self.supernode: subprocess.Popen | None = None
        self.restarts: list[float] = []

    def start_worker(self) -> None:
        cmd = [sys.executable, "-m", "flower_sparsepush.deploy.node_worker"]
        if self.args.mode == "executor":
            cmd += ["--runtime-api", f"{self.args.host}:{self.args.port}", "--claim-file", self.claim]
        else:
            cmd += ["--socket", self.socket]
        self.worker = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        _log(f"started worker {self.worker.pid}: {shlex.join(cmd)}")

    def start_supernode(self) -> None:
        env = dict(os.environ)
        cmd = supernode_command(self.args)
        if self.args.mode == "executor":  # the worker acquires the tasks: no SuperExec, no process per message
            cmd += ["--isolation", "process"]
        else:  # Flower's SuperExec starts a ClientApp per message, which forwards it over the worker link
            env[worker_link.ENV] = self.socket
            env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL)
        if self.args.supernode_poll:  # Flower's hard-coded 3 s idle wait, capped (supernode_poll.py)
            cmd = [
                sys.executable,
                "-m",
                "flower_sparsepush.deploy.supernode_poll",
                str(self.args.supernode_poll),
                *cmd[1:],
            ]
        self.supernode = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        _log(f"started SuperNode {self.supernode.pid}: {shlex.join(cmd)}")

    def run(self) -> int:
        self.start_worker()
        self.start_supernode()
        while True:
            rc = self.supernode.poll()
            if rc is not None:
                _log(f"SuperNode exited with code {rc}; stopping the worker")
                return rc
            wrc = self.worker.poll()
            if wrc is not None:
                now = time.time()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
                if len(self.restarts) > RESTARTS:
                    _log(f"worker exited ({wrc}) {len(self.restarts)} times in {RESTART_WINDOW:.0f} s: giving up")
                    return 1
                _log(f"worker exited with code {wrc}; starting it again (node state is in the node store)")
                self.start_worker()
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        procs = [p for p in (self.supernode, self.worker) if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.time() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self.tmp:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


def cmd_node(args: argparse.Namespace) -> int:
    if args.supernode_args and args.supernode_args[0] == "--":
        args.supernode_args = args.supernode_args[1:]
    if not 0 <= args.partition_id < args.num_partitions:
        raise ValueError(f"--partition-id must be in [0, {args.num_partitions}), got {args.partition_id}")
    host = NodeHost(args)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also where SIGINT was ignored (a background job of a script)
    try:
        return host.run()
    except KeyboardInterrupt:
        return 130
    finally:
        host.stop()


def register(subparsers) -> None:
    """Add ``node`` to the ``sparsepush`` CLI."""
    p = subparsers.add_parser(
        "node",
        help="one SuperNode and its long-lived node worker (Deployment Engine); stops both on exit",
        usage="%(prog)s [-h] --superlink HOST:PORT --partition-id P --num-partitions N [--insecure] [--mode M] "
        "[--port Q] [--host H] [--supernode-poll S] [--socket PATH] [-- FLOWER-SUPERNODE FLAGS]",
        description="Start flower-supernode with a node worker that keeps the node's data, model and state in one "
        "process and runs the node's messages (docs/deployment.md). Arguments after -- go to flower-supernode (TLS: "
        "--root-certificates CA; authentication: --auth-supernode-private-key KEY).",
    )
    p.add_argument(
        "--superlink", required=True, help="the SuperLink's Fleet API address, HOST:PORT (required; no default)"
    )
    p.add_argument(
        "--partition-id",
        type=int,
        required=True,
        help="this node's partition, the push-sum node id (required; no default)",
    )
    p.add_argument(
        "--num-partitions",
        type=int,
        required=True,
        help="number of nodes in the run, = num-nodes (required; no default)",
    )
    p.add_argument("--insecure", action="store_true", help="no TLS to the SuperLink (loopback/trusted network)")
    p.add_argument("--host", default="127.0.0.1", help="address of the SuperNode's local runtime API")
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's runtime API port (one per SuperNode)")
    p.add_argument(
        "--mode",
        choices=("executor", "link"),
        default="executor",
        help="executor: the worker runs the SuperNode's tasks itself (SuperNode --isolation process, no process per "
        "message); link: Flower's SuperExec starts a torch-free ClientApp per message that forwards it to the worker "
        "over the worker link",
    )
    p.add_argument(
        "--supernode-poll",
        type=float,
        default=0.0,
        help="cap the SuperNode's hard-coded idle waits (3 s, 0.5 s) at this many seconds (0: Flower's; "
        "patches Flower 1.42 internals, see supernode_poll.py)",
    )
    p.add_argument("--socket", default=None, help="the worker's Unix socket (default: in a private temporary folder)")
    p.add_argument("supernode_args", nargs=argparse.REMAINDER, help="-- then flags passed to flower-supernode")
    p.set_defaults(func=cmd_node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the node worker alone (sparsepush node starts it)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--socket", help="link mode: the worker link's Unix socket path to listen on")
    how.add_argument("--runtime-api", help="executor mode: the SuperNode's runtime API address, HOST:PORT")
    parser.add_argument("--claim-file", help="executor mode: where the task held is recorded for the next worker")
    args = parser.parse_args(argv)
    try:
        if args.runtime_api:
            serve_executor(args.runtime_api, args.claim_file)
        else:
            serve_link(args.socket)
    except SystemExit as stop:
        return int(stop.code or 0) if isinstance(stop.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
