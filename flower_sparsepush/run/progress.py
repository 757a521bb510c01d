"""Overall progress of long work: a line with a bar, elapsed time and an estimate of the time left, and a status file.

One class, three calls::

    from flower_sparsepush.run.progress import Progress

    prog = Progress(total=40, status_path="results/claims.status.json", label="claims", unit="rows", initial=12)
    for row in rows:
        ...  # the work
        prog.update(done, note=row_id)  # done = units finished so far (not an increment)
    prog.close()  # or: with Progress(...) as prog: ... (closes on exit)

``Progress(total, status_path=None, label="", *, unit="it", initial=0, stream=None, show=None, min_interval=5.0)``

- ``total``: units planned (rows, rounds, sections); ``initial``: units already done when this process starts (a
  resumed run), so that the estimate counts only the work done here.
- ``update(done, note="")``: ``done`` units are finished (an absolute count, clipped to ``[0, total]``); ``note``
  names what runs now. Returns the status dict. ``close(note=None)`` marks the work finished (``done`` stays as
  it was when the work stopped early, and the line then says "stopped"; ``note=None`` keeps the last note).
- The status file, written on every update and on close (atomically: a temporary file renamed over it, so a reader
  never sees half a file), is one small JSON object: ``label``, ``unit``, ``done``, ``total``, ``note``,
  ``elapsed_s``, ``eta_s`` (seconds left: ``(total - done) / rate`` with the rate measured since this object was
  made; ``null`` until a unit is done in this process), ``started`` and ``updated`` (local ISO times), ``finished`` and
  ``pid``. Read it from another terminal with ``cat``, ``watch cat`` or :func:`read_status`. A status file that
  cannot be written costs one warning on stderr, never the run.
- On a terminal (``stream``, default ``sys.stdout``, is a tty; ``show=True``/``False`` forces it) a line such as
  ``claims  30%|#######                 | 12/40 rows, elapsed 01:02:10, ETA 02:25:03  fashion_mnist/iid/sgp`` is
  printed on the first update, then at most every ``min_interval`` seconds, and always on close. Lines,
  not a redrawn bar: the runs print their own lines in between. The line is rendered by ``tqdm.format_meter``
  (tqdm comes with flwr-datasets and datasets).

:class:`StatusFollower` prints the same line for a status file that another process writes (the ServerApp of a
``flwr run`` or Deployment Engine run), for ``sparsepush train`` and ``deploy-local``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["STATUS_FILE", "Progress", "StatusFollower", "follow_run", "format_status", "read_status"]

STATUS_FILE = "status.json"  # the name used in a run's folder (<out-dir>/<run-name>/status.json)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def format_status(status: dict[str, Any]) -> str:
    """One terminal line for a status dict: label, percent, bar, done/total unit, elapsed, ETA, note."""
    from tqdm import tqdm

    done, total, eta = status["done"], status["total"], status.get("eta_s")
    left = total - done
    # format_meter derives "remaining" from a rate; give it the rate behind eta_s so both sides show the same estimate
    rate = left / eta if eta else None
    line = tqdm.format_meter(
        done,
        total,
        status["elapsed_s"],
        prefix=status.get("label", ""),
        unit=status.get("unit", "it"),
        rate=rate,
        initial=done if rate is None else 0,  # no estimate yet: a zero measured rate makes tqdm print "?"
        bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} {unit}, elapsed {elapsed}, ETA {remaining}",
        ascii=" #",
    )
    if status.get("finished"):  # closed: done, or stopped before the end
        line = line.split(", ETA")[0] + (", finished" if done >= total else ", stopped")
    note = status.get("note")
    return f"{line}  {note}" if note else line


def read_status(path: str | os.PathLike) -> dict[str, Any] | None:
    """The status dict in ``path``, or None when there is none (yet) or it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Overall progress of ``total`` units; see the module docstring for the status file and the terminal line."""

    def __init__(
        self,
        total: int,
        status_path: str | os.PathLike | None = None,
        label: str = "",
        *,
        unit: str = "it",
        initial: int = 0,
        stream: TextIO | None = None,
        show: bool | None = None,
        min_interval: float = 5.0,
    ) -> None:
        if int(total) < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total = int(total)
        self.path = Path(status_path) if status_path is not None else None
        self.label, self.unit = label, unit
        self.initial = self.done = min(max(int(initial), 0), self.total)
        self.note = ""
        self.stream = stream if stream is not None else sys.stdout
        self.show = _is_tty(self.stream) if show is None else show
        self.min_interval = min_interval
        self.t0 = time.time()
        self.finished = False
        self._printed_at: float | None = None
        self._warned = False
        self._write()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        """The current status dict (what the status file holds)."""
        now = time.time()
        elapsed = now - self.t0
        made = self.done - self.initial
        if self.finished or self.done >= self.total:
            eta: float | None = 0.0
        elif made > 0 and elapsed > 0:
            eta = (self.total - self.done) * elapsed / made
        else:
            eta = None
        return {
            "label": self.label,
            "unit": self.unit,
            "done": self.done,
            "total": self.total,
            "note": self.note,
            "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "started": _iso(self.t0),
            "updated": _iso(now),
            "finished": self.finished,
            "pid": os.getpid(),
        }

    def update(self, done: int, note: str = "") -> dict[str, Any]:
        """``done`` units are finished (absolute, not an increment); ``note`` says what runs now."""
        self.done = min(max(int(done), 0), self.total)
        self.note = note
        st = self._write()
        now = time.time()
        if self.show and (self._printed_at is None or now - self._printed_at >= self.min_interval):
            self._print(st)
        return st

    def close(self, note: str | None = None) -> dict[str, Any]:
        """Mark the work finished (idempotent); the terminal gets a last line."""
        if self.finished:
            return self.status()
        self.finished = True
        if note is not None:
            self.note = note
        st = self._write()
        if self.show:
            self._print(st)
        return st

    def _print(self, st: dict[str, Any]) -> None:
        self._printed_at = time.time()
        print(format_status(st), file=self.stream, flush=True)

    def _write(self) -> dict[str, Any]:
        st = self.status()
        if self.path is None:
            return st
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(st) + "\n")
            os.replace(tmp, self.path)
        except OSError as err:
            if not self._warned:
                self._warned = True
                print(f"warning: cannot write the status file {self.path}: {err}", file=sys.stderr)
        return st


def follow_run(cfg: dict[str, Any]) -> StatusFollower:
    """A follower of the status file of run config ``cfg`` (``<out-dir>/<run-name>/status.json``); one that shows
    nothing when the config names no run folder (a raw config that ``flwr run`` will refuse)."""
    if not cfg.get("out-dir") or not cfg.get("run-name"):
        return StatusFollower(None)
    return StatusFollower(Path(str(cfg["out-dir"])) / str(cfg["run-name"]) / STATUS_FILE)


class StatusFollower:
    """Print the line of a status file that another process writes, when it changes (at most every
    ``min_interval`` seconds, and always when it reports the work finished). Files older than this object are
    ignored (a previous run's). Call :meth:`poll` from a wait loop; nothing is printed unless ``stream`` is a tty
    or ``show`` is True."""

    def __init__(
        self,
        status_path: str | os.PathLike | None,
        stream: TextIO | None = None,
        show: bool | None = None,
        min_interval: float = 5.0,
    ) -> None:
        self.path = Path(status_path) if status_path is not None else None
        self.stream = stream if stream is not None else sys.stdout
        self.show = _is_tty(self.stream) if show is None else show
        self.min_interval = min_interval
        self.t0 = time.time()
        self.last: dict[str, Any] | None = None
        self._printed_at: float | None = None

    def poll(self) -> dict[str, Any] | None:
        """Read the status file; print its line if it is new, changed and due. Returns the status (or None)."""
        if self.path is None:
            return None
        try:
            if self.path.stat().st_mtime < self.t0 - 1:
                return None
        except OSError:
            return None
        st = read_status(self.path)
        if st is None:
            return None
        key = (st.get("done"), st.get("finished"), st.get("note"))
        changed = self.last is None or key != (self.last.get("done"), self.last.get("finished"), self.last.get("note"))
        now = time.time()
        due = self._printed_at is None or now - self._printed_at >= self.min_interval or st.get("finished")
        if self.show and changed and due:
            self._printed_at = now
            print(format_status(st), file=self.stream, flush=True)
        if changed and due:
            self.last = st
        return st
