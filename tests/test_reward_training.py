"""Training a reward model from the project's labels: progress, stopping, the CLI and its messages."""

import json
import threading

import pytest

from studio import cli
from studio.core import labelling, rewards, store


def label_pairs(project, count: int) -> None:
    """`count` labelled comparisons whose chosen side is lower case and rejected side upper case."""
    pairs = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
              "chosen": [{"role": "assistant", "content": f"yes indeed {i}"}],
              "rejected": [{"role": "assistant", "content": f"NO WAY {i}"}]} for i in range(count)]
    store.add_dataset(project.db, "labels", "preference", pairs)
    for comparison_id in labelling.compare_pairs(project.db, store.pairs(project.db), blind_seed=0):
        comparison = labelling.get_comparison(project.db, comparison_id)
        labelling.record_label(project.db, comparison_id, "ann",
                               "a" if comparison["source_a"]["side"] == "chosen" else "b")


def test_training_reports_each_step_of_the_phase(project):
    label_pairs(project, 10)  # 8 to train on, 2 held out: 2 batches of 4 per epoch
    reports = []
    settings = rewards.RewardModelTraining(name="rm", epochs=2, batch_size=4, device="cpu")
    report = rewards.train_reward_model(project.path, settings, on_progress=lambda *r: reports.append(r))
    assert reports == [(rewards.TRAINING_PHASE, done, 4) for done in range(5)]
    assert report["steps"] == 4


def test_a_stopped_training_saves_nothing(project):
    label_pairs(project, 10)
    stop = threading.Event()
    settings = rewards.RewardModelTraining(name="rm", epochs=2, batch_size=4, device="cpu")

    def stop_after_first_step(phase, done, total):
        if done == 1:
            stop.set()

    assert rewards.train_reward_model(project.path, settings, on_progress=stop_after_first_step, stop=stop) is None
    assert rewards.trained_reward_models(project.path) == []
    assert not (project.path / rewards.REWARD_MODELS_FOLDER / "rm").exists()


