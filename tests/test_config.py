"""Run-config validation: one clear error naming key, value and what is allowed; nothing starts on a bad config."""

from __future__ import annotations

import argparse
import sys

import pytest

from flower_sparsepush.config import KEYS, ConfigError, validate
from flower_sparsepush.launch import register, simulate


def test_defaults_complete_and_typed():
    cfg = validate({})
    assert set(cfg) == set(KEYS)
    assert cfg["strategy"] == "sparse-push" and isinstance(cfg["gamma"], float) and isinstance(cfg["num-nodes"], int)
    assert validate({"gamma": "0.5", "num-nodes": "8", "nesterov": "false"})["nesterov"] is False


@pytest.mark.parametrize("raw, words", [
    ({"gama": 0.1}, ["gama", "did you mean 'gamma'"]),
    ({"graph": "hypercube"}, ["graph", "hypercube", "exponential"]),
    ({"graph": "random-out:40", "num-nodes": 8}, ["graph", "1..7"]),
    ({"gamma": 1.5}, ["gamma", "1.5", "(0, 1]"]),
    ({"gamma": 0}, ["gamma", "(0, 1]"]),
    ({"compressor": "topk:2.5"}, ["compressor", "topk"]),
    ({"compressor": "zip"}, ["compressor", "valid"]),
    ({"strategy": "gossip"}, ["strategy", "fedavg, sgp, sparse-push"]),
    ({"strategy": "sgp", "compressor": "topk:0.1"}, ["compressor", "sgp"]),
    ({"lr": -1}, ["lr"]),
    ({"num-nodes": 2.5}, ["num-nodes", "integer"]),
    ({"partition": "skew:2"}, ["partition", "skew:S"]),
    ({"norm": "batch"}, ["norm", "batch", "outside the gossiped"]),
    ({"lr-schedule": "step:0.8,0.5"}, ["lr-schedule", "increasing"]),
    ({"form": "xx"}, ["form", "ref"]),
    ({"nesterov": "maybe"}, ["nesterov", "true or false"]),
])
def test_bad_values_rejected_with_clear_message(raw, words):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)


def test_rejected_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError):
        simulate({"graph": "nope", "out-dir": str(tmp_path)})
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not any(tmp_path.iterdir())  # nothing written either


def test_cli_train_exits_2_on_bad_value(capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train", "--gamma", "7"])
    assert args.func(args) == 2
    assert "gamma" in capsys.readouterr().err
    args = parser.parse_args(["demo", "--rounds", "3"])
    assert callable(args.func)
