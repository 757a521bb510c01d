"""A real Ray cluster of two Ray nodes on this machine (issue 14): the Flower simulation attached to it, compared with
a single-machine run of the same config and seed. Writes ``results/ray_cluster.json`` and ``results/ray_cluster.md``.

Run: ``python -m flower_sparsepush.simulations.ray_cluster`` (about two minutes on 2 cores; ``--help`` for options).

What it does, in order, printing one progress line per step:

1. ``ray start --head --num-cpus 1`` and ``ray start --address <head> --num-cpus 1`` (Ray's own way of making a
   cluster), each with its own ports that the OS reports free, one private ``--temp-dir`` and the dashboard off. The
   head writes its address to ``<temp-dir>/ray_current_cluster`` only, never to ``/tmp/ray``, so no other
   ``ray.init()`` on this shared machine attaches to it by accident.
2. The cluster run: a child process with ``RAY_ADDRESS=<head>`` runs :func:`launch.simulate` (Flower's
   ``run_simulation``; Flower's ``ray.init()`` then attaches to the cluster instead of starting Ray). Each ClientApp
   actor asks for one CPU (``launch.BACKEND_CONFIG``), so with two 1-CPU nodes Flower's pool holds one actor per
   node. A Flower client mod (:class:`NodeRecorder`, which passes every message through unchanged) appends one line
   per ClientApp call with the Ray node id, actor id and PID of the process that ran it; after the run the child
   reads Ray's actor table (GCS) as a second, independent record of where each ``ClientAppActor`` lived.
   Then (unless ``--no-flwr-run``) the same config through the ``flwr run`` path on the same cluster:
   :func:`launch.flwr_run` in a child with ``RAY_ADDRESS`` set, so the private ``flower-superlink --simulation`` and
   the simulation process it spawns attach too; that ClientApp comes from the project without the recorder, so
   Ray's actor table (only the actors that appeared during that run) says where its actors lived.
3. The single-machine run: the same config and seed in a child with ``RAY_ADDRESS=local`` (a fresh local Ray,
   whatever cluster exists on the machine), with the same recorder.
4. Comparison of every metric of every evaluation row (``metrics.jsonl``, all fields but wall-clock times), the
   summary's bit counts and each node's final model (``nodes.npz``).
5. Cleanup by PID: every process started here carries an environment marker (``SPARSEPUSH_RAY_CLUSTER=<token>``)
   that Ray's daemons, agents and workers inherit; all of them (and their descendants) get SIGTERM, then SIGKILL,
   also on errors, Ctrl-C and SIGTERM, and the report lists any that were left (none expected). ``ray stop`` is not
   used: it kills every Ray process of the machine, other people's too.
"""

from __future__ import annotations

import argparse
import json
import math
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

from flower_sparsepush.run.processes import descendants, free_port, venv_exe

MARKER = "SPARSEPUSH_RAY_CLUSTER"
NODE_STORE_ENV = "SPARSEPUSH_NODE_STORE"  # store.ENV: where the nodes' state files go when node-store is ''

QUIET_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
RUN_CFG = {
    "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4",
    "gamma": 0.3,
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 6,
    "graph": "exponential",
    "num-rounds": 4,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.9,
    "eval-every": 2,
    "save-nodes": True,
    "seed": 0,
}
TIME_FIELDS = ("wall_s",)  # metric fields that are clock readings, not results
TOLERANCE = 1e-6
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


