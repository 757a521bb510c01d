"""``--help`` text of the run-config keys, generated from :data:`config.KEYS` (the table that validates them), so
help and validation cannot drift. Standard library only: ``make help`` runs it before the venv exists.

- :func:`key_help` / :func:`add_key_options`: the ``--key V`` options of ``sparsepush train`` and ``deploy-local``;
- :func:`keys_text`: one line per key (``key=default  meaning``) for ``python -m flower_sparsepush.run.inprocess --help``
  and ``make help``;
- :class:`OneLineHelp`: an argparse formatter that keeps each option's help on its own single line.

``python -m flower_sparsepush.run.keyhelp`` prints :func:`keys_text`.
"""

from __future__ import annotations

import argparse
from typing import Any

from flower_sparsepush.run.config import KEYS, Key


def show_default(value: Any) -> str:
    """A default as it is typed on a command line: true/false, numbers, '' for an empty string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    return str(value)


def _choices(spec: Key) -> str:
    """`` (one of: a, b)`` when the key has a fixed list that its help does not already spell out."""
    if not spec.choices or all(c in spec.help for c in spec.choices):
        return ""
    return f" (one of: {', '.join(spec.choices)})"


def key_help(spec: Key, default: Any = None) -> str:
    """One line: the key's meaning, its allowed values when it has a fixed list, and its default."""
    return f"{spec.help}{_choices(spec)}; default {show_default(spec.default if default is None else default)}"


def keys_text(defaults: dict[str, Any] | None = None, indent: str = "  ") -> str:
    """Every run-config key as ``key=default  meaning``, one line each, in the order of :data:`config.KEYS`."""
    defaults = defaults or {}
    pairs = [(f"{k}={show_default(defaults.get(k, spec.default))}", spec) for k, spec in KEYS.items()]
    width = max(len(p) for p, _ in pairs) + 2
    lines = []
    for pair, spec in pairs:
        lines.append(f"{indent}{pair:<{width}}{spec.help}{_choices(spec)}")
    return "\n".join(lines) + "\n"


class OneLineHelp(argparse.RawDescriptionHelpFormatter):
    """Each option and its help on one line (no wrapping), with ``; default X`` added where the help does not give
    one; the description and epilog keep their line breaks."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return [" ".join(text.split())]

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
        if flag or action.default in (None, argparse.SUPPRESS) or not action.option_strings or "default" in text:
            return text
        shown = show_default(action.default).replace("%", "%%")  # argparse %-formats help strings
        return f"{text}; default {shown}" if text else f"default {shown}"


def add_key_options(
    parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Add ``--<key> V`` for every run-config key except ``skip`` (argparse default None: only given keys are set;
    the help shows ``defaults`` where the command has its own, else the key's default)."""
    group = parser.add_argument_group("run-config keys (validated by config.validate; docs/config.md)")
    for key, spec in KEYS.items():
        if key in skip:
            continue
        group.add_argument(
            f"--{key}",
            dest=key.replace("-", "_"),
            default=None,
            metavar="V",
            help=key_help(spec, (defaults or {}).get(key)),
        )


if __name__ == "__main__":
    print(keys_text(), end="")
