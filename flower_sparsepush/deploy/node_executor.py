"""The node worker as the SuperNode's executor: no process per message at all (``sparsepush node --mode executor``).

A SuperNode started with ``--isolation process`` does not start Flower's SuperExec; something else must acquire its
tasks on the SuperNode's runtime API (its ``--port``). Flower's SuperExec starts one ``flwr-clientapp`` process per
task (importing flwr each time: about 1-2 s of CPU per message). Here the long-lived worker acquires the tasks
itself and runs each the way ``flwr-clientapp`` does (``flwr/supernode/runtime/run_clientapp.py``: pull the message
and Context, call the ClientApp, push the reply, then the Context and status; a heartbeat meanwhile), with the
Flower 1.42 functions ``flwr-clientapp`` uses, calling this project's ClientApp
(``client_app.make_client_app(use_worker=False)``: the same handlers) in this process.

Differences from Flower's per-message process, to know about: the ClientApp is this installed package's, not loaded
from the run's FAB (the same code when the SuperNode does not install runtime dependencies, as everywhere in this
project); the runtime API is reached without TLS (a SuperNode's runtime API on 127.0.0.1, Flower's default); one
task at a time. Checked against Flower 1.42 only.

A worker killed while it holds a task: the task's token and, as soon as they are pulled, its Context and its message's
metadata are kept in a claim file (:class:`TaskClaim`) that outlives the worker. The next worker reads it before
acquiring anything (:func:`recover`): a task whose message it had not pulled yet is run again from there (nothing is
lost); a task whose message it had pulled is answered with an error reply and finished as failed, so the SuperNode
sends that reply, the node is a straggler for that round only (its mass is held, docs/reliability.md) and its next
message is pulled at once. Without this the SuperNode waits on the task until Flower expires its token (60 s without
a heartbeat), and a task expired before its message was pulled is never answered: the SuperNode would wait for good.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

PULL_BACKOFF = 0.02  # first retry of a message object the SuperNode has not stored yet (Flower's default: 1 s)


FAULT_ENV = "SPARSEPUSH_WORKER_FAULT"  # fault injection for tests: PARTITION:MESSAGE-TYPE:ROUND (see _inject_fault)


class TaskClaim:
    """The task a worker holds, in a file that outlives the worker (written whole, by rename): ``token``, then the
    ``context`` (a Context proto) and ``task_id`` once pulled, then the message's ``metadata`` (a Metadata proto)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None

    def write(self, **fields) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {k: (base64.b64encode(v).decode() if isinstance(v, bytes) else v) for k, v in fields.items()}
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def read(self) -> dict | None:
        """What the last worker held, or None; a claim file that cannot be read counts as none."""
        if self.path is None or not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            return {k: (base64.b64decode(v) if k in ("context", "metadata") else v) for k, v in data.items()}
        except (OSError, ValueError):
            return None

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def pull_context(task):
    """The task's Context and task id from the SuperNode's runtime API (this makes the task RUNNING)."""
    from flwr.common.serde import context_from_proto
    from flwr.proto.runtime_pb2 import PullTaskInputRequest

    got = task.PullTaskInput(PullTaskInputRequest())
    return context_from_proto(got.context), got.task_id


def _set_identity(task_id: int, context) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, context.run_id, context.node_id


