"""Node store: each node's state kept where its node runs, in a file, outside Flower's per-message context.

Flower passes a ClientApp's ``context.state`` along with every message (pickled to and from the Ray actor in a
simulation), so a push-sum state kept there (x, momentum, one reference per edge: about 10 model-sized arrays) is
copied several times per round. The store keeps the state in one file per node and ``context.state`` holds only
what identifies and checks it (:class:`Stamp`: run token, node, round, checksum).

Format: ``torch.save`` of a flat ``{name: tensor}`` dict, read back with ``torch.load(mmap=True,
weights_only=True)``, which maps the file instead of copying it and never unpickles code. Measured on this machine
for a ResNet-20 state (10 arrays of 270k float32): write + mapped read 20 ms, ``np.savez`` 28 ms, and one
pickle round trip of the same state as a Flower ``ArrayRecord`` 87 ms (one direction of what ``context.state``
costs per message). So the store needs no new dependency. Writes go to a temporary file that is renamed, so a
process killed mid-write leaves the previous state.

Where the files live: ``<root>/<run token>/node-<id>.pt``; ``root`` is the run-config key ``node-store`` when it
is a path, else ``$SPARSEPUSH_NODE_STORE``, else ``~/.cache/flower_sparsepush/node-store``. A simulation's Ray
actors share this machine's filesystem; in a deployment each SuperNode host keeps its own nodes' files. A Ray
cluster of several machines needs a shared filesystem at ``root`` (the same node may run on any machine), or
``node-store=context``, which keeps the whole state in ``context.state`` as before.

Checkpoints: ``snapshot(round)`` copies a node's file to ``node-<id>.r<round>.pt``; a resumed run restores it.

Each process keeps the states it wrote last in memory (a small cache keyed by run, node, round and checksum), so a
node served twice in a row by the same process is not read back from disk.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

ENV = "SPARSEPUSH_NODE_STORE"
CONTEXT = "context"  # node-store value: keep the whole state in context.state


class StoreError(RuntimeError):
    """A node's stored state is missing or is not the one the run expects."""


@dataclass(frozen=True)
class Stamp:
    """What identifies one stored state: the run token, the node, the round it is after, and a checksum."""

    token: str
    node: int
    round: int
    checksum: int


def default_root() -> Path:
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path("~/.cache/flower_sparsepush/node-store").expanduser()


def checksum(flat: dict[str, torch.Tensor]) -> int:
    """CRC-32 over the names, dtypes, shapes and bytes of a flat state (order-independent of dict order)."""
    crc = 0
    for name in sorted(flat):
        t = flat[name].detach().contiguous()
        crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.cpu().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def _nbytes(flat: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in flat.values())


