"""The advisor panel on a synthetic history written into the store: verdict, cards, and buttons."""

import json
import threading
import time

import pytest
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QMessageBox

from studio.core import advisor, rewards, store
from studio.ui.panels.advisor import AdvisorPanel
from studio.ui.workers import wait_for_background_jobs

TIMEOUT_MS = 20000


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path):
    """"Don't ask again" answers go to this test's own settings file."""
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))


def confirmation(panel) -> QMessageBox | None:
    """The open "ask once" box of the panel's last action, if any."""
    boxes = [box for box in panel.findChildren(QMessageBox) if box.isVisible()]
    return boxes[-1] if boxes else None


def click_and_start(panel, button, dont_ask_again=False) -> QMessageBox:
    """Click an action's button and answer Start in the settings box it shows."""
    button.click()
    box = confirmation(panel)
    assert box is not None, f"{button.text()} started without showing its settings"
    box.checkBox().setChecked(dont_ask_again)
    box.button(QMessageBox.StandardButton.Ok).click()
    return box


def words(prompt_id, version, length=12):
    return " ".join(f"w{prompt_id}v{version}i{i}" for i in range(length))


def write_history(db, steps=100, every=20, long_from=3):
    """A PPO run whose reward keeps rising while answers grow long and labels stop preferring them.

    Returns (run id, checkpoint ids). Base samples: greedy plus 4 samples per eval prompt, half of
    which break the project's "no_filler" rule.
    """
    store.set_setting(db, "reward_sources", [{"type": "forbidden_words", "name": "no_filler", "words": ["filler"]}])
    prompts = [p["id"] for p in store.eval_prompts(db)]
    base = [{"checkpoint_id": None, "prompt_id": p, "sample_index": i, "seed": i,
             "decoding": {"temperature": 0.7, "seed": i},
             "text": words(p, f"b{i % 2}") + ("" if i % 2 else " filler"),
             "scores": {"reward": float(i % 2), "rule_scores": {"concise": float(i % 2)},
                        "broken_rules": [] if i % 2 else ["concise"]}}
            for p in prompts for i in range(4)]
    base += [{"checkpoint_id": None, "prompt_id": p, "sample_index": 0, "seed": 0,
              "decoding": {"temperature": 0.0}, "text": words(p, "base")} for p in prompts]
    store.add_samples(db, base)
    run_id = store.create_run(db, "ppo", {"max_steps": steps}, status="completed")
    store.write_metrics(db, run_id, [
        {"step": s, "time": time.time(), "objective/scores": 0.02 * s + 0.05 * ((s * 7) % 3 - 1),
         "objective/kl": 0.01 * s * (1 + s / 200)} for s in range(1, steps + 1)])
    checkpoint_ids = []
    for index, step in enumerate(range(every, steps + 1, every)):
        folder = rewards.project_folder(db) / "runs" / str(run_id) / f"checkpoint-{step}"
        folder.mkdir(parents=True)  # a checkpoint whose folder is gone is never advised
        checkpoint_id = store.add_checkpoint(db, run_id, step, str(folder))
        length = 12 if index < long_from else 12 + 8 * (index - long_from + 1)
        store.add_samples(db, [{"checkpoint_id": checkpoint_id, "prompt_id": p, "sample_index": 0, "seed": 0,
                                "decoding": {"temperature": 0.0}, "text": words(p, index, length)}
                               for p in prompts])
        later = index >= long_from
        label_comparisons(db, checkpoint_id, wins=1 if later else 3, games=12 if later else 5)
        checkpoint_ids.append(checkpoint_id)
    return run_id, checkpoint_ids


def label_comparisons(db, checkpoint_id, wins, games):
    """`games` labelled comparisons of the checkpoint (side A) against the base; A wins `wins` of them."""
    for game in range(games):
        sources = [json.dumps({"kind": "model", "state": state}) for state in (checkpoint_id, "base")]
        comparison_id = db["comparisons"].insert({
            "prompt": '"q"', "response_a": "x", "response_b": "y", "source_a": sources[0],
            "source_b": sources[1], "created_at": time.time()}).last_pk
        db["labels"].insert({"comparison_id": comparison_id, "annotator": "ana",
                             "choice": "a" if game < wins else "b", "created_at": time.time()})


