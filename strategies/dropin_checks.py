"""Argument checks of the drop-in strategy's constructor: each bad argument is one ValueError that names it, its
value and what is allowed, raised before any node connects."""

from __future__ import annotations

from typing import Any

from flower_sparsepush.core.codec import FORMS
from flower_sparsepush.core.compression import CompressionError, make_compressor
from flower_sparsepush.core.router import Network
from flower_sparsepush.core.topology import Graph, GraphError, make_graph
from flower_sparsepush.run.config import ConfigError, RunConfig, parse_lr_schedule, validate

NODE_ORDERS = ("node-id", "partition-id")


def number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ValueError(f"{name} must be a number, got {v!r}")
    return float(v)


def count(name: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


def check_sampling(
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, num_nodes, keys
) -> None:
    """The FedAvg-like arguments: fractions, minimum counts and record keys."""
    weighted_by_key, arrayrecord_key, configrecord_key = keys
    if not 0 < number("fraction_train", fraction_train) <= 1:
        raise ValueError(f"fraction_train must be in (0, 1] (every round trains), got {fraction_train!r}")
    if not 0 <= number("fraction_evaluate", fraction_evaluate) <= 1:
        raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate!r}")
    count("min_train_nodes", min_train_nodes, 1)
    count("min_evaluate_nodes", min_evaluate_nodes, 0)
    count("min_available_nodes", min_available_nodes, 2)
    if num_nodes is not None:
        count("num_nodes", num_nodes, 2)
    for name, v in (
        ("weighted_by_key", weighted_by_key),
        ("arrayrecord_key", arrayrecord_key),
        ("configrecord_key", configrecord_key),
    ):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be a non-empty string, got {v!r}")
    if arrayrecord_key == configrecord_key:
        raise ValueError(f"arrayrecord_key and configrecord_key must differ, both are {arrayrecord_key!r}")


def check_gossip(graph, compressor, gamma, form, seed, num_nodes, min_available_nodes, node_order, network) -> None:
    """The gossip arguments: graph, compressor, consensus step size, form, seed, node order and network."""
    if not 0 < number("gamma", gamma) <= 1:
        raise ValueError(f"gamma (consensus step size) must be in (0, 1], got {gamma!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    count("seed", seed, 0)
    if node_order not in NODE_ORDERS:
        raise ValueError(f"node_order must be one of {NODE_ORDERS}, got {node_order!r}")
    if isinstance(graph, str):
        try:  # catch a bad name now, not after the nodes connected (the size is checked again at start)
            make_graph(graph, max(num_nodes or min_available_nodes, 2), seed)
        except GraphError as err:
            raise ValueError(f"graph {graph!r}: {err}") from None
    elif not isinstance(graph, Graph):
        raise ValueError(f"graph must be a graph name (e.g. 'exponential') or a topology.Graph, got {graph!r}")
    elif num_nodes is not None and graph.n != num_nodes:
        raise ValueError(f"graph has {graph.n} nodes but num_nodes={num_nodes}")
    if isinstance(compressor, str):
        try:
            make_compressor(compressor, segments=[1], seed=0)
        except CompressionError as err:
            raise ValueError(f"compressor {compressor!r}: {err}") from None
    elif compressor is not None and not callable(compressor):
        raise ValueError(f"compressor must be a spec such as 'topk:0.1' or a compressor object, got {compressor!r}")
    if network is not None and (not isinstance(network, Network) or network.churn):
        raise ValueError("network must be a router.Network without churn (idle nodes: use fraction_train)")


def check_callables(**fns) -> None:
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {fn!r}")


SPARSITY_SCHEDULES = ("constant", "lr")


def check_schedules(opts: dict) -> None:
    """gradient_lookahead, gossip_steps, sparsity_schedule and lr_schedule (``opts``: every gossip argument, after
    the preset and the defaults are filled in)."""
    c = number("gradient_lookahead", opts["gradient_lookahead"])
    if not 0 <= c <= 1:
        raise ValueError(f"gradient_lookahead must be in [0, 1] (0 = off), got {c!r}")
    if c and opts["form"] != "ref":
        raise ValueError(
            f"gradient_lookahead={c:g} reads the de-biased copies of the 'ref' form, and form={opts['form']!r} keeps "
            "none; use form='ref' or gradient_lookahead=0"
        )
    count("gossip_steps", opts["gossip_steps"], 1)
    schedule = opts["sparsity_schedule"]
    if schedule not in SPARSITY_SCHEDULES:
        raise ValueError(f"sparsity_schedule must be one of {SPARSITY_SCHEDULES}, got {schedule!r}")
    spec = opts["compressor"]
    keeps_fraction = isinstance(spec, str) and spec.split("+")[0].split(":")[0] in ("topk", "topk-layer", "randk")
    if schedule == "lr" and not keeps_fraction:
        raise ValueError(
            f"sparsity_schedule='lr' scales the kept fraction of a top-k/random-k compressor spec, got "
            f"compressor={spec!r}"
        )
    lr_schedule = opts["lr_schedule"]
    try:
        if not isinstance(lr_schedule, str):
            raise ConfigError("not a string")
        parse_lr_schedule(lr_schedule)
    except ConfigError:
        raise ValueError(
            "lr_schedule (the shape of your ClientApp's learning rate over the rounds, read by sparsity_schedule='lr') "
            f"must be constant, cosine or step:F1,F2,..., got {lr_schedule!r}"
        ) from None


MERGE_ARGS = {"final_merge": "final-merge", "merge_every": "merge-every", "merge_bits": "merge-bits",
              "merge_feedback": "merge-feedback"}  # fmt: skip


def merge_config(opts: dict, num_rounds: int = 1) -> RunConfig | None:
    """The drop-in's merges as a run config (``opts``: every gossip argument; ``num_rounds``: the rounds given to
    ``start``), checked by the run config's own rules; None when it never merges. A bad combination is one
    ValueError in the drop-in's argument names."""
    raw = {key: opts[arg] for arg, key in MERGE_ARGS.items()}
    try:
        cfg = validate(raw | {"strategy": "sparse-push", "form": opts["form"], "num-rounds": num_rounds})
    except ConfigError as err:
        msg = str(err).replace("run-config ", "")
        for arg, key in MERGE_ARGS.items():
            msg = msg.replace(key, arg)
        raise ValueError(f"merge arguments: {msg}") from None
    return cfg if cfg.final_merge or cfg.merge_every else None
