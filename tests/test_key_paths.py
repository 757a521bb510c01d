"""No silent keys: every run-config key has a cell on every path (run/key_paths.py) that is a test running it there,
a pre-start refusal, or a stated reason it has nothing to act on; the cells are checked against the code."""

from __future__ import annotations

import ast
import inspect
import tomllib
from pathlib import Path

import pytest

from flower_sparsepush.run.config import KEYS, ConfigError, validate
from flower_sparsepush.run.key_paths import PATHS, WHERE, where_markdown
from flower_sparsepush.run.preflight import preflight

ROOT = Path(__file__).resolve().parent.parent
SYN = {"dataset": "synthetic", "model": "mlp", "num-nodes": 4}
CELLS = [(key, path, cell) for key, cells in WHERE.items() for path, cell in zip(PATHS, cells)]


def test_every_key_has_a_cell_on_every_path():
    assert list(WHERE) == list(KEYS)
    for key, path, cell in CELLS:
        kind = cell.partition(":")[0]
        allowed = {"test", "refused", "inert"} | ({"arg", "app", "missing"} if path == "drop-in" else set())
        assert kind in allowed and cell.partition(":")[2].strip(), (key, path, cell)


def _mentions(source: str, key: str) -> bool:
    return any(s in source for s in (f'"{key}"', f"--{key}", f"{key}=", f".{key.replace('-', '_')}", f"{key}: "))


@pytest.mark.parametrize("key,path,cell", [c for c in CELLS if c[2].startswith("test:")], ids=lambda v: str(v)[:40])
def test_each_cited_test_exists_and_its_module_names_the_key(key, path, cell):
    file, _, name = cell.removeprefix("test:").partition("::")
    source = (ROOT / file).read_text()
    names = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    assert name in names, f"{file} has no {name} (cited for {key} on {path})"
    assert _mentions(source, key) or file.endswith("test_key_paths.py"), f"{file} never names {key}"


@pytest.mark.parametrize("key,path,cell", [c for c in CELLS if c[2].startswith("refused:")], ids=lambda v: str(v)[:40])
def test_each_refused_cell_is_refused_before_start(key, path, cell, tmp_path):
    sample = dict(kv.split("=") for kv in cell.removeprefix("refused:").split(","))
    cfg = validate(SYN | sample | {"out-dir": str(tmp_path)})
    flower = path in ("flower", "deployment")  # both start through preflight(flower=True) (ServerApp, launchers)
    with pytest.raises(ConfigError) as err:
        preflight(cfg, flower=flower)
    assert any(k in str(err.value) for k in sample), str(err.value)


def test_drop_in_arguments_exist():
    from flower_sparsepush.strategies.dropin import DecentralizedFedAvg

    params = set(inspect.signature(DecentralizedFedAvg.__init__).parameters)
    params |= set(inspect.signature(DecentralizedFedAvg.start).parameters) | {"timeout"}  # start(**kw) -> Flower's
    for key, _, cell in CELLS:
        if cell.startswith("arg:"):
            assert cell.removeprefix("arg:").split()[0] in params, (key, cell)


# a value other than the default for every key (validated together; the paths below carry them as they are)
EVERY_KEY = {
    "strategy": "scsp", "num-nodes": 5, "graph": "ring", "compressor": "topk:0.2+q:4", "gamma": 0.25,
    "form": "ef", "lr": 0.02, "lr-schedule": "step:0.5,0.8", "momentum": 0.5, "nesterov": False,
    "weight-decay": 0.001, "batch-size": 8, "local-steps": 3, "qgm": True, "final-gossip-rounds": 2,
    "final-merge": True, "merge-every": 2, "merge-bits": 6, "merge-feedback": True, "drift-correction": "gradient",
    "gradient-lookahead": 0.0, "update-tracking": 0.0, "logit-adjust": 0.5, "sparsity-warmup": 2, "sparsity-schedule": "constant",
    "sparsity-warmup-start": 0.5, "gamma-warmup": 2, "gamma-schedule": "kept", "val-split": 0.2, "device": "auto", "num-rounds": 7, "dataset": "synthetic",
    "data-dir": "/data/x y", "image-column": "", "label-column": "", "partition": "dirichlet:0.5", "model": "mlp",
    "norm": "group", "seed": 11, "eval-every": 3, "eval-node-samples": 50, "out-dir": "/tmp/some where",
    "run-name": "every-key", "save-nodes": True, "drop": 0.1, "link-down": 0.1, "down-span": 3, "churn": 0.1,
    "bounce": False, "round-timeout": 120.5, "exclude-after": 2, "value-bound": 1e5, "checkpoint-every": 2, "resume": True,
    "node-store": "/tmp/store dir", "preset": "",
}  # fmt: skip


def test_every_key_reaches_the_deployed_apps_unchanged():
    """The Deployment Engine runs the simulation's ServerApp and ClientApp; what reaches them is Flower's merge of
    pyproject's [tool.flwr.app.config] with ``flwr run --run-config`` (deploy/local.run_config_overrides): every key,
    at a value other than its default, arrives as it was sent (parsed here by Flower's own parser)."""
    from flwr.common.config import parse_config_args

    from flower_sparsepush.deploy.local import run_config_overrides
    from flower_sparsepush.run.processes import toml_value

    assert set(EVERY_KEY) == set(KEYS)
    cfg = validate(EVERY_KEY)
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config_overrides(cfg.as_dict()).items())
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    arrived = declared | parse_config_args([overrides])
    assert validate(arrived) == cfg
    changed = [k for k in KEYS if getattr(cfg, k.replace("-", "_")) != KEYS[k].default]
    at_default = sorted(set(KEYS) - set(changed))  # keys the sample cannot move beside the others
    assert at_default == [
        "gradient-lookahead",
        "image-column",
        "label-column",
        "norm",
        "preset",
        "sparsity-schedule",
        "update-tracking",
    ]


def test_docs_show_the_table():
    assert where_markdown() in (ROOT / "docs" / "config.md").read_text(), "regenerate docs/config.md: make docs"
