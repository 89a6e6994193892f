"""The run setup's reward preview: the sources as edited, scored on the base model's stored greedy
answers, per source and weighted total, refreshed after an edit."""

import pytest

from studio.core import labelling, rewards, store
from studio.ui.panels.run_setup import RunSetupPanel
from studio.ui.workers import load_engines, wait_for_background_jobs

ANSWERS = ["Paris is the capital.", "Certainly! It is blue", "Two plus two is four."]


@pytest.fixture
def setup(qtbot, project):
    prompts = store.eval_prompts(project.db)
    store.add_samples(project.db, [
        {"checkpoint_id": None, "prompt_id": p["id"], "sample_index": 0, "seed": 0,
         "decoding": {"temperature": 0.0}, "text": text} for p, text in zip(prompts, ANSWERS)]
        + [{"checkpoint_id": None, "prompt_id": prompts[0]["id"], "sample_index": 1, "seed": 1,
            "decoding": {"temperature": 1.0}, "text": "a sampled answer, not the greedy one"}])
    store.set_setting(project.db, "reward_sources", [
        {"type": "terminal_punctuation", "weight": 2.0},
        {"type": "forbidden_words", "weight": 1.0, "words": ["Certainly!"]}])
    engines = load_engines(("ppo",))
    panel = RunSetupPanel()
    qtbot.addWidget(panel)
    panel.set_engines(engines["engines"], engines["train_fields"], engines["rewards"])
    panel.set_project(project)
    yield panel.pages["ppo"]
    wait_for_background_jobs()


def shown(preview) -> list[list[str]]:
    table = preview.table
    return [[table.item(row, column).text() for column in range(table.columnCount())]
            for row in range(table.rowCount())]


def test_preview_scores_the_greedy_base_answers_per_source_and_in_total(qtbot, setup):
    preview = setup.reward_preview
    qtbot.waitUntil(lambda: preview.table.rowCount() == 3, timeout=30_000)
    headers = [preview.table.horizontalHeaderItem(c).text() for c in range(preview.table.columnCount())]
    assert headers == ["Base answer", "Total", "terminal_punctuation ×2", "forbidden_words ×1"]
    assert shown(preview) == [["Paris is the capital.", "2", "1", "0"],
                              ["Certainly! It is blue", "-1", "0", "-1"],
                              ["Two plus two is four.", "2", "1", "0"]]


def test_preview_follows_an_edited_parameter_and_shows_a_bad_source(qtbot, setup):
    preview, rewards_table = setup.reward_preview, setup.rewards
    qtbot.waitUntil(lambda: preview.table.rowCount() == 3, timeout=30_000)
    rewards_table.table.setCurrentCell(1, 2)  # forbidden_words: forbid "blue" too
    rewards_table.param_editors["words"].set_value(["Certainly!", "blue"])
    qtbot.waitUntil(lambda: [[row[1], row[3]] for row in shown(preview)] == [["2", "0"], ["-2", "-2"], ["2", "0"]],
                    timeout=30_000)

    rewards_table.param_editors["words"].set_value([" "])
    qtbot.waitUntil(lambda: preview.table.rowCount() == 0, timeout=30_000)
    assert "forbidden_words" in preview.caption.text()


def test_preview_scores_with_a_trained_reward_model_source(qtbot, setup, project):
    store.add_dataset(project.db, "pairs", "preference", [
        {"prompt": f"Q{i}?", "chosen": "yes indeed", "rejected": "NO WAY"} for i in range(4)])
    for comparison_id in labelling.compare_pairs(project.db, store.pairs(project.db), blind_seed=0):
        labelling.record_label(project.db, comparison_id, "ann", "a")
    rewards.train_reward_model(project.path, rewards.RewardModelTraining(name="rm", epochs=1, device="cpu"))
    preview, rewards_table = setup.reward_preview, setup.rewards
    qtbot.waitUntil(lambda: preview.table.rowCount() == 3, timeout=30_000)
    rewards_table.set_value([{"type": "trained_reward_model", "weight": 0.5, "model": "rm"}])
    setup.preview_rewards()
    qtbot.waitUntil(lambda: preview.table.columnCount() == 3 and preview.table.rowCount() == 3, timeout=60_000)
    assert preview.table.horizontalHeaderItem(2).text() == "trained_reward_model ×0.5"
    for total, score in ((float(row[1]), float(row[2])) for row in shown(preview)):
        assert total == pytest.approx(0.5 * score, rel=1e-2, abs=1e-3)  # shown to 3 significant digits
