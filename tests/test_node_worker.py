"""The node worker (node_worker.py) and the torch-free ClientApp that forwards each message to it over the worker link
(client_app.py, worker_link.py).

The deployment tests (tests/test_deployment.py) run every SuperNode through `sparsepush node` in executor mode. Here:
the ClientApp's imports, a clear error when no worker listens, a worker answering over the link, and a worker killed
mid-run in both modes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flower_sparsepush.deploy.local import LocalDeployment
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.processes import descendants, pid_alive
from flower_sparsepush.run.results import read_metrics

HAS_FLOWER = Path(sys.executable).with_name("flower-superlink").exists() or shutil.which("flower-superlink")


def test_client_app_imports_no_torch():
    code = (
        "import sys, flower_sparsepush.flower.client_app as c; "
        "assert c.app is not None; "
        "bad = [m for m in ('torch', 'flower_sparsepush.run.node_train', 'flower_sparsepush.learn.data') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_forward_without_a_worker_says_so(tmp_path, monkeypatch):
    from flwr.app import ConfigRecord, Context, RecordDict

    from flower_sparsepush.flower.worker_link import WorkerError, forward

    monkeypatch.setenv("SPARSEPUSH_NODE_WORKER_WAIT", "0.3")
    ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    content = RecordDict({"q": ConfigRecord({"what": "partition-id"})})
    with pytest.raises(WorkerError, match="no node worker listens"):
        forward(str(tmp_path / "none.sock"), "query", content, ctx)


def test_worker_answers_a_query_and_stops_on_sigterm(tmp_path):
    from flwr.app import ConfigRecord, Context, RecordDict

    from flower_sparsepush.flower.worker_link import forward

    sock = tmp_path / "w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "flower_sparsepush.deploy.node_worker", "--socket", str(sock)])
    try:
        ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
        reply = forward(str(sock), "query", RecordDict({"q": ConfigRecord({"what": "partition-id"})}), ctx)
        assert int(reply["info"]["partition-id"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not sock.exists()


@pytest.mark.skipif(not HAS_FLOWER, reason="flower-superlink is not installed")
@pytest.mark.parametrize("mode", ["link", "executor"])
def test_a_killed_worker_is_started_again_and_the_run_continues(tmp_path, mode, monkeypatch):
    """Node 1's worker is killed (SIGKILL) and `sparsepush node` starts it again; the node continues from its
    stored state, mass stays exact, and no PID is left.

    link mode: killed after round 1, while idle (the next per-message ClientApp waits for the new worker's socket).
    executor mode: killed while it holds a task, at a known point: after pulling its round-2 train message and
    before running it (``$SPARSEPUSH_WORKER_FAULT``). The next worker finds the claim the killed one left, answers
    that message with an error reply and finishes the task as failed: node 1 is a straggler in round 2 only, and
    trains again in round 3 (before, its SuperNode waited on the task until Flower expired its token)."""
    cfg = validate(
        {
            "strategy": "sparse-push",
            "compressor": "topk:0.1+q:4",
            "gamma": 0.3,
            "dataset": "synthetic",
            "model": "mlp",
            "num-nodes": 2,
            "num-rounds": 3 if mode == "executor" else 2,  # executor: killed in round 2, trains again in round 3
            "local-steps": 2,
            "batch-size": 16,
            "eval-every": 1,
            "round-timeout": 120.0,
            "out-dir": str(tmp_path),
            "run-name": "wk",
        }
    )
    killed = []

    def idle(dep) -> bool:
        """Node 1's worker holds no task: its last message was answered and the next not yet received."""
        log = (tmp_path / "logs" / "supernode-1.log").read_text()
        return log.rfind("Sending:") > log.rfind("Receiving:")

    def kill_worker_after_round_1(dep, done):
        if done >= 1 and not killed and idle(dep):
            node = dep.procs["supernode-1"].pid
            workers = [
                p for p in descendants(node) if b"flower_sparsepush.deploy.node_worker" in _cmdline(p) and pid_alive(p)
            ]
            assert len(workers) == 1, workers
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    if mode == "executor":
        monkeypatch.setenv("SPARSEPUSH_WORKER_FAULT", "1:train:2")
    dep = LocalDeployment(2, log_dir=tmp_path / "logs", worker_mode=mode)
    with dep:
        assert dep.run(cfg.as_dict(), timeout=600, on_poll=kill_worker_after_round_1 if mode == "link" else None) == 0
    assert [p for p in dep.seen_pids if pid_alive(p)] == []
    worker_log = (tmp_path / "logs" / "supernode-1.log").read_text()
    assert "starting it again" in worker_log
    summary = json.loads((tmp_path / "wk" / "summary.json").read_text())
    assert summary["final"]["round"] == cfg.num_rounds and summary["nodes_not_returned"] == []
    rows = read_metrics(tmp_path / "wk" / "metrics.jsonl")
    assert rows[-1]["num_evaluated"] == 2
    assert ("its ClientApp process had started" in worker_log) == (mode == "link")  # link mode: one per message
    assert ("task train:" in worker_log) == (mode == "executor")
    if mode == "link":
        assert killed
    else:
        assert re.search(r"killed running train message \w+: reported failed", worker_log)
        events = [(e["round"], e["node"]) for e in summary["straggler_events"]]
        assert events == [(2, 1)], summary["straggler_events"]
        assert "killed while it ran this message" in summary["straggler_events"][0]["reason"]
    for r in rows:
        if r["num_evaluated"] == 2:
            assert r["y_nodes"] + r.get("y_pending", 0.0) + r["y_mailboxes"] == pytest.approx(2, abs=1e-9)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(not HAS_FLOWER, reason="flower-superlink is not installed")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sparsepush_node_stops_supernode_and_worker_on_a_signal(tmp_path, sig):
    """`sparsepush node` (no SuperLink to reach: the SuperNode keeps retrying) stops both children by PID."""
    import time

    from flower_sparsepush.run.processes import free_port

    cmd = [sys.executable, "-m", "flower_sparsepush.cli", "node", "--superlink", "127.0.0.1:1", "--insecure"]
    cmd += ["--partition-id", "0", "--num-partitions", "2", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 60
        while len(kids := descendants(proc.pid)) < 2 and time.time() < end:
            time.sleep(0.2)
        assert len(kids) >= 2, kids  # the worker and the SuperNode
        time.sleep(1.0)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
    end = time.time() + 20
    while [p for p in kids if pid_alive(p)] and time.time() < end:
        time.sleep(0.2)
    assert [p for p in kids if pid_alive(p)] == []


def test_task_claim_round_trip_and_a_broken_claim_counts_as_none(tmp_path):
    """The claim a worker leaves for the next: fields come back as written (protos as bytes), clear removes it, and
    a claim file that cannot be read (a worker killed mid-write leaves only the .tmp; garbage) counts as none, so
    a broken claim can never stop the next worker."""
    from flower_sparsepush.deploy.node_executor import TaskClaim, recover

    claim = TaskClaim(tmp_path / "task.claim")
    assert claim.read() is None
    claim.write(token="abc", task_id=7, context=b"\x00\x01ctx", metadata=b"\xffmeta")
    assert claim.read() == {"token": "abc", "task_id": 7, "context": b"\x00\x01ctx", "metadata": b"\xffmeta"}
    assert not (tmp_path / "task.claim.tmp").exists()
    claim.clear()
    assert claim.read() is None and not (tmp_path / "task.claim").exists()
    (tmp_path / "task.claim").write_text("{not json")
    assert claim.read() is None
    assert recover(app=None, runtime_address="127.0.0.1:1", claim=claim, log=lambda _m: None) == "none"
    assert not (tmp_path / "task.claim").exists()
    assert TaskClaim(None).read() is None  # no claim file: nothing recorded, nothing recovered
