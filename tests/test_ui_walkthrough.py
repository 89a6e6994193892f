"""The walkthrough checklist ticks a step off when the project has its result."""

from studio.core import store, story
from studio.ui.panels.walkthrough import WalkthroughPanel


def marks(panel):
    return {key: mark.toolTip() for key, mark in panel.marks.items()}


def test_the_checklist_follows_the_project(qtbot, project):
    panel = WalkthroughPanel()
    qtbot.addWidget(panel)
    assert panel.summary.text() == "Open a project to follow the steps."
    panel.set_project(project.path)
    assert set(marks(panel).values()) == {"to do"}
    assert panel.summary.text() == f"0 of {len(story.STAGES)} steps done in this project."

    prompt_id = store.eval_prompts(project.db)[0]["id"]
    store.add_samples(project.db, [{"checkpoint_id": None, "prompt_id": prompt_id, "sample_index": 0, "seed": 0,
                                    "decoding": {"temperature": 1.0}, "text": "hello", "scores": {}}])
    panel.refresh()
    assert marks(panel)["base"] == "done"
    assert [key for key, state in marks(panel).items() if state == "done"] == ["base"]
    assert panel.summary.text() == f"1 of {len(story.STAGES)} steps done in this project."
    panel.set_project(None)
    assert not panel.timer.isActive()
