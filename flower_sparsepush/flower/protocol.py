"""What travels between the ServerApp and the ClientApp: record keys, frames, round numbers, and the reading of
replies that trusts nothing. The one place both sides import from.

Rounds: the core counts rounds from 0 (``t``); Flower's ``server_round`` is ``t + 1`` (:func:`core_round`). Every
message carries the core round ``t``.

Frames: ``pack_frames([(peer, bytes), ...])`` = repeated ``<uint32 peer><uint32 length><payload>``. ``peer`` is the
destination on the way out and the sender on the way in. Groups of frames from several rounds nest: the outer
``peer`` is the round and the payload a packed group.

Train message (server -> node), a RecordDict:

- ``config`` (ConfigRecord): the user's config plus ``round`` (t), ``token`` (the run's node-store token),
  ``acked`` (the last round whose outbox of this node the relay has routed; -1: none), ``restore`` (a checkpoint
  round the node must return to first; -1: none) and ``snapshot`` (keep a checkpoint copy after this round).
- ``inbox`` (ConfigRecord): ``frames`` (this round's messages for the node, ``(sender, bytes)``), ``bounced`` (its
  own messages the network returned, ``(destination, bytes)``), and, after a lost reply, ``redo`` / ``redo-bounced``:
  the frames handed to it in earlier rounds that it may not have absorbed, grouped by the round they were first
  handed. A node absorbs a group only when it has not finished that round, so nothing is absorbed twice.

Train reply (node -> server): ``out`` (ConfigRecord: ``round``, ``frames``, ``rejected`` = uint32 positions of the
handed messages it refused, counting ``redo`` groups first, and optional ``resent``: its outboxes of earlier rounds
the relay has not acknowledged, grouped by round) and ``metrics`` (MetricRecord: ``train_loss``, ``rejected``,
``y``).

Merge messages (a global merge after core round ``t``, docs/algorithm.md "Merges on Flower"): train messages whose
content has a ``merge`` ConfigRecord: ``phase`` (``give``, ``reduce``, ``take``), ``round`` (t), ``token``,
``acked``, ``restore``, ``snapshot``, and per phase:

- ``give``: ``frames`` / ``bounced`` / ``redo`` / ``redo-bounced`` (the messages in flight to the node, as in a
  train message; the batch is labelled ``MERGE_BATCH + t``, :func:`absorbs`) and ``merges`` (outcomes owed to it);
  reply ``merge``
  (``phase``, ``round``, ``frames``: ``(segment, message)`` contributions) and ``metrics`` (``y``);
- ``reduce``: ``orders``: groups ``(segment, [(sender, message)])`` of the segments the node owns; reply ``frames``:
  ``(segment, message)`` averages;
- ``take``: ``merges``: the merge's outcome; reply with no frames and ``y`` the weight the node then holds.

A train message may carry ``merges`` too (outcomes of merges the node missed or did not confirm). An outcome is
packed as frames: 0 = round (uint32), 1 = participants (uint32s), 2 = owners (uint32s), 3 = the averages (present
unless the merge was called off).

Evaluate message: ``config`` (``round``, ``token``, ``restore``, ``acked``); reply ``model`` (ArrayRecord ``z``) and
``metrics`` (``acc``, ``loss``, ``y``, and optional ``y_pending`` (weight in outboxes not yet acknowledged),
``done`` (the last round the node finished), ``absorbed`` (the round of the merge whose give batch it absorbed
last) and ``val_acc`` (on the validation split, when the run holds one out)).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_sparsepush.core.guard import BadReply
from flower_sparsepush.core.merge_relay import Outcome

_FRAME = struct.Struct("<II")
FRAME_BYTES = _FRAME.size  # the header of one packed frame: (peer or round, length)
Frames = list[tuple[int, bytes]]

# record and field names
CONFIG, INBOX, OUT, METRICS, MODEL, INFO, MERGE = "config", "inbox", "out", "metrics", "model", "info", "merge"
MERGE_PHASES = ("give", "reduce", "take")
MERGE_BATCH = 2**31  # the label of the batch handed in the give phase of the merge after round t: MERGE_BATCH + t


def absorbs(label: int, done: int, absorbed: int) -> bool:
    """Whether a node that finished round ``done``, and absorbed the give batch of the merge after round
    ``absorbed``, absorbs a batch labelled ``label`` that is handed to it (again)."""
    return label - MERGE_BATCH > absorbed if label >= MERGE_BATCH else label > done


TRAIN_REPLY = {OUT: ("round", "frames", "rejected"), METRICS: ("train_loss", "rejected", "y")}
TRAIN_REPLY_OPTIONAL = {OUT: ("resent",), METRICS: ()}
EVAL_OPTIONAL = ("y_pending", "done", "absorbed", "val_acc")


def core_round(server_round: int) -> int:
    """The core's 0-based round of Flower's 1-based ``server_round``."""
    return server_round - 1


def pack_frames(frames: Frames) -> bytes:
    """``[(peer, payload)]`` -> one buffer."""
    return b"".join(_FRAME.pack(p, len(d)) + d for p, d in frames)


def unpack_frames(buf: bytes) -> Frames:
    """Inverse of :func:`pack_frames`; raises ValueError on a truncated buffer."""
    out, pos, mv = [], 0, memoryview(buf)
    while pos < len(buf):
        if pos + _FRAME.size > len(buf):
            raise ValueError("truncated frame header")
        peer, n = _FRAME.unpack_from(buf, pos)
        pos += _FRAME.size
        if pos + n > len(buf):
            raise ValueError("truncated frame payload")
        out.append((peer, bytes(mv[pos : pos + n])))
        pos += n
    return out


def pack_groups(groups: list[tuple[int, Frames]]) -> bytes:
    """``[(round, frames)]`` -> one buffer (frames of several rounds)."""
    return pack_frames([(r, pack_frames(f)) for r, f in groups])


def unpack_groups(buf: bytes) -> list[tuple[int, Frames]]:
    return [(r, unpack_frames(g)) for r, g in unpack_frames(buf)]


def positions(buf: bytes) -> list[int]:
    return np.frombuffer(buf, dtype="<u4").tolist()


def pack_positions(pos: list[int]) -> bytes:
    return np.array(pos, dtype="<u4").tobytes()


# --------------------------------------------------------------------------- train


@dataclass
class TrainOrder:
    """A train message as the node reads it."""

    round: int
    inbox: Frames
    bounced: Frames
    redo: list[tuple[int, Frames]] = field(default_factory=list)
    redo_bounced: list[tuple[int, Frames]] = field(default_factory=list)
    token: str = ""
    acked: int = -1
    restore: int = -1
    snapshot: bool = False
    merges: list[Outcome] = field(default_factory=list)


def train_content(order: TrainOrder, config: dict | None = None) -> RecordDict:
    cfg = ConfigRecord(dict(config or {}))
    cfg.update(
        {
            "round": order.round,
            "token": order.token,
            "acked": order.acked,
            "restore": order.restore,
            "snapshot": order.snapshot,
        }
    )
    box = {"frames": pack_frames(order.inbox), "bounced": pack_frames(order.bounced)}
    if order.redo:
        box["redo"] = pack_groups(order.redo)
    if order.redo_bounced:
        box["redo-bounced"] = pack_groups(order.redo_bounced)
    if order.merges:
        box["merges"] = pack_outcomes(order.merges)
    return RecordDict({CONFIG: cfg, INBOX: ConfigRecord(box)})


def read_train(content: RecordDict) -> TrainOrder:
    cfg, box = content[CONFIG], content[INBOX]
    return TrainOrder(
        round=int(cfg["round"]),
        inbox=unpack_frames(box["frames"]),
        bounced=unpack_frames(box["bounced"]) if "bounced" in box else [],
        redo=unpack_groups(box["redo"]) if "redo" in box else [],
        redo_bounced=unpack_groups(box["redo-bounced"]) if "redo-bounced" in box else [],
        token=str(cfg.get("token", "")),
        acked=int(cfg.get("acked", -1)),
        restore=int(cfg.get("restore", -1)),
        snapshot=bool(cfg.get("snapshot", False)),
        merges=unpack_outcomes(box["merges"]) if "merges" in box else [],
    )


@dataclass(frozen=True)
class TrainReply:
    """A checked train reply: this round's outbox, the positions refused, earlier outboxes resent, the loss."""

    round: object
    frames: Frames
    rejected: list[int]
    resent: list[tuple[int, Frames]]
    loss: float


