"""The label panel: batches generated in the background, labelled from the keyboard."""

import json
import time

import pytest
from PySide6.QtCore import QSettings, Qt

from studio.core import labelling, store
from studio.ui.panels.label import LabelPanel


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path):
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))


def make_panel(qtbot, project, annotator="ann"):
    panel = LabelPanel()
    panel.reveal_ms = 0
    qtbot.addWidget(panel)
    panel.annotator_edit.setText(annotator)
    panel.set_project(project.path)
    panel.resize(1200, 800)
    panel.show()
    qtbot.waitExposed(panel)
    panel.activateWindow()
    qtbot.waitUntil(panel.isActiveWindow)  # shortcuts only reach the active window
    panel.setFocus()
    return panel


def press(qtbot, panel, key, modifier=Qt.KeyboardModifier.NoModifier):
    qtbot.keyClick(panel.focusWidget() or panel, key, modifier)


def create_batch(qtbot, panel, mode, count):
    panel.mode_combo.setCurrentIndex(panel.mode_combo.findData(mode))
    panel.count_spin.setValue(count)
    panel.create_batch()
    assert panel.worker is not None
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60000)


def test_label_twenty_generated_pairs_with_the_keyboard(qtbot, project):
    store.add_dataset(project.db, "train", "prompts",
                      [{"prompt": [{"role": "user", "content": f"Tell me fact {i}."}]} for i in range(20)])
    panel = make_panel(qtbot, project)
    panel.prompts_combo.setCurrentIndex(panel.prompts_combo.findData("train"))
    panel.tokens_spin.setValue(4)
    panel.temperature_spin.setValue(1.0)
    create_batch(qtbot, panel, "samples", 20)
    ids = panel.session.queue
    assert len(ids) == 20 and panel.current["id"] == ids[0]

    changes = []
    panel.labels_changed.connect(lambda: changes.append(1))
    for key in (Qt.Key.Key_A, Qt.Key.Key_B, Qt.Key.Key_T, Qt.Key.Key_U, Qt.Key.Key_X):
        press(qtbot, panel, key)
    assert len(changes) == 5  # an undo changes the labels too
    press(qtbot, panel, Qt.Key.Key_S)
    press(qtbot, panel, Qt.Key.Key_E)
    press(qtbot, panel, Qt.Key.Key_B)  # picks the side to edit; typing now edits it
    press(qtbot, panel, Qt.Key.Key_End, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClicks(panel.focusWidget(), " Better.")
    press(qtbot, panel, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    for key in [Qt.Key.Key_A, Qt.Key.Key_B, Qt.Key.Key_T] * 5:
        press(qtbot, panel, key)

    assert panel.current is None and panel.progress_bar.value() == 20
    standing = {label["comparison_id"]: label for label in store.effective_labels(project.db)}
    assert [standing[cid]["choice"] for cid in ids[:5]] == ["a", "b", "both_bad", "skip", "b"]
    assert [standing[cid]["choice"] for cid in ids[5:]] == ["a", "b", "tie"] * 5
    assert [h["choice"] for h in labelling.label_history(project.db, ids[2])] == ["tie", "undo", "both_bad"]
    edited = labelling.get_comparison(project.db, ids[4])["response_b"] + " Better."
    assert standing[ids[4]]["edited_text"] == edited
    assert {p["comparison_id"]: p["chosen"] for p in store.labelled_pairs(project.db)}[ids[4]] == [
        {"role": "assistant", "content": edited}]
    assert len(labelling.label_history(project.db)) == 22  # 21 labels and 1 undo row


def test_sources_are_revealed_after_the_label_and_the_ranking_updates(qtbot, project):
    db = project.db
    run_id = store.create_run(db, "ppo", {}, name="PPO #1")
    checkpoint_id = store.add_checkpoint(db, run_id, 50, "/nowhere")
    for state_a, state_b in [("base", checkpoint_id), (checkpoint_id, "base")]:
        db["comparisons"].insert({
            "prompt": json.dumps("Why is the sky blue?"), "response_a": "Because of scattering.",
            "response_b": "Blue.", "created_at": time.time(),
            "source_a": json.dumps({"kind": "model", "state": state_a, "name": labelling.describe_state(db, state_a)}),
            "source_b": json.dumps({"kind": "model", "state": state_b, "name": labelling.describe_state(db, state_b)})})
    panel = make_panel(qtbot, project)
    panel.reveal_ms = 300
    assert panel.views["a"].source.text() == ""  # blind
    press(qtbot, panel, Qt.Key.Key_B)
    assert panel.views["b"].source.text().endswith("PPO #1, checkpoint 1 (step 50)")
    qtbot.waitUntil(lambda: panel.views["b"].source.text() == "")  # the next pair, blind again
    press(qtbot, panel, Qt.Key.Key_A)
    press(qtbot, panel, Qt.Key.Key_A)  # during the reveal a key only moves on, labelling nothing
    assert len(labelling.label_history(db)) == 2 and panel.current is None
    panel.refresh_results()
    assert panel.results_table.rowCount() == 2
    assert panel.results_table.item(0, 0).text() == "PPO #1, checkpoint 1 (step 50)"  # won both
    assert panel.results_table.item(0, 2).text() == "100%"


def test_imported_pairs_batch_and_the_annotator_is_remembered(qtbot, project):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    store.add_dataset(project.db, "hh", "preference", rows)
    panel = make_panel(qtbot, project, annotator="maya")
    create_batch(qtbot, panel, "pairs", 3)
    assert len(panel.session.queue) == 3 and panel.session.progress()["by_source"] == {
        "pairs: hh": {"done": 0, "total": 3}}
    panel.buttons["A"].click()
    assert store.effective_labels(project.db)[0]["annotator"] == "maya"

    remembered = LabelPanel()
    qtbot.addWidget(remembered)
    assert remembered.annotator_edit.text() == "maya"


def test_imported_pairs_with_tool_calls_are_not_turned_into_text_comparisons(qtbot, project):
    from PySide6.QtWidgets import QMessageBox

    from tests.test_trl_formats import STORED_TOOL_PAIR

    store.add_dataset(project.db, "tools", "preference", [STORED_TOOL_PAIR])
    panel = make_panel(qtbot, project)
    panel.mode_combo.setCurrentIndex(panel.mode_combo.findData("pairs"))
    panel.create_batch()
    (box,) = [box for box in panel.findChildren(QMessageBox) if box.isVisible()]
    assert box.windowTitle() == "Cannot create comparisons" and box.text().startswith("These pairs have tool calls")
    assert panel.worker is None and store.count_rows(project.db, "comparisons") == 0