class NodeStore:
    """Files of node states under ``root/<token>``, with a per-process cache of ``cache_bytes`` at most."""

    _cache: OrderedDict[tuple[str, str, int], tuple[Stamp, dict[str, torch.Tensor]]] = OrderedDict()
    cache_bytes = 1 << 30
    _cached_bytes = 0  # bytes of the tensors in _cache

    def __init__(self, root: str | Path | None, token: str) -> None:
        if not token or "/" in token or token.startswith("."):
            raise ValueError(f"a node-store run token must be a plain name, got {token!r}")
        self.root = Path(root).expanduser() if root else default_root()
        self.token = token
        self.dir = self.root / token

    def path(self, node: int, snapshot: int | None = None) -> Path:
        return self.dir / (f"node-{node}.pt" if snapshot is None else f"node-{node}.r{snapshot}.pt")

    def save(self, node: int, rnd: int, flat: dict[str, torch.Tensor]) -> Stamp:
        """Write ``flat`` as node's state after round ``rnd``; returns its :class:`Stamp`."""
        flat = {k: v.detach().contiguous() for k, v in flat.items()}
        stamp = Stamp(self.token, node, rnd, checksum(flat))
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(node)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save({"flat": flat, "round": rnd, "checksum": stamp.checksum}, tmp)
        os.replace(tmp, path)
        self._remember(stamp, flat)
        return stamp

    def load(self, node: int, expect: Stamp | None = None) -> tuple[Stamp, dict[str, torch.Tensor]] | None:
        """The node's latest state, or None if it has none. With ``expect`` (the stamp ``context.state`` holds) the
        stored state must be that one or a later round of the same node (its process saved and then died before
        Flower kept the new stamp): a missing file, or an older or different one, raises :class:`StoreError`."""
        key = (str(self.dir), self.token, node)
        hit = self._cache.get(key)
        if hit is not None and (expect is None or hit[0] == expect):
            self._cache.move_to_end(key)
            return hit[0], {k: v.clone() for k, v in hit[1].items()}  # the caller updates its state in place
        path = self.path(node)
        if not path.exists():
            if expect is not None:
                raise StoreError(
                    f"node {node}: its state after round {expect.round} is not in {path} (this process cannot "
                    f"see the file another one wrote: no shared filesystem?); set node-store to a shared path, "
                    f"or node-store=context to keep node state in Flower's context (docs/node-store.md)"
                )
            return None
        stamp, flat = self._read(path, node)
        if expect is not None and stamp != expect and stamp.round <= expect.round:
            # a file at a later round is this node's own later state: the process that wrote it died before Flower
            # kept its context (a crash after the save); the relay's redo / resend protocol covers that round
            raise StoreError(
                f"node {node}: {path} holds the state after round {stamp.round} (checksum {stamp.checksum:08x}), "
                f"the run expects round {expect.round} ({expect.checksum:08x}): another run or process wrote it; "
                f"use another node-store folder per run"
            )
        self._remember(stamp, flat)
        return stamp, {k: v.clone() for k, v in flat.items()}

    def _read(self, path: Path, node: int, rnd_name: str = "") -> tuple[Stamp, dict[str, torch.Tensor]]:
        try:
            blob = torch.load(path, mmap=True, weights_only=True)
            flat, rnd, crc = blob["flat"], int(blob["round"]), int(blob["checksum"])
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            raise StoreError(f"node {node}: {path} is not a readable node state ({err})") from None
        if checksum(flat) != crc:
            raise StoreError(f"node {node}: {path} fails its checksum (a damaged or partly written file)")
        return Stamp(self.token, node, rnd, crc), flat

    def snapshot(self, node: int, rnd: int) -> None:
        """Keep a copy of the node's current file as its checkpoint of round ``rnd``."""
        src = self.path(node)
        if src.exists():
            tmp = self.path(node, rnd).with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, self.path(node, rnd))

    def restore(self, node: int, rnd: int) -> tuple[Stamp, dict[str, torch.Tensor]]:
        """The node's checkpoint of round ``rnd`` becomes its current state (the file and the cache)."""
        snap = self.path(node, rnd)
        if not snap.exists():
            raise StoreError(
                f"node {node}: no checkpoint of round {rnd} in {self.dir}: the run cannot resume where this node "
                f"has no state (was node-store moved or cleaned?)"
            )
        stamp, flat = self._read(snap, node)
        return self.save(node, stamp.round, {k: v.clone() for k, v in flat.items()}), flat

    def _remember(self, stamp: Stamp, flat: dict[str, torch.Tensor]) -> None:
        """Cache ``flat`` as the node's latest state; evict the least recently used beyond ``cache_bytes``. O(1) per
        call amortized: the total is kept, not summed over the cache (a process may serve thousands of nodes)."""
        key = (str(self.dir), self.token, stamp.node)
        old = self._cache.pop(key, None)
        if old is not None:
            NodeStore._cached_bytes -= _nbytes(old[1])
        self._cache[key] = (stamp, flat)
        NodeStore._cached_bytes += _nbytes(flat)
        while NodeStore._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, (_, evicted) = self._cache.popitem(last=False)
            NodeStore._cached_bytes -= _nbytes(evicted)

    @classmethod
    def forget(cls) -> None:
        """Empty this process's cache (tests: a fresh process)."""
        cls._cache.clear()
        cls._cached_bytes = 0