def train_reply_content(
    rnd: int, frames: Frames, rejected: list[int], resent: list[tuple[int, Frames]], loss: float, y: float
) -> RecordDict:
    out = {"round": rnd, "frames": pack_frames(frames), "rejected": pack_positions(rejected)}
    if resent:
        out["resent"] = pack_groups(resent)
    metrics = {"train_loss": loss, "rejected": len(rejected), "y": float(y)}
    return RecordDict({OUT: ConfigRecord(out), METRICS: MetricRecord(metrics)})


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def reply_bytes(content: object) -> int:
    """The bytes of a train reply's ``out.frames``, ``out.resent`` and ``out.rejected``, read without unpacking
    anything (0 for what is missing or not bytes: :func:`read_train_reply` refuses that)."""
    try:
        out = content[OUT]
        fields = [out.get(k) for k in ("frames", "resent", "rejected")]
    except (KeyError, TypeError, AttributeError):
        return 0
    return sum(len(v) for v in fields if isinstance(v, bytes))


def read_train_reply(content: object) -> TrainReply:
    """Raises :class:`BadReply` (kind ``schema``) unless the reply has exactly the records and fields of
    :data:`TRAIN_REPLY` (plus those of :data:`TRAIN_REPLY_OPTIONAL`), with their types."""
    if not isinstance(content, RecordDict):
        raise BadReply("schema", f"the reply content is {type(content).__name__}, not a RecordDict")
    if sorted(content.keys()) != sorted(TRAIN_REPLY):
        raise BadReply("schema", f"records {sorted(content.keys())}, expected {sorted(TRAIN_REPLY)}")
    out, metrics = content[OUT], content[METRICS]
    if not isinstance(out, ConfigRecord) or not isinstance(metrics, MetricRecord):
        raise BadReply("schema", "'out' must be a ConfigRecord and 'metrics' a MetricRecord")
    for name, record in ((OUT, out), (METRICS, metrics)):
        need, may = set(TRAIN_REPLY[name]), set(TRAIN_REPLY_OPTIONAL[name])
        if not need <= set(record.keys()) <= need | may:
            raise BadReply("schema", f"'{name}' has fields {sorted(record.keys())}, expected {sorted(need)}")
    if not all(_number(metrics[k]) for k in TRAIN_REPLY[METRICS]):
        raise BadReply("schema", "a 'metrics' field is not a number")
    frames, rejected, resent = out["frames"], out["rejected"], out.get("resent", b"")
    if not all(isinstance(b, bytes) for b in (frames, rejected, resent)) or len(rejected) % 4:
        raise BadReply("schema", "'out.frames' / 'out.resent' must be bytes and 'out.rejected' uint32 positions")
    try:
        frames, groups = unpack_frames(frames), unpack_groups(resent)
    except ValueError as err:
        raise BadReply("schema", f"'out.frames' or 'out.resent': {err}") from None
    return TrainReply(out["round"], frames, positions(rejected), groups, float(metrics["train_loss"]))


