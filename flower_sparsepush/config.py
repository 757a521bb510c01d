"""Run-config keys of the Flower app: defaults, types, ranges, and one validation entry point.

``validate(cfg)`` returns a complete, typed copy (defaults filled in) or raises one :class:`ConfigError` that names
the key, the bad value and what is allowed. Unknown keys are rejected with the closest valid name. Graph and
compressor specs are checked by building them with the core's own parsers (``make_graph``, ``make_compressor``).
The ServerApp validates before it sends a single message; ``sparsepush train`` validates before the SuperLink
(and Ray) start.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("fedavg", "sgp", "sparse-push", "scsp")
DATASETS = ("fashion_mnist", "mnist", "cifar10", "synthetic")
MODELS = ("cnn", "mlp", "logreg", "resnet20", "vgg11")
LR_SCHEDULES = ("constant", "cosine", "step:F1,F2,...")


class ConfigError(ValueError):
    """A run-config key or value that cannot be used."""


@dataclass(frozen=True)
class Key:
    default: Any
    type: type
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] | None = None


KEYS: dict[str, Key] = {
    "strategy": Key("sparse-push", str, "fedavg | sgp | sparse-push | scsp", choices=STRATEGIES),
    "num-nodes": Key(16, int, "number of nodes (virtual clients); must equal the federation's num-supernodes", 2, 4096),
    "graph": Key("exponential", str, "communication graph (topology.GRAPH_NAMES), e.g. exponential, ring, random-out:2"),
    "compressor": Key("topk:0.05", str, "message compressor, e.g. none, topk:0.01, topk:0.01+q:4 (sgp forces none)"),
    "gamma": Key(0.1, float, "consensus step size in (0, 1] (sgp forces 1)", 0.0, 1.0, lo_open=True),
    "form": Key("ref", str, "push-sum form (pushsum.FORMS): ref (per-edge z references) | ef (error feedback on x)"),
    "lr": Key(0.05, float, "learning rate (> 0)", 0.0, 10.0, lo_open=True),
    "lr-schedule": Key("constant", str, "constant | cosine | step:F1,F2 (x0.1 at these fractions of num-rounds)"),
    "momentum": Key(0.9, float, "SGD momentum in [0, 1)", 0.0, 0.999),
    "nesterov": Key(True, bool, "Nesterov momentum"),
    "weight-decay": Key(1e-4, float, "L2 weight decay (>= 0)", 0.0, 1.0),
    "batch-size": Key(32, int, "per-node batch size", 1, 65536),
    "local-steps": Key(1, int, "SGD steps per node between two gossip rounds (amortizes Flower's per-round cost)", 1, 100000),
    "qgm": Key(False, bool, "quasi-global momentum (Lin et al. 2021): momentum fed by the post-gossip model change; scsp turns it on unless set"),
    "final-gossip-rounds": Key(0, int, "gossip-only rounds (no SGD, compressed, counted) after num-rounds; scsp: 50 unless set", 0, 1_000_000),
    "num-rounds": Key(20, int, "gossip (or FedAvg) rounds", 1, 10_000_000),
    "dataset": Key("fashion_mnist", str, "fashion_mnist | mnist | cifar10 | synthetic", choices=DATASETS),
    "data-dir": Key("", str, "dataset folder ('' = the data module's default search path)"),
    "partition": Key("iid", str, "iid | skew:S | dirichlet:A | classes:K"),
    "model": Key("cnn", str, "cnn | mlp | logreg | resnet20 | vgg11", choices=MODELS),
    "norm": Key("group", str, "group | group:G | layer | none (batch is refused: its buffers are not gossiped)"),
    "seed": Key(0, int, "seed of model init, partition, batches and compressors", 0, 2**31 - 1),
    "eval-every": Key(5, int, "evaluate every this many rounds (and after the last one)", 1, 10_000_000),
    "eval-node-samples": Key(2000, int, "test samples each node evaluates its own model on (0 = whole test set)", 0,
                             10_000_000),
    "out-dir": Key("runs", str, "results folder; files go to <out-dir>/<run-name>/"),
    "run-name": Key("", str, "results sub-folder ('' = <strategy>-<graph>-<compressor>-s<seed>)"),
    "save-nodes": Key(False, bool, "also write every node's final de-biased model to nodes.npz"),
}


def _closest(name: str) -> str:
    m = difflib.get_close_matches(name, list(KEYS), n=1, cutoff=0.5)
    return f"; did you mean {m[0]!r}?" if m else ""


def _coerce(key: str, spec: Key, value: Any) -> Any:
    bad = f"run-config {key}={value!r}"
    if spec.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{bad}: expected true or false ({spec.help})")
    if spec.type is int:
        if isinstance(value, bool):
            raise ConfigError(f"{bad}: expected an integer ({spec.help})")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{bad}: expected an integer ({spec.help})") from None
        if not f.is_integer():
            raise ConfigError(f"{bad}: expected an integer ({spec.help})")
        value = int(f)
    elif spec.type is float:
        if isinstance(value, bool):
            raise ConfigError(f"{bad}: expected a number ({spec.help})")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{bad}: expected a number ({spec.help})") from None
        if value != value:
            raise ConfigError(f"{bad}: NaN is not allowed ({spec.help})")
    else:
        value = str(value).strip()
    if spec.lo is not None:
        low_bad = value <= spec.lo if spec.lo_open else value < spec.lo
        if low_bad or value > spec.hi:
            lo = "(" if spec.lo_open else "["
            raise ConfigError(f"{bad}: must be in {lo}{spec.lo:g}, {spec.hi:g}] ({spec.help})")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{bad}: allowed values are {', '.join(spec.choices)}")
    return value


def parse_lr_schedule(spec: str) -> tuple[str, list[float]]:
    """``constant`` | ``cosine`` | ``step:F1,F2`` -> (kind, fractions)."""
    kind, _, arg = spec.partition(":")
    if kind in ("constant", "cosine") and not arg:
        return kind, []
    if kind == "step" and arg:
        try:
            fr = [float(v) for v in arg.split(",")]
        except ValueError:
            fr = []
        if fr and all(0 < f < 1 for f in fr) and fr == sorted(fr):
            return kind, fr
    raise ConfigError(
        f"run-config lr-schedule={spec!r}: allowed are constant, cosine, step:F1,F2,... "
        "(increasing fractions of num-rounds in (0, 1), the lr is multiplied by 0.1 at each)"
    )


def validate(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """A complete, typed copy of ``cfg`` (defaults filled in); raises :class:`ConfigError` on the first problem."""
    from flower_sparsepush.compression import CompressionError, make_compressor
    from flower_sparsepush.topology import GraphError, make_graph

    cfg = dict(cfg or {})
    for key in cfg:
        if key not in KEYS:
            raise ConfigError(f"unknown run-config key {key!r}{_closest(key)} (valid keys: {', '.join(KEYS)})")
    out = {k: _coerce(k, spec, cfg[k]) if k in cfg else spec.default for k, spec in KEYS.items()}

    try:
        make_graph(out["graph"], out["num-nodes"], out["seed"])
    except GraphError as err:
        raise ConfigError(f"run-config graph={out['graph']!r}: {err}") from None
    try:
        make_compressor(out["compressor"], segments=[1], seed=out["seed"])
    except CompressionError as err:
        raise ConfigError(f"run-config compressor={out['compressor']!r}: {err}") from None
    parse_lr_schedule(out["lr-schedule"])
    from flower_sparsepush.pushsum import FORMS

    if out["form"] not in FORMS:
        raise ConfigError(f"run-config form={out['form']!r}: allowed values are {', '.join(FORMS)}")

    norm = out["norm"]
    kind, _, arg = norm.partition(":")
    ok = norm in ("group", "layer", "none") or (kind == "group" and arg.isdigit() and int(arg) >= 1)
    if not ok:
        extra = " (batch norm keeps running statistics outside the gossiped parameters)" if kind == "batch" else ""
        raise ConfigError(f"run-config norm={norm!r}: allowed are group, group:G, layer, none{extra}")

    part = out["partition"]
    pkind, _, parg = part.partition(":")
    try:
        pval = float(parg) if parg else None
    except ValueError:
        pval = None
    valid_part = (
        (part == "iid")
        or (pkind == "skew" and pval is not None and 0 <= pval <= 1)
        or (pkind == "dirichlet" and pval is not None and pval > 0)
        or (pkind == "classes" and pval is not None and pval.is_integer() and pval >= 1)
    )
    if not valid_part:
        raise ConfigError(
            f"run-config partition={part!r}: allowed are iid, skew:S (0<=S<=1), dirichlet:A (A>0), classes:K (K>=1)"
        )
    if out["strategy"] == "sgp":
        # SGP is uncompressed push-sum with gamma 1; a contradicting explicit value is an error, not a silent change
        for key, want in (("compressor", "none"), ("gamma", 1.0)):
            if key in cfg and out[key] != want:
                raise ConfigError(f"run-config {key}={cfg[key]!r}: strategy sgp uses {key}={want} (use sparse-push)")
        out["compressor"], out["gamma"] = "none", 1.0
    if out["strategy"] == "scsp":
        # SCSP = Sparse-Push + quasi-global momentum + a final gossip-only phase (docs/algorithm.md); each is a switch
        out["qgm"] = out["qgm"] if "qgm" in cfg else True
        out["final-gossip-rounds"] = out["final-gossip-rounds"] if "final-gossip-rounds" in cfg else 50
    if out["strategy"] == "fedavg" and (out["qgm"] or out["final-gossip-rounds"]):
        raise ConfigError("run-config qgm / final-gossip-rounds: these belong to the gossip strategies, not fedavg")
    if not out["run-name"]:
        out["run-name"] = f"{out['strategy']}-{out['graph']}-{out['compressor']}-s{out['seed']}".replace(":", "")
    if "/" in out["run-name"] or out["run-name"] in (".", ".."):
        raise ConfigError(f"run-config run-name={out['run-name']!r}: must be a plain folder name")
    return out
