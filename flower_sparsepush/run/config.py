"""The typed run config and its one validation entry point (the keys themselves are in ``run/keys.py``).

``validate(cfg)`` returns a :class:`RunConfig` (frozen, typed, defaults filled in; one field per key of
:data:`KEYS`, ``num-nodes`` read as ``cfg.num_nodes``) or raises one :class:`ConfigError` that names the key, the
bad value and what is allowed. Outside this module a run's settings are read from that object only; plain dicts of
kebab-case keys exist at the edges where records arrive (Flower's run config, the command line, JSON files).
Unknown keys are rejected with the closest valid name. Graph and compressor specs are checked by building them with
the core's own parsers (``make_graph``, ``make_compressor``). The ServerApp validates before it sends a single message;
``sparsepush train`` validates before the SuperLink (and Ray) start.
"""

from __future__ import annotations

import difflib
from dataclasses import field, make_dataclass
from typing import Any

from flower_sparsepush.run.keys import DATASETS, KEYS, LR_SCHEDULES, MODELS, STRATEGIES, Key

__all__ = ["DATASETS", "KEYS", "LR_SCHEDULES", "MODELS", "STRATEGIES", "ConfigError", "Key", "RunConfig", "validate"]


class ConfigError(ValueError):
    """A run-config key or value that cannot be used."""


def field_name(key: str) -> str:
    """The :class:`RunConfig` field of a run-config key (``num-nodes`` -> ``num_nodes``)."""
    return key.replace("-", "_")


class _RunConfigMethods:
    def as_dict(self) -> dict[str, Any]:
        """The kebab-case dict of every key, as Flower's run config, ``config.json`` and checkpoints hold it."""
        return {key: getattr(self, field_name(key)) for key in KEYS}

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (field names: ``cfg.replace(num_rounds=3)``)."""
        unknown = [k for k in changes if field_name(k.replace("_", "-")) != k or k.replace("_", "-") not in KEYS]
        if unknown:
            raise ConfigError(f"RunConfig.replace: unknown field {unknown[0]!r} (fields are the keys with '_' for '-')")
        return validate(self.as_dict() | {k.replace("_", "-"): v for k, v in changes.items()})


RunConfig = make_dataclass(
    "RunConfig",
    [(field_name(key), spec.type, field(default=spec.default)) for key, spec in KEYS.items()],
    bases=(_RunConfigMethods,),
    frozen=True,
)
RunConfig.__module__ = __name__
RunConfig.__doc__ = "One run's settings, validated and read-only: one field per run-config key.\n\n" + "\n".join(
    f"- ``{field_name(key)}`` ({spec.type.__name__}, default {spec.default!r}): {spec.help}"
    for key, spec in KEYS.items()
)


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
        high_bad = value >= spec.hi if spec.hi_open else value > spec.hi
        if low_bad or high_bad:
            lo, hi = "(" if spec.lo_open else "[", ")" if spec.hi_open else "]"
            raise ConfigError(f"{bad}: must be in {lo}{spec.lo:g}, {spec.hi:g}{hi} ({spec.help})")
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


def validate(cfg: dict[str, Any] | RunConfig | None, explicit: bool = False) -> RunConfig:
    """The :class:`RunConfig` of ``cfg`` (a dict of run-config keys; defaults filled in); raises :class:`ConfigError`
    on the first problem. A :class:`RunConfig` is returned as it is. ``explicit``: every key of ``cfg`` was typed by
    the user (a command line), so one that sets a preset's key back to its default is refused (run/presets.py)."""
    if isinstance(cfg, RunConfig):
        return cfg
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in KEYS:
            raise ConfigError(f"unknown run-config key {key!r}{_closest(key)} (valid keys: {', '.join(KEYS)})")
    _apply_preset(cfg, explicit)
    out = {k: _coerce(k, spec, cfg[k]) if k in cfg else spec.default for k, spec in KEYS.items()}
    _check_specs(out)
    _check_model_and_data(out)
    _apply_strategy_defaults(out, cfg)
    _check_merges(out)
    _check_gossip_switches(out)
    _check_sparsity(out)
    _check_device_and_fedavg(out)
    _check_dependent_keys(out)
    _name_run(out)
    return RunConfig(**{field_name(k): v for k, v in out.items()})


