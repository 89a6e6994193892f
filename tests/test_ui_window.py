"""The studio window driven offscreen: projects, import, a real DPO run on the tiny model, closing.

Each test gets its own QSettings file and temp projects; at teardown every window is closed and
deleted, background jobs are awaited, and no top-level widget may be left behind.
"""

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import QEvent, QMimeData, QPointF, QSettings, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication, QMenu, QMessageBox

from studio.core import runs, store
from studio.ui.app import LAYOUT_VERSION, MainWindow
from studio.ui.workers import wait_for_background_jobs

TIMEOUT = 180_000  # generous: the CI cores are shared; waits end as soon as the signal comes
FAST_DPO = {"max_steps": 1000, "checkpoint_every": 500, "batch_size": 2, "max_length": 256,
            "eval_max_new_tokens": 2, "learning_rate": 1e-3}


def write_pairs(path, count=8):
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"{2 * i}.",
             "rejected": f"Let me think about it at length. The answer might be {2 * i + 1}."} for i in range(count)]
    rows[3]["prompt"] = "Name a colour of the sky."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def settings_file(tmp_path, monkeypatch):
    """An isolated QSettings per test (the default scope too, in case something uses QSettings())."""
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "qsettings"))
    yield tmp_path / "studio.ini"
    QSettings.setDefaultFormat(QSettings.Format.NativeFormat)


@pytest.fixture
def make_window(qtbot, settings_file):
    before = set(QApplication.topLevelWidgets())
    windows = []

    def make(wait_for_engines=True):
        window = MainWindow(QSettings(str(settings_file), QSettings.Format.IniFormat))
        window.confirm = lambda title, text: True  # no blocking question boxes in tests
        window.ask_stop_strength = lambda: "step"
        window.show()
        if wait_for_engines:
            qtbot.waitUntil(lambda: window.engines is not None, timeout=TIMEOUT)
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.queue.stop_all()
        qtbot.waitUntil(lambda: window.queue._thread is None, timeout=TIMEOUT)
        window.close()
        window.deleteLater()
    wait_for_background_jobs()
    QApplication.processEvents()
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QApplication.processEvents()
    gc.collect()  # pyqtgraph's parentless context menus go with their Python owners
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    leaked = [w for w in QApplication.topLevelWidgets() if w not in before and not _pyqtgraph_menu(w)]
    assert not leaked, f"top-level widgets left behind: {[(type(w).__name__, w.windowTitle()) for w in leaked]}"


def _pyqtgraph_menu(widget) -> bool:
    """pyqtgraph gives every plot parentless context menus (ViewBoxMenu, PlotItem's "Plot Options"
    QMenu) that live as long as pyqtgraph's own references to the plot do: not widgets this window
    leaked. The window itself never makes a parentless menu."""
    while widget.parent() is not None:
        widget = widget.parent()
    return isinstance(widget, QMenu) and not widget.isVisible()


@pytest.fixture
def window_with_project(make_window, tmp_path, tiny_model_dir):
    window = make_window()
    assert window.create_project(tmp_path / "project", "UI test",
                                 {"kind": "folder", "path": str(tiny_model_dir)})
    return window


def import_pairs(qtbot, window, path):
    dialog = window.import_file(path)
    qtbot.waitUntil(lambda: dialog.ready, timeout=TIMEOUT)
    assert dialog.import_button.isEnabled(), dialog.errors_caption.text()
    with qtbot.waitSignal(dialog.imported, timeout=TIMEOUT):
        dialog.import_button.click()
    return dialog.dataset_id


def chart_points(window, run_id, metric="loss"):
    """Points of a run's curve in the charts panel (or counted by the placeholder)."""
    charts = window.charts
    if hasattr(charts, "points"):
        return charts.points.get(run_id, 0)
    chart = charts.chart(metric)
    curve = chart.curves.get(run_id) if chart is not None else None
    return 0 if curve is None else len(curve.x)


def launch_dpo(window, **overrides):
    setup = window.run_setup
    window.new_run("dpo")
    assert setup.current_method() == "dpo"
    setup.page("dpo").form.set_values({**FAST_DPO, **overrides})
    return setup.launch()


