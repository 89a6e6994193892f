"""The compare panel: stored outputs at once, scrubbing, diff highlights, grid mode, streaming jobs."""

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor

from studio.core import compare, runs, store
from studio.ui.panels.compare import HIGHLIGHT, ComparePanel
from studio.ui.workers import wait_for_background_jobs

PROMPTS = ("Say hi.", "Name a colour.", "What is 2+2?")
STORED = {  # step -> stored text per eval prompt, written over the toy run's random bytes
    1: ("Hello there, friend!", "Blue.", "Four."),
    2: ("Hello there!", "Blue, like the sky.", "Four."),
}


@pytest.fixture(scope="module")
def project_path(tmp_path_factory, tiny_model_dir):
    """A toy run with checkpoints at steps 1 and 2, their stored samples replaced by known texts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(runs.ENGINE_MODULES, "toy", "tests.toy_engine")
        with store.Project.create(tmp_path_factory.mktemp("ui-compare") / "project",
                                  base_model={"kind": "folder", "path": str(tiny_model_dir)}) as project:
            db = project.db
            store.add_dataset(db, "eval", "prompts", [{"prompt": [{"role": "user", "content": text}]}
                                                      for text in PROMPTS], is_eval=True)
            config = runs.make_config("toy", {"max_steps": 2, "checkpoint_every": 1, "eval_max_new_tokens": 4})
            runs.execute(project.path, runs.create_run(db, config))
            prompt_ids = [p["id"] for p in store.eval_prompts(db)]
            for checkpoint in store.checkpoints(db):
                for prompt_id, text in zip(prompt_ids, STORED[checkpoint["step"]]):
                    db.execute("UPDATE samples SET text = ? WHERE checkpoint_id = ? AND prompt_id = ?",
                               [text, checkpoint["id"], prompt_id])
            db.conn.commit()
            return project.path


@pytest.fixture
def panel(qtbot, project_path):
    panel = ComparePanel()
    qtbot.addWidget(panel)
    panel.resize(1200, 700)
    panel.set_project(project_path)
    yield panel
    panel.cancel_generation()
    assert wait_for_background_jobs(30000)
    qtbot.wait(10)  # deliver the last queued signals while the panel still exists


def choose(pane, step):
    pane.combo.setCurrentIndex(pane.combo.findText(f"TOY #1, checkpoint {step} (step {step})"))  # one a step


def text_of(pane):
    return pane.browser.toPlainText()


def highlighted(pane):
    """The runs of text drawn on the highlight colour in a pane."""
    runs_found = []
    block = pane.browser.document().begin()
    while block.isValid():
        fragments = block.begin()
        while not fragments.atEnd():
            fragment = fragments.fragment()
            if fragment.charFormat().background().color() == QColor(HIGHLIGHT):
                runs_found.append(fragment.text())
            fragments += 1
        block = block.next()
    return runs_found


def test_two_panes_show_their_stored_texts_at_once(panel):
    assert len(panel.panes) == 2
    first, second = panel.panes
    choose(first, 1)
    choose(second, 2)
    # No waiting: stored outputs come from the store in the window's thread.
    assert text_of(first) == "Hello there, friend!"
    assert text_of(second) == "Hello there!"
    assert "stored at checkpoint time" in first.figures.text()


def test_moving_the_slider_shows_that_checkpoints_output(panel):
    pane = panel.panes[1]
    choose(pane, 2)
    panel.prompt_box.setCurrentIndex(1)
    assert text_of(pane) == "Blue, like the sky." and pane.slider.value() == 1
    pane.slider.setValue(0)
    assert text_of(pane) == "Blue."
    assert pane.combo.currentText() == "TOY #1, checkpoint 1 (step 1)" and pane.step_label.text() == "step 1 · 1 of 2"


def test_words_that_differ_from_the_first_pane_are_highlighted(panel):
    first, second = panel.panes
    choose(first, 1)
    choose(second, 2)
    panel.prompt_box.setCurrentIndex(1)  # "Blue." against "Blue, like the sky."
    assert highlighted(first) == []  # the reference
    assert "".join(highlighted(second)) == "Blue, like the sky."
    panel.prompt_box.setCurrentIndex(2)  # "Four." in both
    assert highlighted(second) == [] and "same text as the reference" in second.figures.text()


def test_grid_mode_lays_out_eval_prompts_against_states(panel):
    first, second = panel.panes
    assert first.state is None  # the base
    choose(second, 2)
    panel.add_pane()
    choose(panel.panes[2], 1)
    panel.grid_button.click()
    model = panel.grid_model
    assert panel.view_stack.currentWidget() is panel.grid_box
    assert model.rowCount() == len(PROMPTS) and model.columnCount() == 1 + 3
    assert [model.headerData(column, Qt.Orientation.Horizontal) for column in range(4)] == ["Prompt", "Base model", "TOY #1, checkpoint 2 (step 2)", "TOY #1, checkpoint 1 (step 1)"]
    cell = lambda row, column: model.data(model.index(row, column))
    assert [cell(row, 0) for row in range(3)] == list(PROMPTS)
    assert [cell(row, 2) for row in range(3)] == list(STORED[2])
    assert [cell(row, 3) for row in range(3)] == list(STORED[1])
    # The toy run started from the base, so its first checkpoint stored the base's answers as well.
    base = {sample["prompt_id"]: sample["text"] for sample in store.samples(panel.db, None)}
    assert [cell(row, 1) for row in range(3)] == [base[row["id"]] for row in store.eval_prompts(panel.db)]


def test_a_free_text_prompt_streams_into_both_panes_from_a_worker(panel, qtbot, project_path):
    first, second = panel.panes
    choose(second, 2)
    streamed = []
    panel.relay.text.connect(lambda key, text: streamed.append(text))
    qtbot.keyClicks(panel.custom_edit, "Tell me a joke.")
    qtbot.keyClick(panel.custom_edit, Qt.Key.Key_Return)
    # Enter returned at once: the job runs in a worker while the panes wait for it.
    assert panel.busy and panel.prompt_box.currentText() == "Tell me a joke."
    assert panel.key_of(second) not in panel.outputs

    qtbot.waitUntil(lambda: not panel.busy, timeout=60000)
    prompt = [{"role": "user", "content": "Tell me a joke."}]
    decoding = panel.decoding()
    db = store.connect(project_path)
    cache = compare.ModelCache()  # the panel's device: the same numbers
    expected = compare.generate_outputs(cache, db, [first.state, second.state], prompt, decoding)
    db.close()
    for pane, output in zip((first, second), expected):
        shown = panel.outputs[panel.key_of(pane)]
        assert shown.text == output.text and not shown.stored
        assert {"reward", "logprob_sum", "logprob_mean"} <= shown.figures.keys()
        assert "generated now" in pane.figures.text() and "log-prob under base" in pane.figures.text()
    assert len(streamed) >= 2
