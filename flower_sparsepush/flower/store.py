"""Node store: each node's state kept where its node runs, in a file, outside Flower's per-message context.

Flower passes a ClientApp's ``context.state`` along with every message (pickled to and from the Ray actor in a
simulation), so a push-sum state kept there (x, momentum, one reference per edge: about 10 model-sized arrays) is
copied several times per round. The store keeps the state in files per node and ``context.state`` holds only what
identifies and checks it (:class:`Stamp`: run token, node, round, checksum).

Format: safetensors (a flat ``{name: tensor}`` dict, with run token, node, round and checksum in its metadata): a
JSON header and the raw bytes of each tensor, nothing executable to load, readable by any safetensors tool. The store
writes it straight from the tensors' memory over the node's older slot, in place (:func:`write_state`), and reads it
back through the safetensors library with one read (only when this process's cache misses). What a save costs, and
what the ``torch.save`` + rename it replaced cost, is measured by ``sparsepush bench --only store``
(results/bench.md).

Two slots: ``node-<id>.0.safetensors`` and ``node-<id>.1.safetensors``. Each save overwrites the slot that does not
hold the latest state, so a process killed while writing leaves the previous state whole in the other slot (the torn
slot fails its checksum or its header and is passed over). No rename, no ``fsync``: this survives a crashed process,
not a machine that loses power (docs/node-store.md).

Where the files live: ``<root>/<run token>/``; ``root`` is the run-config key ``node-store`` when it is a path, else
``$SPARSEPUSH_NODE_STORE``, else ``~/.cache/flower_sparsepush/node-store``. A simulation's Ray actors share this
machine's filesystem; in a deployment each SuperNode host keeps its own nodes' files. A Ray cluster of several
machines needs a shared filesystem at ``root`` (the same node may run on any machine), or ``node-store=context``,
which keeps the whole state in ``context.state``.

Checkpoints: ``snapshot(round)`` writes the node's current state to ``node-<id>.r<round>.safetensors``; a resumed
run restores it.

Each process keeps the states it wrote last in memory (a cache keyed by run and node, checked against the stamp), so
a node served twice in a row by the same process is not read back from disk.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

ENV = "SPARSEPUSH_NODE_STORE"
CONTEXT = "context"  # node-store value: keep the whole state in context.state
SUFFIX = ".safetensors"
SLOTS = (0, 1)


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


def _own(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (what :func:`write_state` writes byte for byte)."""
    return {k: v.detach().cpu().contiguous() for k, v in flat.items()}


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}  # fmt: skip


def _meta(stamp: Stamp) -> dict[str, str]:
    return {"token": stamp.token, "node": str(stamp.node), "round": str(stamp.round), "checksum": str(stamp.checksum)}


def _stamp(head: bytes) -> Stamp:
    """The stamp in a safetensors file's ``__metadata__`` (``head``: the file from its start, at least through its
    header: an 8-byte little-endian length, then JSON); the inverse of :func:`_meta`. Raises on a malformed header."""
    n = int.from_bytes(head[:8], "little")
    if not 0 < n < 1 << 24 or len(head) < 8 + n:
        raise ValueError(f"header length {n} does not fit the file")
    meta = json.loads(head[8 : 8 + n])["__metadata__"]
    return Stamp(meta["token"], int(meta["node"]), int(meta["round"]), int(meta["checksum"]))


def write_state(path: Path, stamp: Stamp, flat: dict[str, torch.Tensor]) -> None:
    """Write ``flat`` as a safetensors file over ``path``, in place (no truncation to zero and no rename: ext4 flushes
    the file to disk on both).

    The layout is the safetensors format (an 8-byte little-endian header length, a JSON header of dtype, shape and
    byte offsets per tensor plus ``__metadata__``, padded with spaces to 8 bytes, then the tensors' bytes), written
    straight from each tensor's memory: ``safetensors.torch.save`` builds the file in two in-memory copies first,
    5 ms for a 4 MB state on this machine against 0.3 ms here (``sparsepush bench --only store``). Reading goes
    through the library (``safetensors.torch.load``), which checks the header, dtypes and offsets."""
    header: dict[str, object] = {"__metadata__": _meta(stamp)}
    items = sorted(flat.items())
    offset = 0
    for name, t in items:
        if t.dtype not in _DTYPES:
            raise TypeError(f"node state entry {name!r} has dtype {t.dtype}, which the node store does not keep")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, t in items:
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)
        f.truncate()