def test_create_import_train_pause_resume_stop_and_reopen(qtbot, window_with_project, tmp_path):
    window = window_with_project
    project_path = window.project.path
    assert "UI test" in window.windowTitle() and "UI test" in window.project_label.text()
    picker = window.projects_panel.picker  # the base model, inspected in the background
    qtbot.waitUntil(lambda: picker.info is not None or picker.error is not None, timeout=TIMEOUT)
    assert picker.architecture.text() == "LlamaForCausalLM" and picker.template.text() == "present"
    assert picker.size.text().endswith("parameters") and picker.device.text() == "cpu · float32"
    assert window.run_setup.hint.isVisibleTo(window.run_setup)  # "Import preference pairs to start a DPO run"
    assert "preference pairs" in window.run_setup.hint.text()

    # import: preview first, then the rows appear in a searchable model/view table
    import_pairs(qtbot, window, write_pairs(tmp_path / "pairs.jsonl"))
    data = window.data_panel
    assert data.stack.currentWidget() is data.content
    assert data.rows_model.rowCount() == 8 and data.proxy.rowCount() == 8
    data.search.setText("COLOUR")
    assert data.proxy.rowCount() == 1
    data.search.clear()
    assert not window.run_setup.hint.isVisibleTo(window.run_setup)

    # a real DPO run on the tiny model: paused before its first step, then resumed
    run_id = launch_dpo(window)
    assert run_id is not None, window.run_setup.error.text()
    window.runs_panel.pause()
    with qtbot.waitSignal(window.queue.paused, timeout=TIMEOUT):
        pass
    assert store.get_run(window.project.db, run_id)["status"] == "paused"
    assert window.runs_panel.selected_run_ids() == [run_id]  # the live run is followed
    assert window.resume_action.isEnabled() and not window.pause_action.isEnabled()

    window.resume_action.trigger()
    qtbot.waitUntil(lambda: chart_points(window, run_id) >= 3, timeout=TIMEOUT)  # live points in the chart
    window.pause_action.trigger()
    with qtbot.waitSignal(window.queue.paused, timeout=TIMEOUT):
        pass
    paused_step = window.runs_panel.model.record(run_id)["step"]
    assert paused_step >= 3
    assert window.runs_panel.model.record(run_id)["display_status"] == "paused"
    assert "step" in window.runs_panel.progress_label.text()

    window.resume_action.trigger()
    qtbot.waitUntil(lambda: window.runs_panel.model.record(run_id)["step"] > paused_step, timeout=TIMEOUT)
    assert "running" in window.run_label.text()  # the status bar follows the live run
    assert window.runs_panel.model.record(run_id)["started_at"] == store.get_run(window.project.db, run_id)["started_at"]
    with qtbot.waitSignal(window.queue.finished, timeout=TIMEOUT) as finished:
        window.stop_action.trigger()
    assert finished.args == [run_id, "stopped"]
    run = store.get_run(window.project.db, run_id)
    stopped_at = store.checkpoints(window.project.db, run_id)[-1]["step"]
    assert run["status"] == "stopped" and stopped_at > paused_step
    qtbot.waitUntil(lambda: not window.queue.busy, timeout=TIMEOUT)

    # close and reopen the project: the run and its curves are there
    assert window.close_project()
    assert window.runs_panel.model.rowCount() == 0
    assert window.open_project(project_path)
    assert f"Run stopped at step {stopped_at}" in window.runs_panel.log_view.toPlainText()  # the log is kept
    row = window.runs_panel.model.record(run_id)
    assert row["status"] == "stopped" and row["step"] == stopped_at and "loss" in row["last"]
    window.runs_panel.select_runs([run_id])
    qtbot.waitUntil(lambda: chart_points(window, run_id) == stopped_at, timeout=TIMEOUT)
    assert window.run_setup.start_from.count() == 2  # the base model and the stop checkpoint