def _apply_preset(cfg: dict[str, Any], explicit: bool) -> None:
    """Fill in the keys of ``cfg["preset"]`` that ``cfg`` leaves out or sets to their default (in place)."""
    from flower_sparsepush.run.presets import PRESETS

    name = str(cfg.get("preset", "")).strip()
    if not name:
        return
    if name not in PRESETS:
        raise ConfigError(f"run-config preset={name!r}: allowed values are {', '.join(PRESETS)} (or '' for none)")
    for key, value in PRESETS[name].keys.items():
        given = key in cfg and _coerce(key, KEYS[key], cfg[key]) != KEYS[key].default
        if given:
            continue
        if explicit and key in cfg and value != KEYS[key].default:
            raise ConfigError(
                f"run-config {key}={cfg[key]!r} with preset={name}: the preset sets {key}={value!r}, and a key at "
                "its default counts as not given (on Flower every key arrives with a value); to run the preset with "
                f"{key} at its default, give the preset's keys without it (run/presets.py lists them)"
            )
        cfg[key] = value


def _check_specs(out: dict[str, Any]) -> None:
    """The graph, compressor and lr-schedule specs parse (with the core's own parsers); dataset, its columns and the
    push-sum form name things that exist."""
    from flower_sparsepush.core.compression import CompressionError, make_compressor
    from flower_sparsepush.core.topology import GraphError, make_graph

    try:
        make_graph(out["graph"], out["num-nodes"], out["seed"])
    except GraphError as err:
        raise ConfigError(f"run-config graph={out['graph']!r}: {err}") from None
    try:
        make_compressor(out["compressor"], segments=[1], seed=out["seed"])
    except CompressionError as err:
        raise ConfigError(f"run-config compressor={out['compressor']!r}: {err}") from None
    parse_lr_schedule(out["lr-schedule"])
    dataset = out["dataset"]
    if dataset not in DATASETS and not (dataset.startswith("hf:") and dataset[3:].strip()):
        raise ConfigError(
            f"run-config dataset={dataset!r}: allowed values are {', '.join(DATASETS)}, "
            "hf:<Hugging Face Hub name or local folder> (docs/data.md)"
        )
    for key in ("image-column", "label-column"):
        if out[key] and not dataset.startswith("hf:"):
            raise ConfigError(f"run-config {key}={out[key]!r}: only for dataset=hf:... (built-in datasets have theirs)")
    from flower_sparsepush.core.pushsum import FORMS

    if out["form"] not in FORMS:
        raise ConfigError(f"run-config form={out['form']!r}: allowed values are {', '.join(FORMS)}")


def _check_model_and_data(out: dict[str, Any]) -> None:
    """The norm and partition specs."""
    norm = out["norm"]
    kind, _, arg = norm.partition(":")
    ok = norm in ("group", "layer", "none") or (kind == "group" and arg.isdigit() and int(arg) >= 1)
    if not ok:
        extra = " (batch norm keeps running statistics outside the gossiped parameters)" if kind == "batch" else ""
        raise ConfigError(f"run-config norm={norm!r}: allowed are group, group:G, layer, none{extra}")
    if norm != KEYS["norm"].default and out["model"] in ("mlp", "logreg"):
        raise ConfigError(
            f"run-config norm={norm!r}: model={out['model']} has no normalization layers (norm applies to cnn, "
            "resnet20 and vgg11); drop norm or choose a conv model"
        )

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


