"""The ``sparsepush`` command. Bad input gets one clear line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from flower_sparsepush.core.compression import COMPRESSOR_SPECS
from flower_sparsepush.core.topology import GRAPH_NAMES

EXIT_USAGE = 2
SUBCOMMAND_MODULES = ("flower.launch", "simulations.claims", "simulations.bench", "deploy.local", "deploy.node_worker")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        from flower_sparsepush.run.keyhelp import OneLineHelp

        kwargs.setdefault("formatter_class", OneLineHelp)  # --help: one line per option, with its default
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(EXIT_USAGE, f"sparsepush: error: {message} (see '{self.prog} --help')\n")


def _consensus(args: argparse.Namespace) -> int:
    from flower_sparsepush.core.consensus import run_consensus

    result = run_consensus(
        nodes=args.nodes,
        graph=args.graph,
        compressor=args.compressor,
        gamma=args.gamma,
        rounds=args.rounds,
        dim=args.dim,
        seed=args.seed,
        form=args.form,
        trace_every=args.trace_every,
        drop=args.drop,
        link_down=args.link_down,
        churn=args.churn,
        bounce=not args.no_bounce,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "trace":
                print(f"{key:>24}: {value}")
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    print(config_keys_markdown(), end="")
    return 0


def config_keys_markdown() -> str:
    """The generated part of docs/config.md, so the docs match the code: the run-config keys (config.KEYS), the
    presets (run/presets.py) and where each key works (run/key_paths.py)."""
    from flower_sparsepush.run.config import KEYS
    from flower_sparsepush.run.key_paths import where_markdown
    from flower_sparsepush.run.presets import PRESETS

    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, spec in KEYS.items():
        meaning = spec.help.replace("|", "\\|")
        lines.append(f"| `{key}` | `{spec.default!r}` | {meaning} |")
    lines += ["", "## Presets", "", "`preset=NAME` sets these keys (and the claims' schedule: "
              "`python -c 'from flower_sparsepush.run.presets import PRESETS; print(PRESETS[\"sp-466x\"].keys)'`);",
              "keys set to other than their default override them.", "",
              "| preset | claims row | chosen for | keys beyond the schedule |", "|---|---|---|---|"]  # fmt: skip
    for name, p in PRESETS.items():
        keys = ", ".join(f"`{k}={v}`" for k, v in p.switches.items())
        lines.append(f"| `{name}` | `{p.row}` | {p.goal} | {keys} |")
    lines += ["", "## Where each key works", "", "Cells: `yes` names the test that runs the key on that path; "
              "`refused before start` is a pre-start check with one line saying why (run/key_paths.py, checked by "
              "tests/test_key_paths.py).", "", where_markdown().rstrip("\n")]  # fmt: skip
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsepush", description="Decentralized compressed push-sum training on Flower.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("consensus", help="gossip-only averaging experiment (no training)")
    c.add_argument("--nodes", type=int, default=16, help="number of nodes (>= 2)")
    c.add_argument("--graph", default="exponential", help=f"one of: {', '.join(GRAPH_NAMES)}")
    c.add_argument("--compressor", default="topk:0.01", help=f"one of: {', '.join(COMPRESSOR_SPECS)}")
    c.add_argument("--gamma", type=float, default=0.05, help="consensus step size in (0, 1]")
    c.add_argument("--form", default="ref", choices=["ref", "ef", "ref-x"], help="push-sum form (docs/algorithm.md)")
    c.add_argument("--rounds", type=int, default=1000, help="gossip rounds")
    c.add_argument("--dim", type=int, default=1000, help="vector length")
    c.add_argument("--seed", type=int, default=0, help="seed of the vectors, random graphs and compressors")
    c.add_argument("--trace-every", type=int, default=0, help="record the consensus error every N rounds")
    c.add_argument("--drop", type=float, default=0.0, help="probability that a link drops a message, in [0, 1)")
    c.add_argument("--link-down", type=float, default=0.0, help="probability that a link is down for a span of rounds")
    c.add_argument("--churn", type=float, default=0.0, help="fraction of nodes offline in each round, in [0, 1)")
    c.add_argument(
        "--no-bounce", action="store_true", help="lose dropped messages instead of returning them (mass drifts)"
    )
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_consensus)
    k = sub.add_parser("config-keys", help="print the run-config keys as a Markdown table (docs/config.md)")
    k.set_defaults(func=_config_keys)
    for name in SUBCOMMAND_MODULES:  # each module adds its own subcommands with register(subparsers)
        importlib.import_module(f"flower_sparsepush.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # every input error of the library is a ValueError with a readable message
        print(f"sparsepush {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"sparsepush {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