def test_a_bad_file_shows_its_row_errors_and_imports_nothing(qtbot, window_with_project, tmp_path):
    window = window_with_project
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}\n'
                   '{"prompt": "Hi", "chosen": "Hello."}\n'
                   "not json\n")
    mime = QMimeData()  # dropped on the window, as a user would
    mime.setUrls([QUrl.fromLocalFile(str(bad))])
    drop = QDropEvent(QPointF(400, 300), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    window.dropEvent(drop)
    dialog = window.data_panel.preview_dialog
    assert dialog is not None and dialog.isVisible()
    qtbot.waitUntil(lambda: dialog.ready, timeout=TIMEOUT)
    assert not dialog.import_button.isEnabled()
    assert dialog.errors_box.isVisibleTo(dialog) and "2 problems" in dialog.errors_caption.text()
    cells = [(dialog.errors.item(r, 0).text(), dialog.errors.item(r, 1).text(), dialog.errors.item(r, 2).text())
             for r in range(dialog.errors.rowCount())]
    assert ("2", "rejected", "missing") in cells
    assert any(row == "3" and "invalid JSON" in message for row, _field, message in cells)
    assert dialog.rows.rowCount() == 1  # the valid row is still previewed
    dialog.start_import()  # refused while there are problems
    assert store.datasets(window.project.db) == []
    dialog.reject()
    assert window.data_panel.stack.currentWidget() is window.data_panel.empty


def test_a_dpo_run_without_pairs_is_refused_inline(qtbot, window_with_project):
    window = window_with_project
    assert launch_dpo(window) is None
    assert window.run_setup.error.isVisibleTo(window.run_setup)
    assert "no preference pairs" in window.run_setup.error.text()
    assert store.list_runs(window.project.db) == []


def test_a_bad_setting_turns_its_field_red_with_the_validators_message(qtbot, window_with_project):
    window = window_with_project
    assert launch_dpo(window, checkpoint_every=0) is None
    form = window.run_setup.page("dpo").form
    assert "must be at least 1" in form.editors["checkpoint_every"].widget.toolTip()
    assert "c62828" in form.labels["checkpoint_every"].styleSheet()
    assert form.labels["max_steps"].styleSheet() == ""
    assert store.list_runs(window.project.db) == []
    form.set_values({"checkpoint_every": 5})
    window.run_setup.launch()  # refused for another reason (no pairs): the field is no longer marked
    assert form.labels["checkpoint_every"].styleSheet() == ""


def test_a_run_that_runs_out_of_memory_fails_readably_and_the_window_stays_usable(
        qtbot, window_with_project, tmp_path, monkeypatch):
    # Runs train in a child process, which gets this registry: a toy engine that fails as CUDA does.
    monkeypatch.setitem(runs.ENGINE_MODULES, "toy", "tests.toy_engine")
    window = window_with_project
    import_pairs(qtbot, window, write_pairs(tmp_path / "pairs.jsonl"))
    config = runs.make_config("toy", {"max_steps": 6, "checkpoint_every": 1, "eval_max_new_tokens": 2, "fail_at_step": 2,
                                      "failure": "CUDA out of memory. Tried to allocate 1.50 GiB (simulated)"})
    run_id = runs.create_run(window.project.db, config)
    with qtbot.waitSignal(window.queue.failed, timeout=TIMEOUT):
        window._on_run_created(run_id)  # as the run setup does after a launch
    boxes = [box for box in window.findChildren(QMessageBox) if box.isVisible()]
    assert len(boxes) == 1 and "smaller batch size" in boxes[0].text()
    boxes[0].accept()
    qtbot.waitUntil(lambda: not window.queue.busy, timeout=TIMEOUT)
    assert window.runs_panel.model.record(run_id)["status"] == "failed"
    assert [c["step"] for c in store.checkpoints(window.project.db, run_id)] == [1, 2]

    with qtbot.waitSignal(window.queue.finished, timeout=TIMEOUT) as finished:  # still usable: the next run trains
        second = launch_dpo(window, max_steps=2)
    assert finished.args == [second, "completed"]


def test_closing_during_a_run_stops_it_cleanly_with_a_checkpoint(qtbot, make_window, tmp_path, tiny_model_dir):
    window = make_window()
    assert window.create_project(tmp_path / "project", "Close test", {"kind": "folder", "path": str(tiny_model_dir)})
    project_path = window.project.path
    import_pairs(qtbot, window, write_pairs(tmp_path / "pairs.jsonl"))
    run_id = launch_dpo(window)
    qtbot.waitUntil(lambda: (window.runs_panel.model.record(run_id) or {}).get("step", 0) >= 2, timeout=TIMEOUT)
    asked = []
    window.ask_stop_strength = lambda: asked.append("strength") or "step"
    assert not window.close()  # not yet: it waits for the step boundary
    assert asked and window.queue.stopping
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=TIMEOUT)
    assert window.project is None and not window.queue.busy
    db = store.connect(project_path)
    run = store.get_run(db, run_id)
    checkpoint = store.checkpoints(db, run_id)[-1]
    assert run["status"] == "stopped" and checkpoint["step"] == max(store.run_metrics(db, run_id)["loss"][0])
    db.close()


