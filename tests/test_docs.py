"""The docs say what the code does: the run-config table and the README's promises."""

from pathlib import Path

from flower_sparsepush.cli import build_parser, config_keys_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_config_table_in_docs_matches_the_code():
    text = (ROOT / "docs" / "config.md").read_text()
    assert config_keys_markdown() in text, "docs/config.md is stale: regenerate it with `make docs`"


def test_readme_shows_the_two_commands_and_every_subcommand():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"sparsepush {name}" in readme, f"README does not mention `sparsepush {name}`"


def test_pyproject_declares_every_run_config_key_with_its_default():
    """`flwr run` refuses keys that [tool.flwr.app.config] does not declare, so it must list every key."""
    import tomllib

    from flower_sparsepush.run.config import KEYS

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(KEYS)
    for key, spec in KEYS.items():
        assert declared[key] == spec.default, f"pyproject default of {key!r} differs from config.py"