def _alive(pid: int) -> bool:
    """Running and not a zombie (this machine's PID 1 does not reap orphans, so dead daemons linger as zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


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
    return sorted(p for p in found if _alive(p))


def stop_pids(pids: list[int], grace: float = 3.0) -> list[int]:
    """SIGTERM, up to ``grace`` seconds, then SIGKILL; returns the PIDs still alive after that (should be none)."""

    def send(ps, sig):
        for p in ps:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass

    send(pids, signal.SIGTERM)
    end = time.time() + grace
    while time.time() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    send(left, signal.SIGKILL)
    end = time.time() + 5
    while time.time() < end and any(_alive(p) for p in left):
        time.sleep(0.1)
    return [p for p in left if _alive(p)]


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


# --------------------------------------------------------------------------- inside a run (child process, actors)


class NodeRecorder:
    """A Flower client mod that records where each ClientApp call ran and changes nothing: one JSON line per call
    (Ray node id, actor id, PID, message type, partition id) appended to ``path``. The ClientApp actors pickle it;
    ``path`` must be on a filesystem every Ray node can write (here: one machine)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, msg, context, call_next):
        import ray

        ctx = ray.get_runtime_context()
        rec = {
            "ray_node_id": ctx.get_node_id(),
            "actor_id": ctx.get_actor_id(),
            "pid": os.getpid(),
            "type": msg.metadata.message_type,
            "partition": int(context.node_config.get("partition-id", -1)),
        }
        reply = call_next(msg, context)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return reply