@pytest.fixture
def panel(qtbot, project):
    widget = AdvisorPanel()
    qtbot.addWidget(widget)
    widget.resize(1300, 900)
    yield widget
    assert wait_for_background_jobs()  # a refresh still reading must end before the project closes


def open_project(qtbot, panel, project):
    with qtbot.waitSignal(panel.advice_ready, timeout=TIMEOUT_MS) as blocker:
        panel.set_project(project.path)
    return blocker.args[0]


def test_panel_shows_the_verdict_and_every_signal_of_a_synthetic_history(qtbot, panel, project):
    run_id, checkpoint_ids = write_history(project.db)
    advice = open_project(qtbot, panel, project)
    assert advice.run_id == run_id and panel.selected_run() == run_id  # the newest PPO run is judged
    assert advice.verdict == "switch_now"
    assert panel.verdict.text() == "Switch to DPO now"
    assert "Reward-hacking alarm" in panel.explanation.text()
    assert advice.checkpoint_id == checkpoint_ids[2]  # the last one before answers grew long
    assert panel.refers_to.text() == f"Advice refers to PPO #{run_id}, checkpoint 3 (step 60)"  # the run's 3rd
    assert "medium" in panel.tolerance.text()
    assert panel.cards["length_drift"].value.text() == "+133%"  # 28 words vs 12
    assert panel.cards["reward_hacking"].value.text() == "8%"  # 1 win in 12 labels
    assert panel.cards["reward_hacking"].interval.text().startswith("· 95%: 2% to ")
    assert panel.dpo_button.text() == "Start DPO from checkpoint 3 (step 60)"  # the run is named in the verdict
    assert all(not card.isHidden() for card in panel.cards.values())


def test_risk_tolerance_and_the_base_only_view(qtbot, panel, project):
    write_history(project.db)
    store.set_setting(project.db, "risk_tolerance", "high")
    open_project(qtbot, panel, project)
    with qtbot.waitSignal(panel.advice_ready, timeout=TIMEOUT_MS) as blocker:
        panel.run_selector.setCurrentIndex(panel.run_selector.findData(-1))
    advice = blocker.args[0]
    assert advice.run_id is None and advice.verdict == "ppo_first"  # half the samples break a rule
    assert "8 of 16 base samples (50%" in panel.explanation.text()
    # Wilson at z = 1.645: centre 0.5, half-width 1.645 * sqrt(1/64 + 1.645^2 / 1024) / 1.169 = 0.19
    assert panel.cards["rule_violations"].interval.text() == "· 95%: 31% to 69%"
    assert "high" in panel.tolerance.text()
    assert panel.cards["length_drift"].isHidden() and not panel.cards["reward_spread"].isHidden()
    assert panel.label_button.text() == "Label pairs from the base"