def test_long_phases_show_progress_and_stop_now_ends_a_run_in_its_reference_pass(qtbot, window_with_project,
                                                                                tmp_path):
    window = window_with_project
    import_pairs(qtbot, window, write_pairs(tmp_path / "pairs.jsonl"))
    seen = []  # what the table, the progress label and the status bar said when each report came

    def on_progress(run_id, phase, done, total):
        seen.append((phase, window.runs_panel.model.record(run_id).get("phase", ""),
                     window.runs_panel.progress_label.text(), window.run_label.text()))
        if phase.startswith("Reference pass") and window.stop_now_action.isEnabled():
            window.stop_now_action.trigger()

    window.queue.progress.connect(on_progress)  # after the panel's own slot: it has updated by now
    with qtbot.waitSignal(window.queue.finished, timeout=TIMEOUT) as finished:
        run_id = launch_dpo(window)
    window.queue.progress.disconnect(on_progress)
    assert finished.args == [run_id, "stopped"]
    loading = [entry for entry in seen if entry[0] == "Loading the model"][0]
    assert loading[1].startswith("Loading the model 0/1") and "Loading the model" in loading[3]
    reference = [entry for entry in seen if entry[0].startswith("Reference pass")][0]
    assert reference[1].startswith("Reference pass (pairs) 0/") and "Reference pass" in reference[2]
    assert store.get_run(window.project.db, run_id)["status"] == "stopped"
    assert store.checkpoints(window.project.db, run_id) == [] and store.run_metrics(window.project.db, run_id) == {}
    qtbot.waitUntil(lambda: not window.queue.busy, timeout=TIMEOUT)
    assert window.runs_panel.model.record(run_id)["display_status"] == "stopped"

    store.get_run(window.project.db, run_id)  # resumed from the start (no checkpoint yet), to a short end
    window.project.db.execute("UPDATE runs SET config = json_set(config, '$.max_steps', 2) WHERE id = ?", [run_id])
    window.runs_panel.refresh()
    with qtbot.waitSignal(window.queue.finished, timeout=TIMEOUT) as finished:
        window.runs_panel.start(run_id)
    assert finished.args == [run_id, "completed"]
    assert store.run_metrics(window.project.db, run_id)["loss"][0] == [1, 2]


def test_queue_run_shows_its_settings_and_asks_once(qtbot, window_with_project, tmp_path):
    window = window_with_project
    import_pairs(qtbot, window, write_pairs(tmp_path / "pairs.jsonl"))
    setup = window.run_setup
    window.new_run("dpo")
    setup.page("dpo").form.set_values({**FAST_DPO, "max_steps": 3, "beta": 0.25})
    setup.launch_button.click()
    box = [b for b in window.findChildren(QMessageBox) if b.isVisible()][-1]
    settings = box.informativeText()
    assert "max_steps: <b>3</b>" in settings and "beta: <b>0.25</b>" in settings  # what it will use
    assert "start from: <b>Base model</b>" in settings and "loss_type" not in settings  # defaults left out
    assert store.list_runs(window.project.db) == []  # nothing started before the answer
    box.checkBox().setChecked(True)  # don't ask again
    box.button(QMessageBox.StandardButton.Ok).click()
    assert len(store.list_runs(window.project.db)) == 1
    window.queue.stop_all(now=True)
    qtbot.waitUntil(lambda: not window.queue.busy, timeout=TIMEOUT)
    setup.launch_button.click()  # no question this time
    assert not [b for b in window.findChildren(QMessageBox) if b.isVisible()]
    assert len(store.list_runs(window.project.db)) == 2

