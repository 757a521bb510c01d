"""simulations/report_files.py: a diagnostic's two files hold its command, rows and table, in a folder it creates."""

import json

from flower_sparsepush.simulations.report_files import write_report


def test_write_report_writes_the_rows_with_their_command_and_the_table(tmp_path):
    rows = [{"round": 25, "model_norm": 11.7}, {"round": 50, "model_norm": float("inf")}]
    path = write_report(tmp_path / "new" / "folder", "probe", "python -m x --rounds 50", rows, "| a |\n")
    assert path == tmp_path / "new" / "folder" / "probe.md" and path.read_text() == "| a |\n"
    saved = json.loads((tmp_path / "new" / "folder" / "probe.json").read_text())
    assert saved == {"command": "python -m x --rounds 50", "rows": rows}