def _apply_strategy_defaults(out: dict[str, Any], cfg: dict[str, Any]) -> None:
    """What a strategy fixes: sgp is uncompressed push-sum with gamma 1 (an explicit contradiction is an error); scsp turns final-merge on unless ``cfg`` sets it."""
    if out["strategy"] == "sgp":
        # SGP is uncompressed push-sum with gamma 1; a contradicting explicit value is an error, not a silent change
        for key, want in (("compressor", "none"), ("gamma", 1.0)):
            if key in cfg and out[key] != want:
                raise ConfigError(f"run-config {key}={cfg[key]!r}: strategy sgp uses {key}={want} (use sparse-push)")
        out["compressor"], out["gamma"] = "none", 1.0
    if out["strategy"] == "scsp":
        # SCSP = Sparse-Push + one exact global merge at the end (docs/algorithm.md: what the claims measured)
        out["final-merge"] = out["final-merge"] if "final-merge" in cfg else True


def _check_merges(out: dict[str, Any]) -> None:
    """merge-bits, merge-feedback and drift-correction only where there is a merge they act on."""
    if not (out["merge-bits"] == 32 or 1 <= out["merge-bits"] <= 8):
        raise ConfigError(
            f"run-config merge-bits={out['merge-bits']}: use 32 (exact float32 merge) or 1..8 (quantized merge)"
        )
    if out["merge-bits"] == 1 and not out["merge-feedback"]:
        raise ConfigError(
            "run-config merge-bits=1: a 1-bit merge sends each value's sign times the mean magnitude, which moves "
            "every coordinate by the same amount; it needs merge-feedback=true to carry the error to the next merge"
        )
    if out["merge-bits"] != 32 and not (out["final-merge"] or out["merge-every"]):
        raise ConfigError(
            f"run-config merge-bits={out['merge-bits']}: there is no merge to quantize; turn on final-merge=true "
            "or merge-every=N"
        )
    if out["merge-feedback"] and out["merge-bits"] == 32:
        raise ConfigError(
            "run-config merge-feedback=true: an exact merge (merge-bits=32) rounds nothing away; set merge-bits to "
            "1..8 or drop merge-feedback"
        )
    if out["drift-correction"] != "off" and out["update-tracking"]:
        raise ConfigError(
            f"run-config update-tracking={out['update-tracking']}: it and drift-correction={out['drift-correction']} "
            "both set the correction a node subtracts from its gradients; use one of them"
        )
    if out["drift-correction"] != "off" and not out["merge-every"]:
        raise ConfigError(
            f"run-config drift-correction={out['drift-correction']}: the drift is measured at periodic merges; set "
            "merge-every=M > 0"
        )


def _check_gossip_switches(out: dict[str, Any]) -> None:
    """gradient-lookahead and update-tracking need the ref form; the gossip-only switches are refused for fedavg."""
    for key in ("gradient-lookahead", "update-tracking"):  # both read the ref form's copies of the in-neighbours
        if out[key] and out["form"] != "ref":
            raise ConfigError(
                f"run-config {key}={out[key]}: it reads the de-biased copies of the ref form, and form={out['form']} "
                f"keeps none; use form=ref or {key}=0"
            )
    gossip_only = (
        "qgm",
        "final-gossip-rounds",
        "final-merge",
        "merge-every",
        "sparsity-warmup",
        "gamma-warmup",
        "gradient-lookahead",
        "update-tracking",
    )
    for key in ("sparsity-schedule", "gamma-schedule"):
        if out["strategy"] == "fedavg" and out[key] != "constant":
            raise ConfigError(f"run-config {key}: this belongs to the gossip strategies, not fedavg")
    if out["strategy"] == "fedavg" and any(out[k] for k in gossip_only):
        bad = next(k for k in gossip_only if out[k])
        raise ConfigError(f"run-config {bad}={out[bad]!r}: this belongs to the gossip strategies, not fedavg")