# --------------------------------------------------------------------------- merges

_ROUND = struct.Struct("<I")


def pack_outcomes(outcomes: list[Outcome]) -> bytes:
    blobs = []
    for o in outcomes:
        parts = [(0, _ROUND.pack(o.round)), (1, pack_positions(o.participants)), (2, pack_positions(o.owners))]
        if o.averages is not None:
            parts.append((3, pack_frames(o.averages)))
        blobs.append((len(blobs), pack_frames(parts)))
    return pack_frames(blobs)


def unpack_outcomes(buf: bytes) -> list[Outcome]:
    out = []
    for _, blob in unpack_frames(buf):
        parts = dict(unpack_frames(blob))
        avgs = unpack_frames(parts[3]) if 3 in parts else None
        out.append(Outcome(_ROUND.unpack(parts[0])[0], positions(parts[1]), positions(parts[2]), avgs))
    return out


@dataclass
class MergeOrder:
    """A merge message as the node reads it (see the module)."""

    phase: str
    round: int
    token: str = ""
    acked: int = -1
    restore: int = -1
    snapshot: bool = False
    inbox: Frames = field(default_factory=list)
    bounced: Frames = field(default_factory=list)
    redo: list[tuple[int, Frames]] = field(default_factory=list)
    redo_bounced: list[tuple[int, Frames]] = field(default_factory=list)
    orders: list[tuple[int, Frames]] = field(default_factory=list)
    merges: list[Outcome] = field(default_factory=list)


