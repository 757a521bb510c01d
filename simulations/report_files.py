"""The two files a diagnostic writes: ``<name>.json`` (its command and rows) and ``<name>.md`` (its table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out_dir: str | Path, name: str, command: str, rows: list[dict[str, Any]], markdown: str) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md`` (creating the folder); returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    path = out / f"{name}.md"
    path.write_text(markdown)
    print(f"wrote {path}")
    return path
