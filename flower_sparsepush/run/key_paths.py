"""Where each run-config key works: the in-process loop, Flower's simulation engine, the Deployment Engine and the
drop-in strategy. One cell per key and path, generated into docs/config.md, and walked by tests/test_key_paths.py:

- ``test:FILE::NAME``: that test runs the key on that path (the test module names the key; the check fails when
  the test or the mention disappears);
- ``refused:SAMPLE``: pre-start checks refuse the key there (``SAMPLE`` is a run config, as ``k=v,...``, that the
  test feeds to ``preflight`` on that path and expects to be refused with a line naming the key);
- ``inert:WHY``: the path has nothing the key acts on (said why; no result changes);
- drop-in only: ``arg:NAME`` (the DecentralizedFedAvg / ``start()`` argument that plays the key's part),
  ``app:WHY`` (the user's own ClientApp or ServerApp decides it) or ``missing:WHY`` (the drop-in has no such
  feature yet; nothing reads the key there, since the drop-in takes arguments, not a run config).

The Deployment Engine runs the same ServerApp and ClientApp as the simulation; its cells name the deployed test that
sets the key, or the test that every key reaches the deployed apps through ``flwr run --run-config`` unchanged.
"""

from __future__ import annotations

PATHS = ("in-process", "flower", "deployment", "drop-in")

FLOWER_EQ = "test:tests/test_flower.py::test_flower_equals_inprocess"
SWITCHES = "test:tests/test_flower_switches.py::test_flower_equals_inprocess_with_the_switches_on"
SWITCH_CHANGES = "test:tests/test_flower_switches.py::test_each_switch_changes_the_run"
DEPLOYED = "test:tests/test_deployment.py::test_results_files_as_in_simulation"
CARRIED = "test:tests/test_key_paths.py::test_every_key_reaches_the_deployed_apps_unchanged"
FLOWER_MERGE = "test:tests/test_flower_merge.py::test_flower_merges_equal_the_inprocess_ones"
TRAINS = "app:your ClientApp trains; the drop-in sends it the model and reads the reply"
NO_FEATURE = "missing:the drop-in has no such switch"
RESULTS = "app:your ServerApp writes its results (node_arrays() gives every node's model)"


def _generic(drop_in: str, deployed: str = DEPLOYED) -> tuple[str, str, str, str]:
    """A key that acts through the setup and node code every path shares."""
    return (FLOWER_EQ, FLOWER_EQ, deployed, drop_in)


def _switch(drop_in: str = NO_FEATURE) -> tuple[str, str, str, str]:
    """A training switch: tests/test_flower_switches.py turns it on through Flower and off again in-process."""
    return (SWITCH_CHANGES, SWITCHES, CARRIED, drop_in)


DEPLOYED_MERGE = "test:tests/test_deployment.py::test_node_state_persists_across_rounds"


def _merge(arg: str, deployed: str = CARRIED) -> tuple[str, str, str, str]:
    """A merge key: the in-process merges are tested against the exact average, the Flower ones and the drop-in's
    against them."""
    return (
        "test:tests/test_merge.py::test_resume_after_periodic_quantized_merges_equals_an_uninterrupted_run",
        FLOWER_MERGE,
        deployed,
        f"arg:{arg}",
    )


