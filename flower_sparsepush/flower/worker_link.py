"""The worker link: the local socket between the per-message ClientApp and the node worker (node_worker.py). Imports
no torch.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message on a SuperNode. When a node worker is
configured (``$SPARSEPUSH_NODE_WORKER`` or node-config key ``node-worker``: the path of a Unix domain socket), that
process only forwards (:func:`forward`): it sends the message type, the message content and the context (run config,
node config, ``context.state``) to the worker, which holds the node's data and model and runs the same handlers as the
in-process ClientApp (node_handlers.py), and gets back the reply content and the new ``context.state``.

Wire format, both ways: a sequence of parts, each ``<uint64 length><bytes>``. Request: a JSON header
(``{"kind": ..., "run_config": ... or null}``), the content (Flower's RecordDict protobuf), the Context (protobuf).
Reply: a JSON header (``{"ok": true}`` or ``{"ok": false, "error": ...}``), the reply content, the new state (both
RecordDict protobufs).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

from flwr.app import Context, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

ENV = "SPARSEPUSH_NODE_WORKER"  # path of the worker's Unix socket, in the SuperNode's environment
NODE_CONFIG_KEY = "node-worker"  # or in --node-config "... node-worker='/path/sock'"
WAIT_ENV = "SPARSEPUSH_NODE_WORKER_WAIT"  # seconds forward() waits for a worker that is (re)starting; default 120
_LEN = struct.Struct("<Q")


class WorkerError(RuntimeError):
    """The node worker could not be reached, died during a message, or its handler failed."""


def worker_address(context: Context) -> str | None:
    """The worker's socket path for this node, or None (the ClientApp then runs the message itself)."""
    path = context.node_config.get(NODE_CONFIG_KEY) or os.environ.get(ENV)
    return str(path) if path else None


def send_parts(sock: socket.socket, parts: list[bytes]) -> None:
    sock.sendall(b"".join(_LEN.pack(len(p)) + p for p in parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        buf += chunk
    return bytes(buf)


def recv_parts(sock: socket.socket, count: int) -> list[bytes]:
    return [_recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0]) for _ in range(count)]


def encode_request(
    kind: str, content: RecordDict, context: Context, run_config: dict | None, age: float = float("nan")
) -> list[bytes]:
    head = json.dumps({"kind": kind, "run_config": run_config, "age": age}).encode()
    return [head, recorddict_to_proto(content).SerializeToString(), context_to_proto(context).SerializeToString()]


def decode_request(parts: list[bytes]) -> tuple[str, RecordDict, Context, dict | None, float]:
    head = json.loads(parts[0])
    content = recorddict_from_proto(ProtoRecordDict.FromString(parts[1]))
    context = context_from_proto(ProtoContext.FromString(parts[2]))
    return head["kind"], content, context, head["run_config"], float(head.get("age", "nan"))


def encode_reply(content: RecordDict | None, state: RecordDict | None, error: str | None = None) -> list[bytes]:
    if error is not None:
        return [json.dumps({"ok": False, "error": error}).encode(), b"", b""]
    return [
        json.dumps({"ok": True}).encode(),
        recorddict_to_proto(content).SerializeToString(),
        recorddict_to_proto(state).SerializeToString(),
    ]


def _connect(path: str, wait: float) -> socket.socket:
    """Connect to the worker, retrying while it is (re)starting (no socket yet, or nobody listening)."""
    end = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() > end:
                raise WorkerError(
                    f"no node worker listens on {path} after {wait:.0f} s ({err.__class__.__name__}); start it with "
                    f"`sparsepush node` (docs/deployment.md) or unset {ENV} to run the node in the ClientApp"
                ) from None
            time.sleep(0.05)


def process_age() -> float:
    """Seconds since this process started (Linux /proc), NaN elsewhere: what starting the ClientApp cost."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def forward(path: str, kind: str, content: RecordDict, context: Context, run_config: dict | None = None) -> RecordDict:
    """Have the worker at ``path`` handle one message: returns the reply content; ``context.state`` is updated.
    The request tells the worker how long ago this process started (the worker logs it: Flower's per-message cost)."""
    wait = float(os.environ.get(WAIT_ENV, "120"))
    age = process_age()
    with _connect(path, wait) as sock:
        send_parts(sock, encode_request(kind, content, context, run_config, age))
        try:
            head, body, state = recv_parts(sock, 3)
        except ConnectionError:
            raise WorkerError(
                f"the node worker on {path} closed the connection before replying to a {kind} message (it died?); "
                "the node misses this round, and the next message waits for the restarted worker"
            ) from None
    info = json.loads(head)
    if not info["ok"]:
        raise WorkerError(f"node worker on {path}: {info['error']}")
    new_state = recorddict_from_proto(ProtoRecordDict.FromString(state))
    for key in list(context.state.keys()):
        del context.state[key]
    for key, rec in new_state.items():
        context.state[key] = rec
    return recorddict_from_proto(ProtoRecordDict.FromString(body))