def test_cli_trains_a_reward_model_that_loads_as_a_source_and_scores(project, capsys):
    label_pairs(project, 6)
    assert cli.main(["train-reward", str(project.path), "--name", "mine", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "step    1  epoch 1  loss=" in out
    assert "Reward model 'mine' saved" in out and "5 training pairs" in out

    source = {"type": "trained_reward_model", "model": "mine"}
    assert rewards.check_sources([source], project.path) == []
    total, breakdown = rewards.RewardFunction([source], project_path=project.path)(
        ["Question?", "Question?"], ["yes indeed", "NO WAY"])
    assert total.shape == (2,) and breakdown["trained_reward_model"].isfinite().all()


def test_cli_without_labels_says_how_many_are_needed(project, capsys):
    assert cli.main(["train-reward", str(project.path), "--name", "mine"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 2 preference pairs; this project has 0. Label 2 more comparisons" in err
    assert "--include-datasets" in err


def test_cli_can_train_on_the_imported_preference_datasets_too(project, capsys):
    store.add_dataset(project.db, "pairs", "preference", [
        {"prompt": f"Q{i}?", "chosen": "yes indeed", "rejected": "NO WAY"} for i in range(5)])
    assert cli.main(["train-reward", str(project.path), "--name", "mine", "--epochs", "1"]) == 2
    assert cli.main(["train-reward", str(project.path), "--name", "mine", "--epochs", "1", "--include-datasets"]) == 0
    assert "4 training pairs" in capsys.readouterr().out


def test_cli_refuses_a_folder_that_is_no_project(tmp_path, capsys):
    assert cli.main(["train-reward", str(tmp_path), "--name", "mine"]) == 2
    assert "is not a studio project" in capsys.readouterr().err
    assert not (tmp_path / store.DB_NAME).exists()


# --- the window's Run menu action -----------------------------------------------------------------

@pytest.fixture
def open_window(qtbot, tmp_path):
    from PySide6.QtCore import QSettings

    from studio.ui.app import MainWindow
    from studio.ui.workers import wait_for_background_jobs

    windows = []

    def open_project(project):
        project.close()  # the window takes the project's lock
        window = MainWindow(QSettings(str(tmp_path / "studio.ini"), QSettings.Format.IniFormat))
        window.show()
        assert window.open_project(project.path)
        windows.append(window)
        return window

    yield open_project
    wait_for_background_jobs()
    for window in windows:
        window.close()
        window.deleteLater()


def shown_boxes(window):
    from PySide6.QtWidgets import QMessageBox

    return [box for box in window.findChildren(QMessageBox) if box.isVisible()]


def test_window_trains_from_the_run_menu_with_progress_in_the_status_bar(qtbot, project, open_window):
    label_pairs(project, 6)
    window = open_window(project)
    actions = window.reward_training
    assert actions.train_action in window.menuBar().actions()[1].menu().actions()  # the Run menu
    messages = []
    window.statusBar().messageChanged.connect(messages.append)

    with qtbot.waitSignal(actions.finished, timeout=120_000):
        actions.train("from-window", epochs=1)
        assert not actions.train_action.isEnabled() and actions.stop_action.isEnabled()

    assert any(m.startswith(f"{rewards.TRAINING_PHASE} 1/1") for m in messages), messages
    assert rewards.trained_reward_models(window.project.path) == ["from-window"]
    assert [box.windowTitle() for box in shown_boxes(window)] == ["Reward model trained"]
    assert actions.train_action.isEnabled() and not actions.stop_action.isEnabled()


def test_window_without_labels_shows_how_many_are_needed(qtbot, project, open_window):
    window = open_window(project)
    with qtbot.waitSignal(window.reward_training.finished, timeout=60_000):
        window.reward_training.train("none")
    (box,) = shown_boxes(window)
    assert box.windowTitle() == "Reward model training failed"
    assert "this project has 0. Label 2 more comparisons" in box.text()


def test_reward_source_help_names_no_python_function():
    functions = {name for name, value in vars(rewards).items() if callable(value) and "_" in name}
    texts = [spec["help"] for spec in rewards.describe_sources().values()]
    texts += [p["help"] for spec in rewards.describe_sources().values() for p in spec["params"].values()]
    assert [(text, name) for text in texts for name in functions if name in text] == []
    assert "Train a Reward Model from My Labels" in rewards.describe_sources()["trained_reward_model"]["help"]


def test_window_stop_action_ends_the_training_and_saves_nothing(qtbot, project, open_window):
    label_pairs(project, 6)
    window = open_window(project)
    actions = window.reward_training
    with qtbot.waitSignal(actions.finished, timeout=120_000):
        actions.train("stopped")
        actions.stop_action.trigger()  # set before the first step: the model is still loading
    assert window.statusBar().currentMessage() == "Reward model training stopped: nothing saved"
    assert rewards.trained_reward_models(window.project.path) == []
    assert shown_boxes(window) == []


def test_training_on_pairs_with_tool_calls_is_refused_with_what_to_do(project, tmp_path):
    from studio.core import datasets
    from tests.test_trl_formats import TOOL_ROW

    path = tmp_path / "tools.jsonl"
    path.write_text((json.dumps(TOOL_ROW) + "\n") * 3)
    dataset_id = datasets.import_file(project.db, path)
    first = store.pairs(project.db, [dataset_id])[0]["id"]
    settings = rewards.RewardModelTraining(name="mine", include_labels=False, include_datasets=True)
    with pytest.raises(rewards.RewardError) as caught:
        rewards.train_reward_model(project.path, settings)
    assert str(caught.value).startswith(f"3 of the 3 pairs have tool calls (first: dataset {dataset_id}, pair {first})")
    assert "DPO trains on these pairs as they are" in str(caught.value)
    assert not (project.path / rewards.REWARD_MODELS_FOLDER / "mine").exists()
