"""The run-config keys of the Flower app: each one's default, type, allowed range or choices and meaning.

``config.validate`` checks values against this table and builds the typed ``RunConfig`` from it; ``make docs``,
``--help`` of every entry point and pyproject's ``[tool.flwr.app.config]`` list the same keys (tests check them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flower_sparsepush.run.presets import PRESETS

STRATEGIES = ("fedavg", "sgp", "sparse-push", "scsp")
DATASETS = ("fashion_mnist", "mnist", "cifar10", "synthetic")
MODELS = ("cnn", "mlp", "logreg", "resnet20", "vgg11")
LR_SCHEDULES = ("constant", "cosine", "step:F1,F2,...")


@dataclass(frozen=True)
class Key:
    default: Any
    type: type
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] | None = None
    hi_open: bool = False


KEYS: dict[str, Key] = {
    "strategy": Key("sparse-push", str, "fedavg | sgp | sparse-push | scsp", choices=STRATEGIES),
    "num-nodes": Key(
        16, int, "number of nodes (virtual clients); must equal the federation's num-supernodes", 2, 100_000
    ),
    "graph": Key(
        "exponential", str, "communication graph (topology.GRAPH_NAMES), e.g. exponential, ring, random-out:2"
    ),
    "compressor": Key("topk:0.05", str, "message compressor, e.g. none, topk:0.01, topk:0.01+q:4 (sgp forces none)"),
    "gamma": Key(0.1, float, "consensus step size in (0, 1] (sgp forces 1)", 0.0, 1.0, lo_open=True),
    "form": Key("ref", str, "push-sum form (pushsum.FORMS): ref (per-edge z references) | ef (error feedback on x)"),
    "lr": Key(0.05, float, "learning rate (> 0)", 0.0, 10.0, lo_open=True),
    "lr-schedule": Key("constant", str, "constant | cosine | step:F1,F2 (x0.1 at these fractions of num-rounds)"),
    "momentum": Key(0.9, float, "SGD momentum in [0, 1)", 0.0, 0.999),
    "nesterov": Key(True, bool, "Nesterov momentum"),
    "weight-decay": Key(1e-4, float, "L2 weight decay (>= 0)", 0.0, 1.0),
    "batch-size": Key(32, int, "per-node batch size", 1, 65536),
    "local-steps": Key(
        1, int, "SGD steps per node between two gossip rounds (amortizes Flower's per-round cost)", 1, 100000
    ),
    "qgm": Key(
        False,
        bool,
        "quasi-global momentum (Lin et al. 2021): momentum fed by the post-gossip model change (diverged on long cosine schedules: docs/results.md)",
    ),
    "final-gossip-rounds": Key(
        0, int, "gossip-only rounds (no SGD, compressed, counted) after num-rounds", 0, 1_000_000
    ),
    "final-merge": Key(
        False,
        bool,
        "after the last round: one exact global average, computed by the nodes as an all-reduce (each tensor averaged by one owner; its messages counted); scsp: on unless set",
    ),
    "merge-every": Key(
        0,
        int,
        "a global merge (as final-merge, counted) after every this many training rounds as well (0 = off)",
        0,
        10**7,
    ),
    "merge-bits": Key(
        32,
        int,
        "bits per value in the merges' all-reduce: 32 = exact float32; 2..8 = each tensor's change since the last merge quantized, one scale per tensor; 1 = its sign times the mean magnitude (needs merge-feedback)",
        1,
        32,
    ),
    "merge-feedback": Key(
        False,
        bool,
        "with merge-bits 1..8: error feedback on the quantized merges (each node and each chunk owner adds what its last merge message rounded away to the next one), so rounding delays a change instead of losing it; no extra bits",
    ),
    "drift-correction": Key(
        "off",
        str,
        "off | displacement | gradient; with merge-every, each node subtracts its gradient bias, estimated at every periodic merge from its drift away from the merged model (displacement) or its own mean gradient against the nodes' (gradient), as in SCAFFOLD; no extra bits",
        choices=("off", "displacement", "gradient"),
    ),
    "gradient-lookahead": Key(
        0.0,
        float,
        "c in [0, 1]: local SGD takes its gradients at z + c (mean of the node's copies of its in-neighbours' models - z) and applies them to z, a point nearer the nodes' average; 0 = off; form ref only; no extra bits",
        0.0,
        1.0,
    ),
    "logit-adjust": Key(
        0.0,
        float,
        "tau in [0, 2]: local SGD's loss is the cross-entropy of logits + tau * log(the node's own label frequencies) (logit adjustment, Menon et al. 2021; FedLC, Zhang et al. 2022), so a node whose data hold few classes stops pushing the others' logits down; evaluation reads the plain logits; 0 = off; no extra bits",
        0.0,
        2.0,
    ),
    "update-tracking": Key(
        0.0,
        float,
        "mu in [0, 1): after local SGD each node moves by mu times (its neighbourhood's move per round, read from the changes of its copies of their models, less its own SGD move), both averaged over about 10 rounds, so a node whose data pull it away from the others moves with them (global update tracking, core/tracking.py); 0 = off; form ref only; no extra bits",
        0.0,
        1.0,
        hi_open=True,
    ),
    "sparsity-warmup": Key(
        0, int, "rounds over which the kept fraction ramps exponentially from sparsity-warmup-start (0 = off)", 0, 10**7
    ),
    "sparsity-schedule": Key(
        "constant",
        str,
        "constant | lr; lr: the kept fraction of round t is F * lr_t / (mean lr over the training rounds), floored at F/20 and capped at 1, so the bits of a run stay about those of F but are spent where the nodes move most",
        choices=("constant", "lr"),
    ),
    "sparsity-warmup-start": Key(
        0.05, float, "kept fraction at round 0 of the sparsity warm-up, in (0, 1]", 0.0, 1.0, lo_open=True
    ),
    "gamma-warmup": Key(0, int, "rounds over which gamma ramps linearly up from gamma/R (0 = off)", 0, 10**7),
    "gamma-schedule": Key(
        "constant",
        str,
        "constant | kept; kept: gamma of round t is gamma * f_t / F, f_t the kept fraction sparsity-schedule or "
        "sparsity-warmup gives round t and F the compressor's own, so gamma stays in the same ratio to the kept "
        "fraction (the stability limit of compressed gossip grows with it)",
        choices=("constant", "kept"),
    ),
    "val-split": Key(
        0.0,
        float,
        "fraction of each class of the training set held out as a validation split (seeded by seed); adds val_* "
        "metrics. Choose settings on it, not on the test set",
        0.0,
        0.5,
        hi_open=True,
    ),
    "device": Key(
        "cpu",
        str,
        "in-process loop: cpu (node by node) | auto | cuda | cuda:N (all nodes' local SGD batched on the GPU)",
    ),
    "num-rounds": Key(20, int, "gossip (or FedAvg) rounds", 1, 10_000_000),
    "dataset": Key(
        "fashion_mnist",
        str,
        "fashion_mnist | mnist | cifar10 | synthetic | hf:<Hugging Face Hub name or folder saved with save_to_disk>",
    ),
    "data-dir": Key("", str, "dataset folder ('' = the data module's default search path)"),
    "image-column": Key("", str, "dataset=hf:...: the column of images or feature arrays ('' = detect)"),
    "label-column": Key("", str, "dataset=hf:...: the column of class labels ('' = detect)"),
    "partition": Key("iid", str, "iid | skew:S | dirichlet:A | classes:K"),
    "model": Key("cnn", str, "cnn | mlp | logreg | resnet20 | vgg11", choices=MODELS),
    "norm": Key("group", str, "group | group:G | layer | none (batch is refused: its buffers are not gossiped)"),
    "seed": Key(0, int, "seed of model init, partition, batches and compressors", 0, 2**31 - 1),
    "eval-every": Key(5, int, "evaluate every this many rounds (and after the last one)", 1, 10_000_000),
    "eval-node-samples": Key(
        2000, int, "test samples each node evaluates its own model on (0 = whole test set)", 0, 10_000_000
    ),
    "out-dir": Key("runs", str, "results folder; files go to <out-dir>/<run-name>/"),
    "run-name": Key("", str, "results sub-folder ('' = <strategy>-<graph>-<compressor>-s<seed>)"),
    "save-nodes": Key(False, bool, "also write every node's final de-biased model to nodes.npz"),
    "drop": Key(
        0.0,
        float,
        "probability that a link drops a message, in [0, 1) (dropped messages bounce back unless bounce=false)",
        0.0,
        1.0,
        hi_open=True,
    ),
    "link-down": Key(
        0.0,
        float,
        "probability that a link is down for a whole span of down-span rounds, in [0, 1)",
        0.0,
        1.0,
        hi_open=True,
    ),
    "down-span": Key(10, int, "length in rounds of a link-down span (>= 1)", 1, 1_000_000),
    "churn": Key(
        0.0, float, "fraction of nodes offline in each round, in [0, 1) (their mailbox waits)", 0.0, 1.0, hi_open=True
    ),
    "bounce": Key(
        True, bool, "a dropped message bounces back to its sender, who takes its mass back (false: lost, mass drifts)"
    ),
    "round-timeout": Key(
        3600.0,
        float,
        "Flower path: seconds the ServerApp waits for the nodes' replies in a round; late nodes are stragglers",
        0.0,
        1e7,
        lo_open=True,
    ),
    "exclude-after": Key(
        0,
        int,
        "stop routing to and from a node after this many refused replies (0 = never); its mass leaves the run",
        0,
        10_000_000,
    ),
    "value-bound": Key(
        1e6,
        float,
        "largest magnitude a push-sum message value (or quantization scale) and a node's model may have; the relay "
        "refuses a message beyond it (charged to its sender), receivers refuse it, senders clip to it "
        "(core/bounds.py; 3.4e38 = off)",
        0.0,
        3.4e38,
        lo_open=True,
    ),
    "checkpoint-every": Key(
        0,
        int,
        "write <out-dir>/<run-name>/checkpoint.pt every this many rounds (0 = never); on Flower the nodes keep "
        "their copy in the node store",
        0,
        10_000_000,
    ),
    "resume": Key(False, bool, "continue from <out-dir>/<run-name>/checkpoint.pt (from round 0 if there is none)"),
    "node-store": Key(
        "",
        str,
        "Flower path: folder of the nodes' state files ('' = $SPARSEPUSH_NODE_STORE or "
        "~/.cache/flower_sparsepush/node-store; 'context' = keep node state in Flower's context.state)",
    ),
    "preset": Key(
        "",
        str,
        "a named configuration the claims chose on the validation split ('' = none): "
        f"{' | '.join(PRESETS)} (run/presets.py, docs/config.md); "
        "keys set to other than their default override the preset's",
    ),
}
