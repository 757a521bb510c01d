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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

PULL_BACKOFF = 0.02  # first retry of a message object the SuperNode has not stored yet (Flower's default: 1 s)


def pull_input(task):
    """(message, context) of the task behind ``task``'s token, from the SuperNode's runtime API: what Flower's
    ``run_clientapp.pull_task_input`` does without the run and FAB, and with a short first retry. A task can be
    acquired before the SuperNode has stored its message's objects; Flower then waits 1 s before pulling again (a
    fresh ``flwr-clientapp`` process hides it behind its start-up; a worker that acquires at once would not)."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    got = task.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(got.context)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = got.task_id, got.run.run_id, context.node_id
    msgs = task.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("the SuperNode's runtime API gave a task without a message")
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
    return message, context


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


def run_task(app, runtime_address: str, token: str, log: Callable = print) -> None:
    """Run the acquired task ``token`` through ``app`` as ``flwr-clientapp`` does: pull its message and Context,
    call the app, push the reply (an error reply when the app raised), then the Context and status; a heartbeat
    meanwhile. Logs how long each part took."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    t0 = time.perf_counter()
    task = runtime_client(runtime_address, "flwr-clientapp", RuntimeTokenHttpInterceptor(token))
    beat = HeartbeatSender(make_task_heartbeat_fn_http(task))
    beat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context = pull_input(task)
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
            if beat.is_running:
                beat.stop()
            task.close()
    kind = message.metadata.message_type if message is not None else "?"
    log(
        f"task {kind}: pull {1e3 * (t1 - t0):.0f} ms, app {1e3 * (t2 - t1):.0f} ms, "
        f"push {1e3 * (time.perf_counter() - t2):.0f} ms"
    )


def serve_tasks(runtime_address: str, stop: threading.Event, poll: float = 0.02, log: Callable = print) -> None:
    """Acquire and run ClientApp tasks of the SuperNode at ``runtime_address`` until ``stop`` is set."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from flower_sparsepush.flower.client_app import make_client_app

    app = make_client_app(use_worker=False)
    acquirer = runtime_client(runtime_address, "SuperExec")
    try:
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
                run_task(app, runtime_address, res.token, log)
            else:
                stop.wait(poll)
    finally:
        acquirer.close()