def test_run_setup_forms_come_from_the_engine_dataclasses(qtbot, window_with_project):
    import dataclasses

    from studio.core import dpo, grpo, ppo, rloo

    setup = window_with_project.run_setup
    for method, module in (("dpo", dpo), ("ppo", ppo), ("grpo", grpo), ("rloo", rloo)):
        form = setup.page(method).form
        expected = {f.name for f in dataclasses.fields(module.Config)} - {"method", "parent_checkpoint_id", "reward_sources"}
        assert set(form.editors) == expected
        assert all(form.labels[name].toolTip() for name in expected)  # one line of help each
        config = runs.make_config(method, setup.page(method).overrides())
        assert config == module.Config()  # the untouched form gives the engine's defaults
    assert "reference" in setup.page("dpo").form.labels["beta"].toolTip()
    assert setup.page("dpo").form.editors["learning_rate"].widget.text() == "0.0002"

    setup.apply_preset("Shape with PPO")
    assert setup.current_method() == "ppo"
    rewards = setup.page("ppo").rewards
    assert rewards.value() == ppo.Config().reward_sources  # the table round-trips the engine's default
    rewards.add_row({"type": "length_band", "weight": 0.5})
    added = rewards.value()[-1]
    assert added["type"] == "length_band" and added["weight"] == 0.5 and added["max"] == 60
    setup.apply_preset("Shape with GRPO")
    assert setup.current_method() == "grpo" and setup.page("grpo").form.values()["beta"] == 0.04
    assert setup.page("grpo").rewards.value() == grpo.Config().reward_sources
    setup.apply_preset("Settle with DPO")
    assert setup.current_method() == "dpo" and setup.page("dpo").form.values()["beta"] == 0.1


def test_run_setup_applies_the_defaults_for_the_project_models_size(qtbot, window_with_project, monkeypatch):
    import math

    from studio.core import defaults

    setup = window_with_project.run_setup
    assert setup.page("dpo").form.values()["learning_rate"] == 2e-4  # the tiny model is small
    # Reopened with the small class ending below the tiny model's size, it counts as "medium".
    monkeypatch.setattr(defaults, "SIZE_CLASSES", (("small", 10), ("medium", 4_000_000_000), ("large", math.inf)))
    setup.set_project(window_with_project.project)
    form = setup.page("dpo").form
    assert form.editors["learning_rate"].widget.text() == "2e-05"
    assert setup.page("ppo").form.values()["learning_rate"] == 1e-4
    assert runs.make_config("dpo", setup.page("dpo").overrides()).learning_rate == 2e-5  # what a launch gets
    form.set_values({"learning_rate": 3e-5})
    setup.set_project(window_with_project.project)  # the same size again: the user's edit stays
    assert form.values()["learning_rate"] == 3e-5
    window_with_project.new_run("dpo")
    setup.reset()
    assert form.values()["learning_rate"] == 2e-5  # Reset goes back to the size's default


def test_edited_reward_sources_become_the_project_setting_and_come_back(qtbot, window_with_project):
    window = window_with_project
    rewards = window.run_setup.page("ppo").rewards
    assert store.get_setting(window.project.db, "reward_sources") is None  # nothing edited yet
    rewards.add_button.click()
    assert store.get_setting(window.project.db, "reward_sources") == rewards.value()
    edited = rewards.value()
    rewards.set_value([])  # as another project would show
    window.run_setup.set_project(window.project)
    assert rewards.value() == edited
    assert window.run_setup.page("grpo").rewards.value() == window.run_setup.page("rloo").rewards.value() == edited

def test_runs_panel_diffs_two_configs_and_keeps_the_best_checkpoint(qtbot, window_with_project):
    window = window_with_project
    db = window.project.db
    first = store.create_run(db, "dpo", runs.make_config("dpo", {"beta": 0.1}).to_json(), status="stopped")
    second = store.create_run(db, "dpo", runs.make_config("dpo", {"beta": 0.3, "max_steps": 9}).to_json(), status="stopped")
    store.write_metrics(db, first, [{"step": s, "time": 0.0, "loss": loss} for s, loss in
                                    ((1, 0.7), (2, 0.5), (3, 0.6), (4, 0.4), (5, 0.45))])
    for step in (2, 3, 5):
        store.add_checkpoint(db, first, step, f"/tmp/checkpoint-{step}")
    panel = window.runs_panel
    panel.refresh()

    with qtbot.waitSignal(panel.selection_changed):
        panel.select_runs([first, second])
    assert panel.diff.rowCount() == 2
    assert {panel.diff.item(r, 0).text() for r in range(2)} == {"beta", "max_steps"}

    panel.select_runs([first])
    assert panel.best_metric.currentText() == "loss" and panel.best_direction.currentData() is False
    with qtbot.waitSignal(panel.best_kept) as kept:
        panel.stop_and_keep_best()
    best = store.get_setting(db, "best_checkpoints")[str(first)]
    assert best["step"] == 5 and best["value"] == 0.45 and kept.args == [first, best["checkpoint_id"]]
    assert window.run_setup.start_from.currentData() == best["checkpoint_id"]  # preselected to start from


