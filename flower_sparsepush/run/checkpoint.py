"""Checkpoints of a run: ``<out-dir>/<run-name>/checkpoint.pt``, a ``torch.save`` of plain types (tensors, numbers,
bytes, lists, dicts) that loads with ``weights_only=True``. The in-process loop keeps every node's state there; on
Flower the ServerApp keeps the strategy's and each node keeps its own copy in the node store."""

from __future__ import annotations

import os
from typing import Any

import torch

from flower_sparsepush.core.node import state_from_flat, state_to_flat
from flower_sparsepush.core.pushsum import NodeState
from flower_sparsepush.core.router import Router
from flower_sparsepush.run.config import KEYS, ConfigError, RunConfig
from flower_sparsepush.run.results import run_dir

# the layout this code writes and reads: node states in the flat form of node.state_to_flat; on Flower the nodes'
# copies are safetensors files of the node store (store.py)
CHECKPOINT_VERSION = 3


_NOT_IDENTITY = (
    "resume",
    "checkpoint-every",
    "out-dir",
    "round-timeout",
    "eval-every",
    "eval-node-samples",
    "save-nodes",
)


def checkpoint_identity(cfg: RunConfig) -> dict[str, Any]:
    """The config keys a checkpoint must agree on to be resumed (not the output or evaluation settings)."""
    return {k: v for k, v in cfg.as_dict().items() if k not in _NOT_IDENTITY}


def checkpoint_path(cfg: RunConfig):
    return run_dir(cfg) / "checkpoint.pt"


def write_checkpoint(cfg: RunConfig, engine: str, rnd: int, body: dict[str, Any]) -> None:
    """``<out-dir>/<run-name>/checkpoint.pt`` after round ``rnd`` of ``engine`` (``inprocess`` or ``flower``):
    ``body`` plus the version, engine, round and the config it belongs to. Written to a temporary file and renamed,
    so an interrupted write leaves the previous checkpoint intact."""
    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    ck = {"version": CHECKPOINT_VERSION, "engine": engine, "round": rnd, "config": checkpoint_identity(cfg)} | body
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)


def read_checkpoint(cfg: RunConfig, engine: str) -> dict[str, Any] | None:
    """The run's checkpoint written by ``engine``, or None if there is none; refuses (ConfigError) one of another
    engine, version or run."""
    path = checkpoint_path(cfg)
    if not path.exists():
        return None
    ck = torch.load(path, weights_only=True)
    if ck.get("engine", "inprocess") != engine:
        raise ConfigError(
            f"{path} was written by the {ck.get('engine')} engine; resume it there or use another run-name"
        )
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{path}: checkpoint version {ck.get('version')!r}, this code reads {CHECKPOINT_VERSION}; start the run "
            f"again without resume (or use another run-name), or resume it with the version that wrote it"
        )
    mine, held = checkpoint_identity(cfg), ck["config"]
    # a key the checkpoint does not name came after it was written: the code that wrote it ran as that key's default
    held = {k: KEYS[k].default for k in mine if k not in held} | held
    diff = sorted(k for k in set(mine) | set(held) if mine.get(k) != held.get(k))
    if diff:
        k = diff[0]
        raise ConfigError(
            f"run-config resume: {path} belongs to another run ({k}={held.get(k)!r} there, "
            f"{mine.get(k)!r} now); use another run-name or the same settings"
        )
    return ck


def save_checkpoint(
    cfg: RunConfig,
    rnd: int,
    states: list[NodeState],
    router: Router,
    sent: list[int],
    history: list[dict[str, float]],
    merges: dict[str, Any] | None = None,
) -> None:
    """Everything the in-process loop needs to continue after round ``rnd`` (RNGs are pure functions of (seed,
    node, round)); each node's merge base and owner errors are in its state, ``merges`` is the merge relay's side
    (merge_relay.MergeRelay.state_dict: the outcomes owed to offline nodes)."""
    body = {
        "states": [state_to_flat(s) for s in states],
        "router": router.state_dict(),
        "bits_sent": list(sent),
        "history": [dict(h) for h in history],
        "merges": merges or {},
    }
    write_checkpoint(cfg, "inprocess", rnd, body)


def load_checkpoint(cfg: RunConfig, router: Router) -> tuple | None:
    """(round, states, bits sent, history, merge base or None, owners' merge error or None, merge relay state)
    from the run's checkpoint, restoring ``router``; None if there is none. The merge base and owners' error are
    those of a checkpoint that kept one for all nodes (None when the states hold them)."""
    ck = read_checkpoint(cfg, "inprocess")
    if ck is None:
        return None
    router.load_state_dict(ck["router"])
    states = [state_from_flat(d) for d in ck["states"]]
    hist = [dict(h) for h in ck["history"]]
    return (
        int(ck["round"]),
        states,
        [int(b) for b in ck["bits_sent"]],
        hist,
        ck.get("merge_base"),
        ck.get("merge_owner_err"),
        ck.get("merges", {}),
    )