def merge_content(order: MergeOrder, config: dict | None = None) -> RecordDict:
    head = {"phase": order.phase, "round": order.round, "token": order.token, "acked": order.acked,
            "restore": order.restore, "snapshot": order.snapshot}  # fmt: skip
    body = {"frames": pack_frames(order.inbox), "bounced": pack_frames(order.bounced)}
    body |= {"redo": pack_groups(order.redo), "redo-bounced": pack_groups(order.redo_bounced)}
    body |= {"orders": pack_groups(order.orders), "merges": pack_outcomes(order.merges)}
    return RecordDict({CONFIG: ConfigRecord(dict(config or {})), MERGE: ConfigRecord(head | body)})


def read_merge(content: RecordDict) -> MergeOrder:
    m = content[MERGE]
    return MergeOrder(
        phase=str(m["phase"]),
        round=int(m["round"]),
        token=str(m["token"]),
        acked=int(m["acked"]),
        restore=int(m["restore"]),
        snapshot=bool(m["snapshot"]),
        inbox=unpack_frames(m["frames"]),
        bounced=unpack_frames(m["bounced"]),
        redo=unpack_groups(m["redo"]),
        redo_bounced=unpack_groups(m["redo-bounced"]),
        orders=unpack_groups(m["orders"]),
        merges=unpack_outcomes(m["merges"]),
    )


@dataclass(frozen=True)
class MergeReply:
    """A merge reply whose form was checked: its phase, round, ``(segment, message)`` frames and the node's weight."""

    phase: str
    round: int
    frames: Frames
    y: float


def merge_reply_content(phase: str, rnd: int, frames: Frames, y: float) -> RecordDict:
    out = {"phase": phase, "round": rnd, "frames": pack_frames(frames)}
    return RecordDict({MERGE: ConfigRecord(out), METRICS: MetricRecord({"y": float(y)})})


def read_merge_reply(content: object, phase: str, rnd: int) -> MergeReply:
    """Raises :class:`BadReply` unless the reply is a merge reply of ``phase`` for the merge after round ``rnd``:
    records ``merge`` (``phase``, ``round``, ``frames``) and ``metrics`` (``y``)."""
    if not isinstance(content, RecordDict) or sorted(content.keys()) != sorted([MERGE, METRICS]):
        keys = sorted(content.keys()) if isinstance(content, RecordDict) else type(content).__name__
        raise BadReply("schema", f"a merge reply has records {keys}, expected {sorted([MERGE, METRICS])}")
    m, metrics = content[MERGE], content[METRICS]
    if not isinstance(m, ConfigRecord) or sorted(m.keys()) != ["frames", "phase", "round"]:
        raise BadReply("schema", "'merge' must be a ConfigRecord with the fields frames, phase, round")
    if not isinstance(metrics, MetricRecord) or list(metrics.keys()) != ["y"] or not _number(metrics["y"]):
        raise BadReply("schema", "'metrics' must be a MetricRecord with the one number y")
    if m["phase"] != phase or m["round"] != rnd:
        raise BadReply("round", f"a merge reply for {m['phase']!r} after round {m['round']!r}, asked {phase!r}/{rnd}")
    if not isinstance(m["frames"], bytes):
        raise BadReply("schema", "'merge.frames' must be bytes")
    try:
        frames = unpack_frames(m["frames"])
    except ValueError as err:
        raise BadReply("schema", f"'merge.frames': {err}") from None
    return MergeReply(phase, rnd, frames, float(metrics["y"]))