def test_start_dpo_button_creates_a_run_from_the_advised_checkpoint(qtbot, panel, project):
    _, checkpoint_ids = write_history(project.db)
    store.add_dataset(project.db, "pairs", "preference", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    open_project(qtbot, panel, project)
    with qtbot.waitSignal(panel.run_created, timeout=TIMEOUT_MS) as blocker:
        click_and_start(panel, panel.dpo_button)
    run = store.get_run(project.db, blocker.args[0])
    assert run["method"] == "dpo" and run["parent_checkpoint_id"] == checkpoint_ids[2]
    assert run["config"]["include_labels"] is True


def test_label_and_trial_buttons_emit_what_the_actions_return(qtbot, panel, project, monkeypatch):
    run_id, checkpoint_ids = write_history(project.db)
    calls = []
    monkeypatch.setattr(advisor, "label_pairs_from_checkpoint",
                        lambda db, checkpoint_id: calls.append(("label", checkpoint_id)) or [11, 12])
    monkeypatch.setattr(advisor, "create_quick_trial", lambda db, checkpoint_id, judged_run_id:
                        calls.append(("trial", checkpoint_id, judged_run_id)) or (21, 22))
    open_project(qtbot, panel, project)
    assert panel.trial_button.text() == "Run a quick PPO vs DPO trial"
    with qtbot.waitSignal(panel.label_requested, timeout=TIMEOUT_MS) as blocker:
        click_and_start(panel, panel.label_button)
    assert blocker.args == [[11, 12]]
    with qtbot.waitSignal(panel.trial_created, timeout=TIMEOUT_MS) as blocker:
        click_and_start(panel, panel.trial_button)
    assert blocker.args == [21, 22]
    assert calls == [("label", checkpoint_ids[2]), ("trial", checkpoint_ids[2], run_id)]
    assert panel.trial_button.isEnabled()  # enabled again once the action is done


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_the_trial_of_a_grpo_or_rloo_run_shapes_with_its_method_and_says_so(qtbot, panel, project, monkeypatch, method):
    run_id, _ = write_history(project.db)
    project.db.execute("UPDATE runs SET method = ? WHERE id = ?", [method, run_id])
    project.db.conn.commit()
    calls = []
    monkeypatch.setattr(advisor, "create_quick_trial", lambda db, checkpoint_id, judged_run_id:
                        calls.append(judged_run_id) or (21, 22))
    advice = open_project(qtbot, panel, project)
    assert advice.run_id == run_id and panel.selected_run() == run_id  # a GRPO or RLOO run is judged too
    name = method.upper()
    assert panel.trial_button.text() == f"Run a quick {name} vs DPO trial"
    panel.trial_button.click()
    box = confirmation(panel)
    assert box.windowTitle() == f"Run a quick {name} vs DPO trial?"
    assert f"The shaping run uses {name}, the method of the judged run" in box.text()
    assert f"runs: <b>{name} and DPO</b>" in box.informativeText()
    with qtbot.waitSignal(panel.trial_created, timeout=TIMEOUT_MS):
        box.button(QMessageBox.StandardButton.Ok).click()
    assert calls == [run_id]


def test_sample_the_base_button_samples_then_judges_the_base(qtbot, panel, project, monkeypatch):
    monkeypatch.setitem(advisor.SAMPLING, "max_new_tokens", 8)  # short answers: a quick test
    advice = open_project(qtbot, panel, project)
    assert advice.verdict == "need_evidence" and panel.selected_run() is None
    with qtbot.waitSignal(panel.advice_ready, timeout=60000) as blocker:
        click_and_start(panel, panel.sample_button)
        assert not panel.sample_button.isEnabled()  # one action at a time
    assert blocker.args[0].verdict in ("ppo_first", "settle_dpo")
    assert len(store.samples(project.db, None)) == 4 * (1 + advisor.BASE_SAMPLES)  # greedy + sampled
    assert not panel.cards["rule_violations"].isHidden() and panel.cards["length_drift"].isHidden()


def test_start_dpo_is_disabled_with_the_reason_while_the_verdict_is_ppo_first(qtbot, panel, project):
    write_history(project.db)
    open_project(qtbot, panel, project)
    assert panel.dpo_button.isEnabled()  # "switch now" on the PPO run
    with qtbot.waitSignal(panel.advice_ready, timeout=TIMEOUT_MS) as blocker:
        panel.run_selector.setCurrentIndex(panel.run_selector.findData(-1))
    assert blocker.args[0].verdict == "ppo_first"
    assert not panel.dpo_button.isEnabled()
    assert panel.dpo_button.toolTip().startswith("Disabled: the advisor says \u201cPPO first: the base is messy\u201d")
    assert panel.sample_button.isEnabled() and panel.label_button.isEnabled() and panel.trial_button.isEnabled()


def test_start_dpo_shows_its_settings_and_asks_once(qtbot, panel, project):
    run_id, checkpoint_ids = write_history(project.db)
    open_project(qtbot, panel, project)
    panel.dpo_button.click()
    box = confirmation(panel)
    shown = box.informativeText()
    assert f"start and reference: <b>PPO #{run_id}, checkpoint 3 (step 60)</b>" in shown
    assert "learning_rate: <b>0.0002</b>" in shown  # the small model's DPO default (defaults.py)
    box.button(QMessageBox.StandardButton.Cancel).click()
    assert not [r for r in store.list_runs(project.db) if r["method"] == "dpo"]  # cancelled: no run
    with qtbot.waitSignal(panel.run_created, timeout=TIMEOUT_MS):
        click_and_start(panel, panel.dpo_button, dont_ask_again=True)
    qtbot.waitUntil(lambda: panel.dpo_button.isEnabled(), timeout=TIMEOUT_MS)
    with qtbot.waitSignal(panel.run_created, timeout=TIMEOUT_MS):
        panel.dpo_button.click()  # asked once: now it starts at once
        assert confirmation(panel) is None
    assert len([r for r in store.list_runs(project.db) if r["method"] == "dpo"]) == 2


def test_sampling_the_base_shows_progress_and_stops(qtbot, panel, project, monkeypatch):
    release = threading.Event()
    calls = []

    def sample_base(project_path, run_id, on_progress, should_stop):
        on_progress(advisor.SAMPLING_PHASE, 0, 20)
        time.sleep(0.05)  # a measurable rate
        on_progress(advisor.SAMPLING_PHASE, 4, 20)
        release.wait(TIMEOUT_MS / 1000)
        calls.append(should_stop())
        return 0 if should_stop() else 20

    monkeypatch.setattr(advisor, "sample_base", sample_base)
    open_project(qtbot, panel, project)
    box = click_and_start(panel, panel.sample_button)
    assert "samples per prompt: <b>4 sampled + 1 greedy</b>" in box.informativeText()
    assert "temperature: <b>0.7</b>" in box.informativeText()
    qtbot.waitUntil(lambda: panel.status.text().startswith("Sampling the base 4/20 · "), timeout=TIMEOUT_MS)
    assert "/s · ETA 0:0" in panel.status.text()  # 16 left at about 80 a second
    assert not panel.stop_button.isHidden() and not panel.sample_button.isEnabled()
    panel.stop_button.click()
    assert panel.status.text() == "Stopping after the batch in progress…"
    release.set()
    qtbot.waitUntil(lambda: not panel.busy, timeout=TIMEOUT_MS)
    assert calls == [True]
    assert panel.status.text() == "Sampling stopped: nothing stored, the earlier base samples stay."
    assert panel.stop_button.isHidden() and panel.sample_button.isEnabled()


def test_cards_reflow_to_the_width_without_sideways_scrolling(qtbot, panel):
    panel.show()
    rows = {}
    for width in (1400, 950):  # 950: about the centre area of a 1600 px window with its docks
        panel.resize(width, 800)
        qtbot.waitUntil(lambda: abs(panel.width() - width) < 2)
        qtbot.wait(50)
        assert panel.scroll.horizontalScrollBar().maximum() == 0, width
        grid, keys = panel._grids[-1]  # the side-effects section: five cards
        rows[width] = 1 + max(grid.getItemPosition(grid.indexOf(panel.cards[key]))[0] for key in keys)
    assert rows == {1400: 1, 950: 2}


def test_an_action_whose_settings_cannot_be_read_says_why_instead_of_asking(qtbot, panel, project):
    write_history(project.db)
    open_project(qtbot, panel, project)
    store.set_setting(project.db, "base_model", {"kind": "folder", "path": str(project.path / "gone")})
    panel.dpo_button.click()
    assert confirmation(panel) is None
    assert panel.error.text().startswith("The advisor's action cannot start: ")
    assert "gone" in panel.error.text()  # names the model folder that is missing
    assert panel.dpo_button.isEnabled()  # nothing started