def test_layout_is_remembered_and_reset_when_its_version_changes(qtbot, make_window, tmp_path, tiny_model_dir, settings_file):
    window = make_window(wait_for_engines=False)
    assert window.create_project(tmp_path / "p", "Remembered", {"kind": "folder", "path": str(tiny_model_dir)})
    window.docks["data"].hide()
    window.close()
    assert not window.isVisible()

    again = make_window(wait_for_engines=False)
    assert again.docks["data"].isHidden()
    assert again.last_project() == (tmp_path / "p").resolve()
    assert again.recent_projects() == [str((tmp_path / "p").resolve())]
    again.reset_layout()
    assert not again.docks["data"].isHidden()
    again.docks["data"].hide()
    again.close()

    settings = QSettings(str(settings_file), QSettings.Format.IniFormat)
    settings.setValue("window/layout_version", LAYOUT_VERSION - 1)
    settings.sync()
    third = make_window(wait_for_engines=False)
    assert not third.docks["data"].isHidden()  # an old layout is dropped


def test_the_window_module_does_not_import_torch():
    code = ("import sys, studio.ui.app\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'studio.core.runs', 'studio.core.generation') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"


def test_a_new_users_first_hour(qtbot, make_window, tmp_path, tiny_model_dir):
    """The walk of issue 14, with real widgets on the tiny model: a short DPO run stopped now and
    resumed, 3 PPO steps with a checkpoint each, base against checkpoint in Compare, 5 pairs labelled
    from the keyboard, a relaunch that shows it all again, and the advisor on the PPO run."""
    window = make_window()
    assert window.create_project(tmp_path / "first-hour", "First hour", {"kind": "folder", "path": str(tiny_model_dir)})
    project_path = window.project.path
    import_pairs(qtbot, window, write_pairs(tmp_path / "pairs.jsonl"))
    db = window.project.db
    store.add_dataset(db, "eval", "prompts", [{"prompt": f"Say {word}."} for word in ("hi", "yes", "no")], is_eval=True)
    store.add_dataset(db, "prompts", "prompts", [{"prompt": f"Q{i}:"} for i in range(8)])

    # A 4-step DPO run: its first step, held there (pause, so the tiny model cannot finish first), then
    # "stop now", then resume from its last checkpoint.
    pause_at_first_step = lambda run_id, record: window.pause_action.trigger() if record["step"] == 1 else None
    window.queue.metrics.connect(pause_at_first_step)
    with qtbot.waitSignal(window.queue.paused, timeout=TIMEOUT):
        dpo_run = launch_dpo(window, max_steps=4, checkpoint_every=1)
    window.queue.metrics.disconnect(pause_at_first_step)
    assert store.checkpoints(db, dpo_run) and store.get_run(db, dpo_run)["status"] == "paused"
    with qtbot.waitSignal(window.queue.finished, timeout=TIMEOUT) as finished:
        window.stop_now_action.trigger()
    assert finished.args == [dpo_run, "stopped"]
    qtbot.waitUntil(lambda: not window.queue.busy, timeout=TIMEOUT)
    window.runs_panel.select_runs([dpo_run])
    with qtbot.waitSignal(window.queue.finished, timeout=TIMEOUT) as finished:
        window.start_action.trigger()
    assert finished.args == [dpo_run, "completed"]
    assert store.run_metrics(db, dpo_run)["loss"][0] == [1, 2, 3, 4]
    qtbot.waitUntil(lambda: not window.queue.busy, timeout=TIMEOUT)
    assert window.runs_panel.model.record(dpo_run)["display_status"] == "completed"

    # 3 PPO steps, a checkpoint every step.
    window.new_run("ppo")
    window.run_setup.page("ppo").form.set_values({"max_steps": 3, "checkpoint_every": 1, "prompts_per_step": 4,
                                                  "max_new_tokens": 6, "eval_max_new_tokens": 4})
    with qtbot.waitSignal(window.queue.finished, timeout=TIMEOUT) as finished:
        ppo_run = window.run_setup.launch()
    assert finished.args == [ppo_run, "completed"]
    assert [c["step"] for c in store.checkpoints(db, ppo_run)] == [0, 1, 2, 3]  # 0: the start state
    qtbot.waitUntil(lambda: not window.queue.busy, timeout=TIMEOUT)

    # Compare the base and the last PPO checkpoint: both columns of the grid are stored answers.
    compare_panel = window.compare_panel
    window.show_tab(compare_panel)
    compare_panel.refresh()
    last_ppo = store.checkpoints(db, ppo_run)[-1]["id"]
    compare_panel.panes[0].set_state(None)
    compare_panel.panes[1].set_state(last_ppo)
    compare_panel.set_grid_mode(True)
    grid = compare_panel.grid_model
    assert grid.rowCount() == 3 and grid.columnCount() == 3  # the prompt, then the base and the checkpoint
    assert all(grid.text(row, column) not in (None, grid.MISSING) for row in range(3) for column in (1, 2))

    # Label 5 pairs, base against that checkpoint, from the keyboard.
    label = window.label_panel
    window.show_tab(label)
    label.reveal_ms = 0
    label.annotator_edit.setText("walker")
    label.mode_combo.setCurrentIndex(label.mode_combo.findData("states"))
    label.state_a_combo.setCurrentIndex(label.state_a_combo.findData("base"))
    label.state_b_combo.setCurrentIndex(label.state_b_combo.findData(last_ppo))
    label.prompts_combo.setCurrentIndex(label.prompts_combo.findData("train"))
    label.count_spin.setValue(5)
    label.tokens_spin.setValue(4)
    label.create_button.click()
    box = [b for b in window.findChildren(QMessageBox) if b.isVisible()][-1]  # the batch's settings, asked once
    box.button(QMessageBox.StandardButton.Ok).click()
    qtbot.waitUntil(lambda: label.worker is None, timeout=TIMEOUT)
    assert label.pages.currentIndex() == 0 and label.current is not None
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow)  # shortcuts only reach the active window
    label.setFocus()
    for key in (Qt.Key.Key_A, Qt.Key.Key_B, Qt.Key.Key_T, Qt.Key.Key_A, Qt.Key.Key_X):
        qtbot.keyClick(label.focusWidget() or label, key)
    labels = db.execute("SELECT choice FROM labels WHERE annotator = 'walker' ORDER BY id").fetchall()
    assert [row[0] for row in labels] == ["a", "b", "tie", "a", "both_bad"]

    # Relaunch: the runs, their state and their log are there.
    window.close()
    assert not window.isVisible()
    again = make_window()
    assert again.open_project(project_path)
    assert {again.runs_panel.model.record(r)["status"] for r in (dpo_run, ppo_run)} == {"completed"}
    assert "Run completed at step 3" in again.runs_panel.log_view.toPlainText()

    # The advisor on the PPO run (after the relaunch, where its error used to come back as a modal).
    advisor = again.advisor_panel
    again.show_tab(advisor)
    with qtbot.waitSignal(advisor.advice_ready, timeout=TIMEOUT,
                          check_params_cb=lambda advice: advice.run_id == ppo_run):
        advisor.run_selector.setCurrentIndex(advisor.run_selector.findData(ppo_run))
    assert not [box for box in again.findChildren(QMessageBox) if box.isVisible()]


def test_opening_a_project_takes_its_daily_backup_and_check_reports_a_damaged_checkpoint(qtbot, make_window, tmp_path,
                                                                                         tiny_model_dir):
    window = make_window()
    assert window.create_project(tmp_path / "p", "P", {"kind": "folder", "path": str(tiny_model_dir)})
    backups = list((window.project.path / store.BACKUP_DIR).glob("studio-*.db"))
    assert len(backups) == 1  # taken on open; the hourly look takes no second one the same day
    window.backup_daily()
    assert list((window.project.path / store.BACKUP_DIR).glob("studio-*.db")) == backups

    run_id = store.create_run(window.project.db, "dpo", {})
    folder = window.project.path / "runs" / str(run_id) / "checkpoint-1"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    store.add_checkpoint(window.project.db, run_id, 1, str(folder))
    window.check_project()

    def shown():
        return [b for b in window.findChildren(QMessageBox) if b.isVisible()]

    qtbot.waitUntil(lambda: bool(shown()), timeout=60_000)
    box = shown()[-1]
    assert box.windowTitle() == "The project has problems"
    assert "adapter_model.safetensors" in box.detailedText()