def pull_message(task, context):
    """The task's message, or None when the SuperNode has none left for it, with a short first retry: a task can
    be acquired before the SuperNode has stored its message's objects; Flower then waits 1 s before pulling again (a
    fresh ``flwr-clientapp`` process hides it behind its start-up; a worker that acquires at once would not)."""
    from flwr.app import Message
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    msgs = task.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        return None
    node, tree = Node(node_id=context.node_id), msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(task.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(task.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_BACKOFF,
        backoff_cap=0.5,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the id is not part of the pulled objects
    return message


def _inject_fault(context, message, claim: TaskClaim) -> None:
    """Tests only: with ``$SPARSEPUSH_WORKER_FAULT`` = ``P:TYPE:ROUND``, the worker of partition P kills itself
    (SIGKILL) once, after pulling its TYPE message of ROUND and before running it: a worker killed while it holds a
    task, at a known point. Once per claim file (a marker beside it)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or claim.path is None:
        return
    part, kind, rnd = spec.split(":")
    mine = str(context.node_config.get("partition-id")) == part
    try:  # the core round t travels in the config record (protocol.py); Flower's server round is t + 1
        server_round = int(message.content["config"]["round"]) + 1
    except (KeyError, TypeError, ValueError):
        return
    if mine and message.metadata.message_type == kind and str(server_round) == rnd:
        marker = claim.path.with_name(claim.path.name + ".fault-done")
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def runtime_client(runtime_address: str, component: str, *interceptors):
    """A client of the SuperNode's runtime API at ``runtime_address``, as Flower's ``component`` reaches it."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=runtime_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component), *interceptors],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(
    app,
    runtime_address: str,
    token: str,
    log: Callable = print,
    claim: TaskClaim | None = None,
    held: dict | None = None,
) -> None:
    """Run the acquired task ``token`` through ``app`` as ``flwr-clientapp`` does: pull its message and Context,
    call the app, push the reply (an error reply when the app raised), then the Context and status; a heartbeat
    meanwhile. Logs how long each part took. ``claim`` records what is held as it is pulled; ``held`` (a claim's
    ``context`` and ``task_id``) continues a task whose Context a killed worker had already pulled."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import context_from_proto, context_to_proto, metadata_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    claim = claim or TaskClaim(None)
    t0 = time.perf_counter()
    task = runtime_client(runtime_address, "flwr-clientapp", RuntimeTokenHttpInterceptor(token))
    beat = HeartbeatSender(make_task_heartbeat_fn_http(task))
    beat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        if held is None:
            context, task_id = pull_context(task)
            context_bytes = context_to_proto(context).SerializeToString()
            claim.write(token=token, task_id=task_id, context=context_bytes)
        else:
            proto = ProtoContext()
            proto.ParseFromString(held["context"])
            context, task_id, context_bytes = context_from_proto(proto), held["task_id"], held["context"]
        _set_identity(task_id, context)
        message = pull_message(task, context)
        if message is None:
            raise RuntimeError("the SuperNode's runtime API gave a task without a message")
        claim.write(
            token=token,
            task_id=task_id,
            context=context_bytes,
            metadata=metadata_to_proto(message.metadata).SerializeToString(),
        )
        _inject_fault(context, message, claim)
        t1 = time.perf_counter()
        reply = app(message=message, context=context)
        t2 = time.perf_counter()
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - reported to the ServerApp as an error reply, as flwr-clientapp does
        details = f"{type(ex)}:<'{ex}'>"
        log(f"task failed: {details}")
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        t1 = t2 = time.perf_counter()
    finally:
        try:
            if reply is not None and context is not None:
                push_message(task, reply, context)
            push_task_output(client=task, context=context, sub_status=status, details=details)
        finally:
            claim.clear()
            if beat.is_running:
                beat.stop()
            task.close()
    kind = message.metadata.message_type if message is not None else "?"
    log(
        f"task {kind}: pull {1e3 * (t1 - t0):.0f} ms, app {1e3 * (t2 - t1):.0f} ms, "
        f"push {1e3 * (time.perf_counter() - t2):.0f} ms"
    )


def recover(app, runtime_address: str, claim: TaskClaim, log: Callable = print) -> str:
    """Finish the task a killed worker held (its claim file), before acquiring anything; returns what was done:
    ``none`` (no claim), ``rerun`` (its message was not pulled yet: the task runs here), ``failed`` (its message was
    pulled: an error reply and a failed status, so the SuperNode sends the reply and goes on), or ``expired`` (the
    SuperNode no longer knows the token: Flower's heartbeat expiry already answered the task)."""
    held = claim.read()
    if held is None or "token" not in held:
        claim.clear()
        return "none"
    token = held["token"]
    if "metadata" not in held:
        log("the previous worker was killed holding a task it had not pulled the message of: running it here")
        try:
            run_task(app, runtime_address, token, log, claim, held if "context" in held else None)
        except Exception as err:  # noqa: BLE001 - the token expired meanwhile: Flower answered the task
            log(f"could not continue the previous worker's task ({err.__class__.__name__}: {err})")
            claim.clear()
            return "expired"
        return "rerun"
    from flwr.app import Message, RecordDict
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import context_from_proto, make_message, metadata_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Metadata
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    proto, meta = ProtoContext(), Metadata()
    proto.ParseFromString(held["context"])
    meta.ParseFromString(held["metadata"])
    context = context_from_proto(proto)
    _set_identity(held["task_id"], context)
    pulled = make_message(metadata=metadata_from_proto(meta), content=RecordDict())
    reason = "the node worker was killed while it ran this message; the next worker reports it failed"
    task = runtime_client(runtime_address, "flwr-clientapp", RuntimeTokenHttpInterceptor(token))
    try:
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=pulled)
        push_message(task, reply, context)
        push_task_output(client=task, context=context, sub_status=SubStatus.FAILED, details=reason)
        log(
            f"the previous worker was killed running {meta.message_type} message {meta.message_id[:12]}: reported failed"
        )
        return "failed"
    except Exception as err:  # noqa: BLE001 - the token expired meanwhile: Flower answered the task
        log(f"could not report the previous worker's task ({err.__class__.__name__}: {err})")
        return "expired"
    finally:
        claim.clear()
        task.close()


def serve_tasks(
    runtime_address: str,
    stop: threading.Event,
    poll: float = 0.02,
    log: Callable = print,
    claim_file: str | None = None,
) -> None:
    """Acquire and run ClientApp tasks of the SuperNode at ``runtime_address`` until ``stop`` is set; with
    ``claim_file``, first finish the task a killed worker held (:func:`recover`)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from flower_sparsepush.flower.client_app import make_client_app

    app = make_client_app(use_worker=False)
    claim = TaskClaim(claim_file)
    acquirer = runtime_client(runtime_address, "SuperExec")
    try:
        try:  # a claim exists only after a kill: the SuperNode is up
            recover(app, runtime_address, claim, log)
        except Exception as err:  # noqa: BLE001 - never a crash loop on a claim: Flower's token expiry remains
            log(f"could not finish the previous worker's task ({err.__class__.__name__}: {err}); left to the SuperNode")
            claim.clear()
        while not stop.is_set():
            try:
                res = acquirer.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[])
                )
            except Exception as err:  # noqa: BLE001 - the SuperNode is (re)starting: try again
                log(f"runtime API at {runtime_address} not reachable yet ({err.__class__.__name__})")
                stop.wait(0.5)
                continue
            if res.HasField("task") and res.token:
                claim.write(token=res.token)
                run_task(app, runtime_address, res.token, log, claim)
            else:
                stop.wait(poll)
    finally:
        acquirer.close()