class NodeStore:
    """Files of node states under ``root/<token>``, with a per-process cache of ``cache_bytes`` at most.

    The cache holds states this process saved; a load that hits it hands the tensors over (no copy: the caller
    updates its state in place and saves it again), so a state is in the cache or with its caller, never both.
    """

    _cache: OrderedDict[tuple[str, str, int], tuple[Stamp, dict[str, torch.Tensor]]] = OrderedDict()
    _slot: dict[tuple[str, str, int], int] = {}  # the slot that holds each node's latest state, as last seen here
    cache_bytes = 1 << 30
    _cached_bytes = 0  # bytes of the tensors in _cache

    def __init__(self, root: str | Path | None, token: str) -> None:
        if not token or "/" in token or token.startswith("."):
            raise ValueError(f"a node-store run token must be a plain name, got {token!r}")
        self.root = Path(root).expanduser() if root else default_root()
        self.token = token
        self.dir = self.root / token

    def path(self, node: int, slot: int = 0) -> Path:
        """The file of one of the node's two slots."""
        return self.dir / f"node-{node}.{slot}{SUFFIX}"

    def snapshot_path(self, node: int, rnd: int) -> Path:
        return self.dir / f"node-{node}.r{rnd}{SUFFIX}"

    def _key(self, node: int) -> tuple[str, str, int]:
        return (str(self.dir), self.token, node)

    def save(self, node: int, rnd: int, flat: dict[str, torch.Tensor]) -> Stamp:
        """Write ``flat`` as node's state after round ``rnd`` over the slot that does not hold its latest state."""
        flat = _own(flat)
        stamp = Stamp(self.token, node, rnd, checksum(flat))
        key = self._key(node)
        current = self._slot.get(key)
        if current is None:  # this process has not seen the node: keep whichever slot holds its latest whole state
            latest = self._latest(node)
            current = latest[2] if latest else 1
        slot = 1 - current
        self.dir.mkdir(parents=True, exist_ok=True)
        write_state(self.path(node, slot), stamp, flat)
        self._slot[key] = slot
        self._remember(key, stamp, flat)
        return stamp

    def load(self, node: int, expect: Stamp | None = None) -> tuple[Stamp, dict[str, torch.Tensor]] | None:
        """The node's latest state, or None if it has none. With ``expect`` (the stamp ``context.state`` holds) the
        stored state must be that one or a later round of the same node (its process saved and then died before
        Flower kept the new stamp): a missing file, or an older or different one, raises :class:`StoreError`.
        The caller owns the tensors it gets."""
        key = self._key(node)
        hit = self._forget(key)
        if hit is not None and (expect is None or hit[0] == expect):
            return hit
        # the slot a header says is the expected state first, then later rounds: usually one file is read whole
        errors: list[StoreError] = []
        heads = self._heads(node, errors)
        if not heads and not errors:
            if expect is not None:
                raise StoreError(
                    f"node {node}: its state after round {expect.round} is not in {self.dir} (this process cannot "
                    f"see the file another one wrote: no shared filesystem?); set node-store to a shared path, "
                    f"or node-store=context to keep node state in Flower's context (docs/node-store.md)"
                )
            return None
        heads.sort(key=lambda h: (h[0] != expect, -h[0].round))
        for _, slot in heads:
            try:
                stamp, flat = self._read(self.path(node, slot), node)
            except StoreError as err:  # a torn slot: the other one may hold the state before it
                errors.append(err)
                continue
            if expect is not None and stamp != expect and stamp.round <= expect.round:
                raise StoreError(
                    f"node {node}: {self.dir} holds its state after round {stamp.round} ({stamp.checksum:08x}); the "
                    f"run expects round {expect.round} ({expect.checksum:08x}): another run or process wrote it; "
                    f"use another node-store folder per run"
                )
            # a state at a later round than expected is this node's own later state: the process that wrote it died
            # before Flower kept its context (a crash after the save); the relay's redo / resend protocol covers it
            self._slot[key] = slot
            return stamp, flat
        raise errors[0]

    def _heads(self, node: int, errors: list[StoreError]) -> list[tuple[Stamp, int]]:
        """(stamp its header states, slot) of the node's slots that name this run and node; unreadable headers go
        to ``errors``. Only the header is read (a few hundred bytes)."""
        out = []
        for slot in SLOTS:
            path = self.path(node, slot)
            try:
                with open(path, "rb") as f:
                    first = f.read(8)
                    stamp = _stamp(first + f.read(min(int.from_bytes(first, "little"), 1 << 24)))
            except FileNotFoundError:
                continue
            except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
                errors.append(StoreError(f"node {node}: {path} is not a readable node state ({err!r})"))
                continue
            if stamp.token == self.token and stamp.node == node:
                out.append((stamp, slot))
        return out

    def _latest(self, node: int) -> tuple[Stamp, dict[str, torch.Tensor], int] | None:
        """The node's latest whole state on disk and its slot, or None."""
        for _, slot in sorted(self._heads(node, []), key=lambda h: -h[0].round):
            try:
                return (*self._read(self.path(node, slot), node), slot)
            except StoreError:
                continue
        return None

    def _read(self, path: Path, node: int) -> tuple[Stamp, dict[str, torch.Tensor]]:
        try:
            data = path.read_bytes()
            flat = st_load(data)
            stamp = _stamp(data)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
            raise StoreError(f"node {node}: {path} is not a readable node state ({err})") from None
        if checksum(flat) != stamp.checksum:
            raise StoreError(f"node {node}: {path} fails its checksum (a damaged or partly written file)")
        return stamp, flat

    def snapshot(self, node: int, rnd: int) -> None:
        """Keep a copy of the node's current state as its checkpoint of round ``rnd``."""
        hit = self._cache.get(self._key(node))
        if hit is None:
            hit = self._latest(node)
            if hit is None:
                return
        path = self.snapshot_path(node, rnd)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        write_state(tmp, hit[0], hit[1])
        os.replace(tmp, path)  # a checkpoint is written once: the rename's flush is worth it here

    def restore(self, node: int, rnd: int) -> tuple[Stamp, dict[str, torch.Tensor]]:
        """The node's checkpoint of round ``rnd`` becomes its current state (its only slot); the caller owns it."""
        snap = self.snapshot_path(node, rnd)
        if not snap.exists():
            raise StoreError(
                f"node {node}: no checkpoint of round {rnd} in {self.dir}: the run cannot resume where this node "
                f"has no state (was node-store moved or cleaned?)"
            )
        stamp, flat = self._read(snap, node)
        key = self._key(node)
        self._forget(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_state(self.path(node, 0), stamp, flat)
        self.path(node, 1).unlink(missing_ok=True)  # a later state must not win over the restored one
        self._slot[key] = 0
        return stamp, flat

    def _remember(self, key: tuple[str, str, int], stamp: Stamp, flat: dict[str, torch.Tensor]) -> None:
        """Cache ``flat`` as the node's latest state; evict the least recently used beyond ``cache_bytes``. O(1) per
        call amortized: the total is kept, not summed over the cache (a process may serve thousands of nodes)."""
        self._forget(key)
        self._cache[key] = (stamp, flat)
        NodeStore._cached_bytes += _nbytes(flat)
        while NodeStore._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, (_, evicted) = self._cache.popitem(last=False)
            NodeStore._cached_bytes -= _nbytes(evicted)

    def _forget(self, key: tuple[str, str, int]) -> tuple[Stamp, dict[str, torch.Tensor]] | None:
        """Take a node's entry out of the cache (None if it has none)."""
        old = self._cache.pop(key, None)
        if old is not None:
            NodeStore._cached_bytes -= _nbytes(old[1])
        return old

    @classmethod
    def forget(cls) -> None:
        """Empty this process's cache (tests: a fresh process)."""
        cls._cache.clear()
        cls._slot.clear()
        cls._cached_bytes = 0
