"""Every entry point answers --help (exit 0) with its keys or flags and their defaults, one line each, generated from
config.KEYS: ``sparsepush <sub>``, ``python -m flower_sparsepush.run.inprocess`` and ``make help``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flower_sparsepush.cli import build_parser, main
from flower_sparsepush.deploy.local import DEPLOY_DEFAULTS
from flower_sparsepush.run import config
from flower_sparsepush.run.config import KEYS, field_name, validate
from flower_sparsepush.run.keyhelp import keys_text

ROOT = Path(__file__).resolve().parent.parent


def _subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _typed(shown: str) -> str:
    return "" if shown == "''" else shown


def test_every_subcommand_answers_help(capsys):
    subs = _subcommands()
    assert {"train", "deploy-local", "demo", "bench", "claims", "consensus", "config-keys"} <= set(subs)
    assert all(s in _help(capsys) for s in subs)  # the top level lists them
    for sub in subs:
        out = _help(capsys, sub)
        assert out.startswith(f"usage: sparsepush {sub}"), sub
        # each option with a value shows its default on its own line (a flag like --quick has none)
        for line in out.splitlines():
            m = re.match(r"\s+(--[\w-]+) [A-Z_]+\s", line)
            if m:
                assert "default" in line, (sub, line)


@pytest.mark.parametrize("sub", ["train", "deploy-local"])
def test_run_config_help_names_every_key_with_the_default_that_validates(capsys, sub):
    out = _help(capsys, sub)
    ours = DEPLOY_DEFAULTS if sub == "deploy-local" else {}
    for key in KEYS:
        if sub == "deploy-local" and key in ("num-nodes", "num-rounds"):  # --nodes / --rounds
            assert f"run-config {key})" in out
            continue
        lines = [ln for ln in out.splitlines() if ln.split()[:1] == [f"--{key}"]]
        assert len(lines) == 1, key
        shown = _typed(lines[0].rsplit("; default ", 1)[1])
        # the default the help shows, typed back in, is what the run gets without the key
        want = getattr(validate({}) if key not in ours else validate(dict(ours)), field_name(key))
        assert getattr(validate({**ours, key: shown}), field_name(key)) == want, (key, shown)


def test_training_module_help(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "flower_sparsepush.run.inprocess", "--help"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("usage: python -m flower_sparsepush.run.inprocess")
    for key in KEYS:
        (line,) = [ln for ln in lines if ln.strip().startswith(f"{key}=")]
        shown = _typed(line.split()[0].split("=", 1)[1])
        assert getattr(validate({key: shown}), field_name(key)) == getattr(validate({}), field_name(key)), key
    bad = subprocess.run(
        [sys.executable, "-m", "flower_sparsepush.run.inprocess", "--bogus"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "see --help" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_without_the_venv():
    """make help works before `make setup` (plain Python) and names every target and key."""
    res = subprocess.run(
        ["make", "-s", "help", f"PY={ROOT}/no-venv/python", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    for target in ("demo", "test", "deploy-demo", "docs", "PYTHON="):
        assert target in res.stdout
    for key in KEYS:
        assert re.search(rf"^\s+{re.escape(key)}=", res.stdout, re.M), key


def test_a_new_key_appears_in_every_help(capsys, monkeypatch):
    """Help is generated from config.KEYS: a key added there shows up without touching the help code."""
    monkeypatch.setitem(config.KEYS, "zz-new-key", config.Key(7, int, "a key added for this test", 0, 9))
    assert "zz-new-key=7" in keys_text()
    for sub in ("train", "deploy-local"):
        assert "--zz-new-key V" in _help(capsys, sub)