def _ray_nodes(expect: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Attach to the cluster in RAY_ADDRESS, wait until ``expect`` nodes are alive, list them, detach."""
    import ray

    ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        end = time.time() + timeout
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= expect or time.time() > end:
                break
            time.sleep(0.5)
        return [
            {
                "node_id": n["NodeID"],
                "role": "head" if "node:__internal_head__" in n["Resources"] else "worker",
                "cpus": n["Resources"].get("CPU"),
            }
            for n in alive
        ]
    finally:
        ray.shutdown()


def _actor_table() -> list[dict[str, Any]]:
    """Ray's actor table (GCS, no dashboard needed; a debugging API): where each ClientAppActor lived."""
    import ray
    from ray._private import state

    ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        rows = state.actors()
        return [
            {"actor_id": a["ActorID"], "node_id": a["Address"]["NodeID"], "pid": a["Pid"], "state": a["State"]}
            for a in rows.values()
            if a["ActorClassName"].endswith("ClientAppActor")
        ]
    finally:
        ray.shutdown()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run (in its own process): optionally wait for the cluster's nodes, run, read the actor table.
    ``engine`` "simulate": :func:`launch.simulate` with the recorder mod; "flwr-run": :func:`launch.flwr_run` (a
    private ``flower-superlink --simulation`` that inherits RAY_ADDRESS, then ``flwr run``; the ClientApp is loaded
    from the project, so no mod: the actor table alone says where its actors lived)."""
    from flower_sparsepush.flower.launch import flwr_run, simulate

    out: dict[str, Any] = {"ray_address_env": os.environ.get("RAY_ADDRESS")}
    before: set[str] = set()
    if spec["cluster"]:
        out["ray_nodes"] = _ray_nodes(spec["expect_nodes"])
        if spec.get("engine") == "flwr-run":
            before = {a["actor_id"] for a in _actor_table()}  # actors of earlier runs on this cluster
    t0 = time.time()
    if spec.get("engine") == "flwr-run":
        flwr_run(spec["cfg"])
    else:
        simulate(spec["cfg"], client_mods=[NodeRecorder(spec["record"])])
    out["run_s"] = round(time.time() - t0, 2)
    if spec["cluster"]:
        try:
            out["gcs_actors"] = [a for a in _actor_table() if a["actor_id"] not in before]
        except Exception as err:  # noqa: BLE001 - a cross-check only; the recorder's lines are the evidence
            out["gcs_actors_error"] = repr(err)
    return out


def run_child(
    procs: Processes, spec: dict[str, Any], env: dict[str, str], timeout: float, quiet: bool = False
) -> dict[str, Any]:
    """Run :func:`child` in a subprocess (its output to this terminal, or with ``quiet`` to a log file shown only
    when it fails); stopped when it passes ``timeout`` seconds."""
    spec_path = Path(procs.temp_dir) / f"{spec['name']}.spec.json"
    out_path = Path(procs.temp_dir) / f"{spec['name']}.out.json"
    log_path = Path(procs.temp_dir) / f"{spec['name']}.log"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "flower_sparsepush.simulations.ray_cluster", "--child", str(spec_path), str(out_path)]
    t0 = time.time()
    sink = open(log_path, "w") if quiet else None
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sink, stderr=sink and subprocess.STDOUT)
    finally:
        if sink:
            sink.close()
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        raise
    if rc != 0 or not out_path.exists():
        where = f"its log:\n{log_path.read_text()[-3000:]}" if quiet else "see its output above"
        raise RuntimeError(f"the {spec['name']} run failed (exit {rc}); {where}")
    res = json.loads(out_path.read_text())
    res["wall_s"] = round(time.time() - t0, 2)
    return res


# --------------------------------------------------------------------------- evidence


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def placement(records: list[dict[str, Any]], roles: dict[str, str] | None = None) -> dict[str, Any]:
    """Distinct Ray nodes that ran ClientApp calls, and per node: calls, actors, partitions (by role when known)."""
    per: dict[str, dict[str, Any]] = {}
    for r in records:
        n = per.setdefault(r["ray_node_id"], {"calls": 0, "actors": set(), "partitions": set()})
        n["calls"] += 1
        n["actors"].add(r["actor_id"])
        n["partitions"].add(r["partition"])
    roles = roles or {}
    nodes = {
        node: {
            "role": roles.get(node, "unknown"),
            "calls": v["calls"],
            "actors": len(v["actors"]),
            "partitions": sorted(v["partitions"]),
        }
        for node, v in sorted(per.items(), key=lambda kv: (roles.get(kv[0], "~"), kv[0]))
    }
    return {"nodes_used": len(per), "calls": len(records), "per_node": nodes}


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Every numeric metric of every evaluation row (clock fields excluded), the summary's bit counts and the final
    node models of two run folders: max absolute difference and whether all are bit-for-bit equal."""
    import numpy as np

    from flower_sparsepush.run.results import read_metrics

    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    out: dict[str, Any] = {"rows": [len(ra), len(rb)], "fields": []}
    diffs: list[float] = []
    differing: dict[str, float] = {}
    exact = len(ra) == len(rb) and len(ra) > 0
    for x, y in zip(ra, rb):
        for k in sorted(set(x) | set(y)):
            if k in TIME_FIELDS:
                continue
            vx, vy = x.get(k), y.get(k)
            if k not in out["fields"]:
                out["fields"].append(k)
            if isinstance(vx, (int, float)) and isinstance(vy, (int, float)):
                d = abs(float(vx) - float(vy)) if not (math.isnan(vx) and math.isnan(vy)) else 0.0
                diffs.append(d)
                if d > 0:
                    differing[k] = max(differing.get(k, 0.0), d)
                exact = exact and (vx == vy or (math.isnan(vx) and math.isnan(vy)))
            else:
                exact = exact and vx == vy
                if vx != vy:
                    diffs.append(math.inf)
                    differing[k] = math.inf
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    bits_equal = all(sa.get(k) == sb.get(k) for k in ("bits_sent_by_node", "bits_received_by_node"))
    out["max_abs_metric_diff"] = max(diffs) if diffs else math.inf
    out["metrics_bitwise_equal"] = exact
    out["differing_fields"] = differing  # field -> max abs difference, for the fields not bit-for-bit equal
    out["bits_equal"] = bits_equal
    if (a / "nodes.npz").exists() and (b / "nodes.npz").exists():
        na, nb = np.load(a / "nodes.npz"), np.load(b / "nodes.npz")
        same_keys = sorted(na.files) == sorted(nb.files)
        out["max_abs_model_diff"] = (
            max(float(np.abs(na[k] - nb[k]).max()) for k in na.files) if same_keys and na.files else math.inf
        )
        out["models_bitwise_equal"] = same_keys and all(np.array_equal(na[k], nb[k]) for k in na.files)
    out["equal"] = out["max_abs_metric_diff"] <= TOLERANCE and bits_equal and len(ra) == len(rb) > 0
    return out


# --------------------------------------------------------------------------- the whole experiment


def run(
    out_dir: str | os.PathLike = "results",
    keep_temp: bool = False,
    timeout: float = 600.0,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
    flwr_run_too: bool = True,
) -> dict[str, Any]:
    """Cluster run, single-machine run, comparison; writes ``<out_dir>/ray_cluster.json`` and ``.md``.
    ``overrides`` change :data:`RUN_CFG` (tests use a smaller run); ``command`` is the command line recorded;
    ``flwr_run_too`` adds the ``flwr run`` path (private SuperLink with RAY_ADDRESS) on the same cluster."""
    from flower_sparsepush.run.config import validate

    if command is None:
        command = shlex.join(["python", "-m", "flower_sparsepush.simulations.ray_cluster", *sys.argv[1:]])
    procs = Processes()
    rep: dict[str, Any] = {"command": command, "when": time.strftime("%Y-%m-%d %H:%M"), "ok": False}
    rep["machine"] = {"cores": os.cpu_count(), "host_python": sys.version.split()[0]}
    t_all = time.time()
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        runs = Path(procs.temp_dir) / "runs"
        raw = RUN_CFG | (overrides or {})
        base = validate(raw | {"out-dir": str(runs)})
        rep["config"] = {k: base[k] for k in raw}
        rep["node_store"] = (
            "context.state"
            if base["node-store"] == "context"
            else f"files in {base['node-store'] or '$' + NODE_STORE_ENV + ' = <temp dir>/node-store'} (one disk)"
        )
        cluster = start_cluster(procs)
        rep["cluster"] = cluster
        log(f"both Ray nodes up in {cluster['startup_s']:.1f}s; cluster run (RAY_ADDRESS={cluster['address']})")
        rec_c = str(Path(procs.temp_dir) / "cluster.calls.jsonl")
        cfg_c = base | {"run-name": "cluster"}
        spec = {"name": "cluster", "cfg": cfg_c, "record": rec_c, "cluster": True, "expect_nodes": 2}
        res_c = run_child(procs, spec, procs.env(RAY_ADDRESS=cluster["address"]), timeout)
        roles = {n["node_id"]: n["role"] for n in res_c.get("ray_nodes", [])}
        place_c = placement(read_records(rec_c), roles)
        log(
            f"cluster run done in {res_c['wall_s']:.1f}s: ClientApp calls on {place_c['nodes_used']} Ray node(s): "
            + ", ".join(f"{v['role']} {v['calls']} calls/{v['actors']} actor(s)" for v in place_c["per_node"].values())
        )
        if flwr_run_too:
            log("flwr run path on the same cluster: flower-superlink --simulation with RAY_ADDRESS, then flwr run")
            cfg_f = base | {"run-name": "flwr-cluster"}
            spec = {"name": "flwr-cluster", "cfg": cfg_f, "cluster": True, "expect_nodes": 2, "engine": "flwr-run"}
            try:
                res_f = run_child(procs, spec, procs.env(RAY_ADDRESS=cluster["address"]), timeout, quiet=True)
            except (RuntimeError, subprocess.TimeoutExpired) as err:  # the simulate path above is the headline
                res_f = {"error": f"{type(err).__name__}: {err}"[-3000:]}
                log(f"flwr run path failed: {res_f['error'][:300]}")
        if flwr_run_too and "error" in res_f:
            rep["flwr_run_cluster"] = {"error": res_f["error"]}
        elif flwr_run_too:
            actors_f = res_f.get("gcs_actors", [])
            per_f: dict[str, Any] = {}
            for a in actors_f:
                n = per_f.setdefault(a["node_id"], {"role": roles.get(a["node_id"], "unknown"), "actors": 0})
                n["actors"] += 1
            rep["flwr_run_cluster"] = {
                "wall_s": res_f["wall_s"],
                "run_s": res_f["run_s"],
                "actor_nodes": len(per_f),
                "per_node": per_f,
                **({"gcs_error": res_f["gcs_actors_error"]} if "gcs_actors_error" in res_f else {}),
            }
            log(
                f"flwr run path done in {res_f['wall_s']:.1f}s: ClientAppActors on {len(per_f)} Ray node(s) "
                "(Ray's actor table)"
            )
        log("stopping the cluster's processes")
        cluster_pids = marked_pids(procs.token, procs.temp_dir)
        procs.stopped += len(cluster_pids)
        stop_pids(cluster_pids)
        log(f"stopped {len(cluster_pids)} processes; single-machine run (a fresh local Ray)")
        rec_s = str(Path(procs.temp_dir) / "single.calls.jsonl")
        cfg_s = base | {"run-name": "single"}
        spec = {"name": "single", "cfg": cfg_s, "record": rec_s, "cluster": False}
        res_s = run_child(procs, spec, procs.env(RAY_ADDRESS="local"), timeout)
        place_s = placement(read_records(rec_s))
        log(
            f"single-machine run done in {res_s['wall_s']:.1f}s: ClientApp calls on {place_s['nodes_used']} Ray node(s)"
        )
        cmp_ = compare_runs(runs / "cluster", runs / "single")
        if "per_node" in rep.get("flwr_run_cluster", {}):
            rep["flwr_run_cluster"]["comparison"] = compare_runs(runs / "flwr-cluster", runs / "single")
        gcs = res_c.get("gcs_actors", [])
        gcs_nodes = sorted({a["node_id"] for a in gcs})
        recorded_in_cluster = set(place_c["per_node"]) <= set(roles) and bool(roles)
        rep.update(
            {
                "ray_nodes": res_c.get("ray_nodes", []),
                "cluster_run": {
                    "wall_s": res_c["wall_s"],
                    "simulate_s": res_c["run_s"],
                    **place_c,
                    "calls_ran_on_cluster_nodes": recorded_in_cluster,
                    "gcs_client_app_actors": gcs,
                    "gcs_actor_nodes": len(gcs_nodes),
                    **({"gcs_error": res_c["gcs_actors_error"]} if "gcs_actors_error" in res_c else {}),
                },
                "single_run": {"wall_s": res_s["wall_s"], "simulate_s": res_s["run_s"], **place_s},
                "comparison": cmp_,
                "nodes_used": place_c["nodes_used"] if recorded_in_cluster else 0,
                "metrics_equal": cmp_["equal"],
                "max_abs_metric_diff": cmp_["max_abs_metric_diff"],
            }
        )
        rep["ok"] = rep["nodes_used"] == 2 and cmp_["equal"]
        log(
            f"metrics equal: {cmp_['equal']} (max abs diff {cmp_['max_abs_metric_diff']:.3g}, bit-for-bit "
            f"{cmp_['metrics_bitwise_equal']}; models max abs diff {cmp_.get('max_abs_model_diff', float('nan')):.3g})"
        )
    except BaseException as err:
        rep["error"] = f"{type(err).__name__}: {err}"
        log(f"failed: {rep['error']}")
        if isinstance(err, KeyboardInterrupt):
            raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        left = procs.cleanup(keep_temp=keep_temp)
        rep["processes_stopped"] = procs.stopped
        rep["leftover_pids"] = left
        rep["total_wall_s"] = round(time.time() - t_all, 2)
        log(f"cleanup: {'no process left' if not left else f'LEFT RUNNING: {left}'}")
        write_report(rep, Path(out_dir))
    return rep


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def write_report(rep: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_cluster.json").write_text(json.dumps(rep, indent=2, default=float) + "\n")
    (out / "ray_cluster.md").write_text(render_md(rep))
    log(f"written: {out / 'ray_cluster.json'}, {out / 'ray_cluster.md'}")


def render_md(rep: dict[str, Any]) -> str:
    lines = [
        "# Flower simulation on a two-node Ray cluster (one machine)",
        "",
        f"Regenerate: `{rep['command']}` ({rep.get('when')}, {rep['machine']['cores']} cores). Steps and the "
        "multi-machine recipe: [docs/ray-cluster.md](../docs/ray-cluster.md).",
        "",
    ]
    if "error" in rep:
        lines += [f"**Failed**: `{rep['error']}`", ""]
    cl = rep.get("cluster", {})
    if cl:
        lines += [
            "```bash",
            cl["head_command"],
            cl["worker_command"].replace(cl["address"], "<head address>"),
            "```",
            "",
        ]
    cr, sr, cmp_ = rep.get("cluster_run"), rep.get("single_run"), rep.get("comparison")
    if cr and sr and cmp_:
        c = rep["config"]
        lines += [
            f"Run: {c['strategy']} {c['compressor']}, {c['num-nodes']} virtual nodes, {c['num-rounds']} rounds, "
            f"{c['dataset']} / {c['model']}, seed {c['seed']}; each ClientApp actor asks for 1 CPU; node state: "
            f"{rep.get('node_store', 'n/a')}.",
            "",
            "| Ray node | role | ClientApp calls | actors | virtual nodes served |",
            "|---|---|---|---|---|",
        ]
        for node, v in cr["per_node"].items():
            lines.append(
                f"| `{node[:12]}` | {v['role']} | {v['calls']} | {v['actors']} | {', '.join(map(str, v['partitions']))} |"
            )
        lines += [
            "",
            f"- Ray nodes that hosted ClientApp actors: **{rep['nodes_used']}** (recorded per call by a client mod; "
            f"Ray's actor table agrees: ClientAppActors on {cr['gcs_actor_nodes']} node(s)).",
            f"- Metrics vs the single-machine run (fresh local Ray, {sr['nodes_used']} node): "
            f"{'**equal**' if cmp_['equal'] else '**different**'}; max abs difference {cmp_['max_abs_metric_diff']:.3g} "
            f"over {cmp_['rows'][0]} evaluation rows x {len(cmp_['fields'])} fields (clock fields excluded), "
            f"bit-for-bit: {'yes' if cmp_['metrics_bitwise_equal'] else 'no'}"
            + (
                " (differ: " + ", ".join(f"{k} by {v:.3g}" for k, v in cmp_["differing_fields"].items()) + ")"
                if cmp_["differing_fields"]
                else ""
            )
            + "; bit counts equal: "
            + f"{'yes' if cmp_['bits_equal'] else 'no'}; final node models max abs difference "
            f"{cmp_.get('max_abs_model_diff', float('nan')):.3g}.",
            *_flwr_run_md(rep.get("flwr_run_cluster")),
            f"- Wall time: cluster {cl['startup_s']:.1f} s to start both nodes + {cr['wall_s']:.1f} s run; "
            f"single machine {sr['wall_s']:.1f} s (each run includes Ray start or attach and Python start-up).",
        ]
    lines.append(
        f"- Processes stopped by PID: {rep.get('processes_stopped', 0)}; left running: "
        f"{rep.get('leftover_pids') or 'none'}."
    )
    return "\n".join(lines) + "\n"


def _flwr_run_md(fr: dict[str, Any] | None) -> list[str]:
    if not fr:
        return []
    if "error" in fr:
        return [f"- The `flwr run` path on the same cluster failed: `{fr['error'].splitlines()[0]}`."]
    c = fr.get("comparison", {})
    roles = ", ".join(f"{v['role']} {v['actors']}" for v in fr["per_node"].values())
    return [
        f"- The `flwr run` path on the same cluster (private `flower-superlink --simulation` started with "
        f"RAY_ADDRESS, then `flwr run`; {fr['wall_s']:.1f} s): ClientAppActors on {fr['actor_nodes']} Ray node(s) "
        f"({roles}; Ray's actor table, no per-call record on this path); metrics vs the single-machine run "
        f"{'equal' if c.get('equal') else 'different'} (max abs difference {c.get('max_abs_metric_diff', math.nan):.3g})."
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        res = child(json.loads(Path(argv[1]).read_text()))
        Path(argv[2]).write_text(json.dumps(res))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="where ray_cluster.json and ray_cluster.md go")
    parser.add_argument("--keep-temp", action="store_true", help="keep the Ray temp dir (logs) and the run folders")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is stopped")
    parser.add_argument("--no-flwr-run", action="store_true", help="skip the `flwr run` path on the cluster")
    args = parser.parse_args(argv)
    rep = run(args.out, keep_temp=args.keep_temp, timeout=args.timeout, flwr_run_too=not args.no_flwr_run)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
