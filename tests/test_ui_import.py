"""The import preview dialog on TRL's tool-call preference row: the tools column and the calls are shown."""

import json

from studio.ui.panels.data import ImportPreviewDialog
from tests.test_trl_formats import TOOL_ROW

TIMEOUT = 60_000


def test_the_preview_lists_the_tools_column_and_shows_the_calls(qtbot, project, tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TOOL_ROW) + "\n")
    dialog = ImportPreviewDialog(path, project.path)
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: dialog.ready, timeout=TIMEOUT)
    assert dialog.import_button.isEnabled()
    plan = dialog.column_plan.text()
    assert plan.startswith("Columns: prompt: the prompt; chosen: the preferred response;")
    assert "tools: function schemas, kept with the pair and given to the chat template" in plan
    chosen = dialog.rows.data(dialog.rows.index(0, 1))
    assert chosen.startswith('assistant: [calls get_color({"what": "sky"})] ⏎ tool: blue ⏎ assistant: It is blue.')
