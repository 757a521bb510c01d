"""Run-config validation: one clear error naming key, value and what is allowed; nothing starts on a bad config."""

from __future__ import annotations

import argparse
import sys

import pytest

from flower_sparsepush.flower.launch import register, simulate
from flower_sparsepush.run.config import KEYS, ConfigError, validate
from flower_sparsepush.run.preflight import preflight


def test_defaults_complete_and_typed():
    cfg = validate({})
    assert set(cfg.as_dict()) == set(KEYS)
    assert cfg.strategy == "sparse-push" and isinstance(cfg.gamma, float) and isinstance(cfg.num_nodes, int)
    assert validate({"gamma": "0.5", "num-nodes": "8", "nesterov": "false"}).nesterov is False


@pytest.mark.parametrize(
    "raw, words",
    [
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
    ],
)
def test_bad_values_rejected_with_clear_message(raw, words):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)


def test_rejected_before_ray_starts(tmp_path, fresh_ray):
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


# --------------------------------------------------------------------------- reliability keys and pre-start checks


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"drop": 1.0}, ["drop", "[0, 1)"]),
        ({"drop": -0.1}, ["drop", "[0, 1)"]),
        ({"link-down": 1}, ["link-down", "[0, 1)"]),
        ({"churn": 1.5}, ["churn", "[0, 1)"]),
        ({"down-span": 0}, ["down-span", "[1,"]),
        ({"bounce": "perhaps"}, ["bounce", "true or false"]),
        ({"checkpoint-every": -1}, ["checkpoint-every"]),
        ({"round-timeout": 0}, ["round-timeout", "(0,"]),
        ({"strategy": "fedavg", "drop": 0.2}, ["drop", "fedavg"]),
        ({"strategy": "fedavg", "resume": True}, ["resume", "fedavg"]),
        ({"exclude-after": -1}, ["exclude-after", "[0,"]),
        ({"exclude-after": 2.5}, ["exclude-after", "integer"]),
        ({"exclude-after": "often"}, ["exclude-after", "integer"]),
        ({"strategy": "fedavg", "exclude-after": 3}, ["exclude-after", "fedavg"]),
        # keys whose subject is off would be ignored: refused instead
        ({"down-span": 5}, ["down-span", "no effect without link-down"]),
        ({"bounce": False}, ["bounce", "no effect without messages that drop"]),
        ({"sparsity-warmup-start": 0.3}, ["sparsity-warmup-start", "no effect without sparsity-warmup"]),
        ({"model": "mlp", "dataset": "synthetic", "norm": "layer"}, ["norm", "no normalization layers"]),
    ],
)
def test_reliability_keys_validated(raw, words):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_reliability_keys_typed():
    raw = {"drop": "0.3", "churn": 0.2, "link-down": 0.1, "down-span": "5", "bounce": "false", "checkpoint-every": 2}
    cfg = validate(raw)
    assert cfg.drop == 0.3 and cfg.down_span == 5 and cfg.bounce is False and cfg.checkpoint_every == 2
    assert validate({}).exclude_after == 0 and validate({"exclude-after": "3"}).exclude_after == 3


SYN = {"dataset": "synthetic", "model": "mlp", "num-nodes": 4}


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"graph": "random-out:1", "num-nodes": 16}, ["graph", "not strongly connected"]),
        ({"compressor": "topk:100000"}, ["compressor", "100000", "d=", "(0, d]"]),
        ({"compressor": "randk:100000+q:4"}, ["randk", "(0, d]"]),
        ({"model": "cnn"}, ["model", "synthetic", "mlp"]),
        ({"dataset": "cifar10", "model": "cnn", "data-dir": "/nonexistent/cifar"}, ["dataset", "cifar10"]),
    ],
)
def test_preflight_rejects(raw, words, tmp_path, monkeypatch):
    from flower_sparsepush.learn import data

    cfg = validate(SYN | {"out-dir": str(tmp_path)} | raw)

    def missing(name, path=None):  # this machine has CIFAR-10 on a default path: pretend it does not
        raise data.DataNotFoundError(f"{name} not found in {path}")

    monkeypatch.setattr(data, "find_data", missing)
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_preflight_accepts_and_checks_out_dir(tmp_path):
    from flower_sparsepush.run.preflight import model_size

    cfg = validate(SYN | {"out-dir": str(tmp_path / "new" / "deeper"), "compressor": "topk:100"})
    preflight(cfg)  # a folder that does not exist yet is fine (nothing is created)
    assert not (tmp_path / "new").exists()
    d, _ = model_size(cfg)
    preflight(validate(SYN | {"out-dir": str(tmp_path), "compressor": f"topk:{d}"}))  # k = d is allowed
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="out-dir.*not a folder"):
        preflight(validate(SYN | {"out-dir": str(blocker)}))
    with pytest.raises(ConfigError, match="node-store=context.*set node-store to a folder"):
        preflight(validate(SYN | {"out-dir": str(tmp_path), "resume": True, "node-store": "context"}), flower=True)
    preflight(validate(SYN | {"out-dir": str(tmp_path), "resume": True}), flower=True)  # nodes keep copies in files
    preflight(validate(SYN | {"out-dir": str(tmp_path), "final-merge": True}), flower=True)  # the nodes merge


def test_cli_train_exit_2_before_anything_starts(capsys, tmp_path, fresh_ray):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    for argv, word in (
        (["--graph", "random-out:1", "--num-nodes", "16"], "strongly connected"),
        (["--compressor", "topk:100000"], "(0, d]"),
        (["--drop", "1"], "drop"),
        (["--device", "cuda"], "set device=cpu on Flower"),
        (["--merge-bits", "8"], "no merge to quantize"),
    ):
        args = parser.parse_args(
            ["train", "--dataset", "synthetic", "--model", "mlp", "--out-dir", str(tmp_path), *argv]
        )
        assert args.func(args) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and word in err and err.count("\n") == 1, err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not any(tmp_path.iterdir())