def _check_sparsity(out: dict[str, Any]) -> None:
    """sparsity-warmup and sparsity-schedule: one of them, with a compressor that keeps a fraction; gamma-schedule
    follows what they give."""
    if out["gamma-schedule"] == "kept" and not (out["sparsity-warmup"] or out["sparsity-schedule"] != "constant"):
        raise ConfigError(
            "run-config gamma-schedule=kept: gamma follows the kept fraction that sparsity-schedule or "
            "sparsity-warmup changes, and both are off here; set one (e.g. sparsity-schedule=lr) or gamma-schedule="
            "constant"
        )
    if out["sparsity-warmup"] and out["sparsity-schedule"] != "constant":
        raise ConfigError(
            f"run-config sparsity-schedule={out['sparsity-schedule']}: set either it or sparsity-warmup, not both "
            "(each sets the kept fraction of the first rounds)"
        )
    for key, on in (
        ("sparsity-warmup", out["sparsity-warmup"]),
        ("sparsity-schedule", out["sparsity-schedule"] != "constant"),
    ):
        if not on:
            continue
        sel, _, arg = out["compressor"].partition("+")[0].partition(":")
        try:
            target = float(arg)
        except ValueError:
            target = None
        if sel not in ("topk", "topk-layer", "randk") or target is None or not 0 < target < 1:
            raise ConfigError(
                f"run-config {key}={out[key]}: needs a compressor that keeps a fraction "
                f"(topk:F, topk-layer:F or randk:F, optionally +q:B), got compressor={out['compressor']!r}"
            )
        if key == "sparsity-warmup" and not out["sparsity-warmup-start"] > target:
            raise ConfigError(
                f"run-config sparsity-warmup-start={out['sparsity-warmup-start']}: must be larger than the "
                f"compressor's kept fraction {target:g} (the warm-up ramps down from it)"
            )


def _check_device_and_fedavg(out: dict[str, Any]) -> None:
    """The device name; lossy links, churn, checkpoints and exclude-after are gossip settings, not fedavg's."""
    dev = out["device"]
    if not (dev in ("cpu", "auto", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"run-config device={dev!r}: allowed are cpu, auto, cuda, cuda:N")
    if out["strategy"] == "fedavg":
        lossy = [k for k in ("drop", "link-down", "churn") if out[k]]
        if lossy or out["checkpoint-every"] or out["resume"]:
            bad = (lossy or [k for k in ("checkpoint-every", "resume") if out[k]])[0]
            raise ConfigError(
                f"run-config {bad}={out[bad]!r}: lossy links, churn and checkpoints belong to the "
                "gossip strategies (sgp, sparse-push, scsp), not fedavg"
            )
    if out["strategy"] == "fedavg" and out["exclude-after"]:
        raise ConfigError(
            f"run-config exclude-after={out['exclude-after']}: the repeat-offender policy belongs to the gossip "
            "strategies (sgp, sparse-push, scsp), whose replies the ServerApp checks; fedavg is Flower's own FedAvg"
        )


# key -> (what it needs to act on, the keys that provide it): a non-default value without them would be ignored
_NEEDS = {
    "sparsity-warmup-start": ("sparsity-warmup > 0", ("sparsity-warmup",)),
    "down-span": ("link-down > 0 (it is the length of a link-down span)", ("link-down",)),
    "bounce": ("messages that drop: drop > 0 or link-down > 0", ("drop", "link-down")),
}


def _check_dependent_keys(out: dict[str, Any]) -> None:
    """Refuse a key set away from its default when what it acts on is off (it would be silently ignored)."""
    for key, (what, providers) in _NEEDS.items():
        if out[key] != KEYS[key].default and not any(out[p] for p in providers):
            raise ConfigError(f"run-config {key}={out[key]!r}: has no effect without {what}; drop it or turn that on")


def _name_run(out: dict[str, Any]) -> None:
    """The default run-name, and one that is a plain folder name."""
    if not out["run-name"] and out["preset"]:
        out["run-name"] = f"{out['preset']}-s{out['seed']}"
    if not out["run-name"]:
        out["run-name"] = f"{out['strategy']}-{out['graph']}-{out['compressor']}-s{out['seed']}".replace(":", "")
    if "/" in out["run-name"] or out["run-name"] in (".", ".."):
        raise ConfigError(f"run-config run-name={out['run-name']!r}: must be a plain folder name")


def total_rounds(cfg: RunConfig) -> int:
    """Training rounds plus the final gossip-only rounds (what the graph must connect over)."""
    return cfg.num_rounds + (0 if cfg.strategy == "fedavg" else cfg.final_gossip_rounds)