# --------------------------------------------------------------------------- evaluate


def eval_content(rnd: int, token: str, restore: int = -1, acked: int = -1, config: dict | None = None) -> RecordDict:
    cfg = ConfigRecord(dict(config or {}))
    cfg.update({"round": rnd, "token": token, "restore": restore, "acked": acked})
    return RecordDict({CONFIG: cfg})


def eval_reply_content(
    z: np.ndarray,
    acc: float,
    loss: float,
    y: float,
    y_pending: float,
    done: int,
    absorbed: int = -1,
    val_acc: float | None = None,
) -> RecordDict:
    metrics = {"acc": acc, "loss": loss, "y": float(y), "y_pending": float(y_pending), "done": int(done)}
    metrics["absorbed"] = int(absorbed)
    if val_acc is not None:  # the run holds out a validation split (val-split > 0)
        metrics["val_acc"] = float(val_acc)
    return RecordDict({MODEL: ArrayRecord({"z": Array(z)}), METRICS: MetricRecord(metrics)})


@dataclass(frozen=True)
class EvalReply:
    z: np.ndarray
    acc: float
    y: float
    y_pending: float
    done: int
    absorbed: int = -1
    val_acc: float = float("nan")  # NaN: the run has no validation split


def read_eval_reply(content: object, dim: int | None) -> EvalReply:
    """Raises :class:`BadReply` unless it has the ``model.z`` array (finite, one entry per model parameter) and the
    ``metrics`` ``acc`` (in [0, 1]) and ``y`` (finite); ``y_pending``, ``done`` and ``val_acc`` (in [0, 1]) are
    optional."""
    try:
        model, metrics = content[MODEL], content[METRICS]
        z, acc, y = model["z"].numpy(), metrics["acc"], metrics["y"]
        y_pending, done = metrics.get("y_pending", 0.0), metrics.get("done", -1)
        absorbed = metrics.get("absorbed", -1)
        val_acc = metrics.get("val_acc", float("nan"))
    except (KeyError, TypeError, ValueError, AttributeError, OSError, EOFError) as err:
        raise BadReply(
            "schema", f"evaluate reply without a readable model.z, metrics.acc and metrics.y: {err!r}"
        ) from None
    if not (isinstance(z, np.ndarray) and z.ndim == 1 and z.dtype.kind == "f" and np.isfinite(z).all()):
        raise BadReply("schema", "model.z is not a finite 1-D float array")
    if dim is not None and len(z) != dim:
        raise BadReply("schema", f"model.z has {len(z)} entries, the model has {dim}")
    if not (_number(acc) and 0 <= acc <= 1 and _number(y) and np.isfinite(y)):
        raise BadReply("schema", f"metrics acc={acc!r} (must be in [0, 1]) or y={y!r} (must be finite)")
    if not (_number(y_pending) and np.isfinite(y_pending) and y_pending >= 0 and _number(done) and _number(absorbed)):
        raise BadReply("schema", f"metrics y_pending={y_pending!r} (must be >= 0), done or absorbed not a number")
    if not (_number(val_acc) and (val_acc != val_acc or 0 <= val_acc <= 1)):
        raise BadReply("schema", f"metrics val_acc={val_acc!r} (must be in [0, 1])")
    return EvalReply(
        z.astype(np.float64), float(acc), float(y), float(y_pending), int(done), int(absorbed), float(val_acc)
    )


def query_reply_content(partition_id: int) -> RecordDict:
    return RecordDict({INFO: ConfigRecord({"partition-id": partition_id})})
