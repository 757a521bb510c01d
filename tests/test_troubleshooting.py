"""README's Troubleshooting section: each error it lists is produced here, as a new user would meet it, and the
README quotes the start of the message that the code prints (so the two cannot drift apart)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flower_sparsepush.cli import main
from flower_sparsepush.learn import data

ROOT = Path(__file__).resolve().parent.parent


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Troubleshooting\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README has no Troubleshooting section"
    return m.group(1)


def _quoted(fragment: str) -> None:
    assert fragment in _section(), f"README Troubleshooting does not quote {fragment!r}"


def test_data_missing(tmp_path, monkeypatch, capsys):
    """`sparsepush train` on a machine without Fashion-MNIST (or with the files elsewhere): exit 2 before anything
    starts, one message that says what was looked for, where, what those folders hold, and the fix."""
    real = data.search_dirs
    monkeypatch.setattr(data, "search_dirs", lambda name, path=None: real(name, path)[:1])  # hide the machine's copy
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "fashion-mnist.zip").write_bytes(b"PK")
    rc = main(["train", "--data-dir", str(folder), "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("error: run-config dataset='fashion_mnist': fashion_mnist not found. Looked for the four IDX")
    assert f"{folder}: holds fashion-mnist.zip" in err and "sudo apt-get install -y dataset-fashion-mnist" in err
    assert not (tmp_path / "runs").exists()
    _quoted("fashion_mnist not found. Looked for the four IDX files")


def test_port_in_use(tmp_path, capsys):
    """`sparsepush deploy-local --port P` while another process listens on P: stops before starting any process."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["deploy-local", "--port", str(port), "--out-dir", str(tmp_path), "--log-dir", str(tmp_path / "l")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.startswith(f"error: 127.0.0.1:{port} is already in use by another process")
    assert not list((tmp_path / "l").glob("*.log"))  # no SuperLink or SuperNode was started
    _quoted("is already in use by another process")


@pytest.mark.parametrize(
    "argv, start",
    [
        (["train", "--strategy", "sgp", "--compressor", "topk:0.01"], "error: run-config compressor='topk:0.01': "),
        (["deploy-local", "--gamma", "1.5"], "error: run-config gamma='1.5': must be in (0, 1]"),
    ],
)
def test_bad_config_stops_the_run_before_it_starts(tmp_path, capsys, argv, start):
    rc = main([*argv, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written
    _quoted("error: run-config compressor='topk:0.01': strategy sgp uses compressor=none")


def test_bad_key_in_process_entry_point(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "flower_sparsepush.run.inprocess", "gama=0.1", f"out-dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: unknown run-config key 'gama'; did you mean 'gamma'?")
    _quoted("error: unknown run-config key 'gama'; did you mean 'gamma'?")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_python_311_missing(tmp_path):
    """`make setup` (and so `make demo` / `make test`) without the interpreter it needs: one line, exit 2."""
    res = subprocess.run(
        ["make", "-s", "setup", "PYTHON=python3.11-not-here", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "error: python3.11-not-here not found" in out
    assert not (tmp_path / "venv").exists()
    _quoted("not found; install Python 3.11 or run 'make PYTHON=python3 ...'")