WHERE: dict[str, tuple[str, str, str, str]] = {
    "strategy": _generic("inert:the drop-in is push-sum gossip; compressor='none' with gamma=1 is SGP"),
    "num-nodes": _generic("arg:num_nodes"),
    "graph": _generic("arg:graph"),
    "compressor": _generic("arg:compressor"),
    "gamma": _generic("arg:gamma"),
    "form": _generic("arg:form", CARRIED),
    "lr": _generic(TRAINS),
    "lr-schedule": _switch("arg:lr_schedule"),
    "momentum": _switch(TRAINS),
    "nesterov": _switch(TRAINS),
    "weight-decay": _switch(TRAINS),
    "batch-size": _generic(TRAINS),
    "local-steps": _generic(TRAINS),
    "qgm": _switch(),
    "final-gossip-rounds": _switch(),
    "final-merge": _merge("final_merge"),
    "merge-every": _merge("merge_every", DEPLOYED_MERGE),
    "merge-bits": _merge("merge_bits", DEPLOYED_MERGE),
    "merge-feedback": _merge("merge_feedback"),
    "drift-correction": (
        "test:tests/test_merge.py::test_drift_correction_keeps_label_skewed_nodes_closer_between_merges",
        FLOWER_MERGE,
        CARRIED,
        "missing:it corrects the node's SGD steps, which the user's ClientApp runs",
    ),
    "gradient-lookahead": (FLOWER_EQ, FLOWER_EQ, CARRIED, "arg:gradient_lookahead"),
    "logit-adjust": (
        "test:tests/test_logit_adjust.py::test_label_skewed_training_with_logit_adjustment",
        SWITCHES,
        CARRIED,
        "missing:it changes the loss of the node's SGD, which the user's ClientApp runs",
    ),
    "update-tracking": (
        "test:tests/test_tracking.py::test_tracking_keeps_label_skewed_nodes_closer",
        SWITCHES,
        CARRIED,
        "missing:it corrects the node's SGD steps, which the user's ClientApp runs",
    ),
    "sparsity-warmup": _switch(),
    "sparsity-schedule": _switch("arg:sparsity_schedule"),
    "sparsity-warmup-start": _switch(),
    "gamma-warmup": _switch(),
    "gamma-schedule": _switch(),
    "val-split": (
        "test:tests/test_flower.py::test_validation_metrics_through_flower",
        "test:tests/test_flower.py::test_validation_metrics_through_flower",
        CARRIED,
        TRAINS,
    ),
    "device": (
        "test:tests/test_batched.py::test_inprocess_loop_batched_equals_node_by_node",
        "refused:device=cuda",
        "refused:device=cuda",
        TRAINS,
    ),
    "num-rounds": _generic("arg:num_rounds (start)"),
    "dataset": _generic(TRAINS),
    "data-dir": (
        "test:tests/test_config.py::test_preflight_rejects",
        "test:tests/test_troubleshooting.py::test_data_missing",
        CARRIED,
        TRAINS,
    ),
    "image-column": (
        "test:tests/test_hf_data.py::test_config_keys_and_preflight",
        "test:tests/test_hf_data.py::test_config_keys_and_preflight",
        CARRIED,
        TRAINS,
    ),
    "label-column": (
        "test:tests/test_hf_data.py::test_config_keys_and_preflight",
        "test:tests/test_hf_data.py::test_config_keys_and_preflight",
        CARRIED,
        TRAINS,
    ),
    "partition": _switch(TRAINS),
    "model": _generic(TRAINS),
    "norm": ("test:tests/test_models.py::test_norm_layers_types", CARRIED, CARRIED, TRAINS),
    "seed": _generic("arg:seed"),
    "eval-every": _generic("app:Flower calls evaluation every round; your evaluate_fn decides"),
    "eval-node-samples": (
        "test:tests/test_flower_switches.py::test_eval_node_samples_changes_what_is_reported",
        SWITCHES,
        CARRIED,
        "app:your ClientApp evaluates its own model",
    ),
    "out-dir": _generic(RESULTS),
    "run-name": _generic(RESULTS),
    "save-nodes": (
        "test:tests/test_training.py::test_save_nodes_in_process_writes_every_node_model",
        FLOWER_EQ,
        DEPLOYED,
        RESULTS,
    ),
    "drop": _switch("arg:network"),
    "link-down": _switch("arg:network"),
    "down-span": _switch("arg:network"),
    "churn": _switch("arg:fraction_train"),
    "bounce": _switch("inert:a message the drop-in's network drops always bounces back"),
    "round-timeout": (
        "inert:in-process nothing waits for replies",
        "test:tests/test_deployment.py::test_a_supernode_killed_and_restarted_mid_run_continues_with_its_state",
        "test:tests/test_deployment.py::test_a_supernode_killed_and_restarted_mid_run_continues_with_its_state",
        "arg:timeout (start)",
    ),
    "exclude-after": (
        "test:tests/test_reliability.py::test_hostile_node_in_process",
        "test:tests/test_reliability.py::test_hostile_node_through_flower",
        CARRIED,
        NO_FEATURE,
    ),
    "value-bound": (
        "test:tests/test_bounds.py::test_huge_values_are_charged_to_the_attacker_in_process",
        "test:tests/test_bounds.py::test_huge_values_through_flower_are_refused_at_the_attacker",
        CARRIED,
        "arg:value_bound",
    ),
    "checkpoint-every": (
        "test:tests/test_reliability.py::test_same_seed_identical_and_resume_equals_uninterrupted",
        "test:tests/test_flower_state.py::test_resumed_flower_run_equals_an_uninterrupted_one",
        CARRIED,
        NO_FEATURE,
    ),
    "resume": (
        "test:tests/test_reliability.py::test_same_seed_identical_and_resume_equals_uninterrupted",
        "test:tests/test_flower_state.py::test_resumed_flower_run_equals_an_uninterrupted_one",
        CARRIED,
        NO_FEATURE,
    ),
    "node-store": (
        "inert:in-process the nodes' states live in the loop's memory (checkpoint.pt keeps them)",
        "test:tests/test_flower_switches.py::test_node_store_holds_the_nodes_files",
        CARRIED,
        "inert:the drop-in keeps every node's state on the ServerApp",
    ),
    "preset": (
        "test:tests/test_presets.py::test_preset_reaches_every_entry_point",
        "test:tests/test_presets.py::test_explicit_keys_override_the_preset",
        CARRIED,
        "arg:preset",
    ),
}


def cell_text(cell: str) -> str:
    """One cell as docs/config.md shows it."""
    kind, _, rest = cell.partition(":")
    if cell == CARRIED:
        return f"the simulation's apps; the key arrives unchanged (`{rest.split('::')[1]}`)"
    if kind == "test":
        return f"yes: `{rest.split('::')[1]}`"
    if kind == "refused":
        return "refused before start"
    if kind == "arg":
        return f"argument `{rest}`"
    return {"inert": "no effect: ", "app": "your app: ", "missing": "not yet: "}[kind] + rest


def where_markdown() -> str:
    """The key x path table of docs/config.md."""
    lines = ["| key | " + " | ".join(PATHS) + " |", "|---|" + "---|" * len(PATHS)]
    for key, cells in WHERE.items():
        lines.append(f"| `{key}` | " + " | ".join(cell_text(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
