"""Trackers out: a run's records reach TensorBoard and Trackio under the store's names and steps;
a tracker that fails is reported once and the run goes on."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from studio.core import runs, store, trackers


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value)] as TensorBoard's own reader sees the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_accepts_a_comma_list_or_a_list_and_refuses_unknown_names():
    assert trackers.parse_report_to("tensorboard, Trackio") == ["tensorboard", "trackio"]
    assert trackers.parse_report_to(["wandb", "wandb"]) == ["wandb"]
    assert trackers.parse_report_to("none") == []
    with pytest.raises(trackers.TrackerError, match="mlflow"):
        trackers.parse_report_to("tensorboard,mlflow")


def test_a_run_naming_an_unknown_tracker_is_refused_before_it_starts(make_toy_run):
    with pytest.raises(runs.ConfigError, match="Unknown tracker.*comet"):
        make_toy_run(report_to="comet")


def test_tensorboard_reads_back_every_metric_at_its_step(project, make_toy_run):
    run_id = make_toy_run(report_to=["tensorboard"])
    assert runs.execute(project.path, run_id) == "completed"

    seen = tensorboard_scalars(project.run_dir(run_id) / "tensorboard")
    stored = store.run_metrics(project.db, run_id)
    assert set(seen) == set(stored) and "loss" in seen
    for name, (steps, values) in stored.items():
        assert [step for step, _ in seen[name]] == steps
        assert [value for _, value in seen[name]] == pytest.approx(values, rel=1e-6)  # float32 events


def test_tensorboard_gets_the_config_and_each_checkpoints_samples(project, make_toy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_id = make_toy_run(report_to="tensorboard")
    runs.execute(project.path, run_id)
    events = EventAccumulator(str(project.run_dir(run_id) / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    samples = texts["eval_samples/text_summary"]
    assert [event.step for event in samples] == [3, 6]  # the two checkpoints
    table = samples[-1].tensor_proto.string_val[0].decode()
    assert "| user: Name a colour. |" in table and table.count("\n") == 1 + 4  # header, rule, 4 rows
    config = texts["config/text_summary"][0].tensor_proto.string_val[0].decode()
    assert '"max_steps": 6' in config


def test_the_project_setting_applies_when_the_run_names_no_tracker(project, make_toy_run):
    store.set_setting(project.db, "report_to", ["tensorboard"])
    chosen = make_toy_run()
    refused = make_toy_run(report_to="none")
    runs.execute(project.path, chosen)
    runs.execute(project.path, refused)
    assert (project.run_dir(chosen) / "tensorboard").is_dir()
    assert not (project.run_dir(refused) / "tensorboard").exists()


def test_a_resumed_run_keeps_one_value_per_step_in_tensorboard(project, make_toy_run):
    run_id = make_toy_run(report_to="tensorboard")
    control = runs.RunControl()
    stop_after_four = lambda record: control.stop() if record["step"] == 4 else None
    runs.execute(project.path, run_id, control, on_metrics=stop_after_four)
    store.delete_metrics_after(project.db, run_id, 3)  # as if killed after step 4's record: redo step 4
    last = store.checkpoints(project.db, run_id)[-1]["id"]
    project.db["samples"].delete_where("checkpoint_id = ?", [last])
    project.db["checkpoints"].delete_where("id = ?", [last])
    runs.execute(project.path, run_id)
    steps = [step for step, _ in tensorboard_scalars(project.run_dir(run_id) / "tensorboard")["loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


class Failing:
    """A tracker whose every write fails as a full disk would."""

    writes = 0

    def __init__(self, run):
        pass

    def log(self, step, metrics, walltime):
        Failing.writes += 1
        raise OSError(28, "No space left on device")

    def log_samples(self, step, rows):
        raise AssertionError("a dropped tracker was called again")

    def close(self):
        pass


def test_a_failing_tracker_is_reported_once_and_the_run_goes_on(project, make_toy_run, monkeypatch):
    monkeypatch.setitem(trackers.OPENERS, "wandb", Failing)
    run_id = make_toy_run(report_to="tensorboard,wandb")
    lines = []
    assert runs.execute(project.path, run_id, on_log=lines.append) == "completed"
    failures = [line for line in lines if "W&B failed" in line]
    assert failures == ["W&B failed (OSError: [Errno 28] No space left on device); the run goes on without it"]
    assert Failing.writes == 1
    assert len(tensorboard_scalars(project.run_dir(run_id) / "tensorboard")["loss"]) == 6  # the other goes on


def test_a_tracker_that_is_not_installed_is_reported_once_with_the_install_command(
        project, make_toy_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    run_id = make_toy_run(report_to="wandb")
    lines = []
    assert runs.execute(project.path, run_id, on_log=lines.append) == "completed"
    missing = [line for line in lines if "W&B" in line]
    assert len(missing) == 1 and 'pip install "alignment-studio[wandb]"' in missing[0]


TRACKIO_RUN = textwrap.dedent("""
    import json, sys
    from studio.core import runs, store
    from trackio.sqlite_storage import SQLiteStorage

    project_path, run_id = sys.argv[1], int(sys.argv[2])
    runs.ENGINE_MODULES["toy"] = "tests.toy_engine"
    runs.execute(project_path, run_id)
    db = store.connect(project_path)
    name = [r for r in SQLiteStorage.get_runs("trackio-test") if r.startswith(store.get_run(db, run_id)["name"])]
    logs = SQLiteStorage.get_logs("trackio-test", name[0])
    config = SQLiteStorage.get_run_config("trackio-test", name[0])
    print(json.dumps({"runs": name, "config": config,
                      "losses": [[log["step"], log["loss"]] for log in logs if "loss" in log],
                      "tables": [log["step"] for log in logs if "eval_samples" in log]}, default=str))
""")


def test_trackio_local_store_reads_back_the_metrics_and_config(project, make_toy_run, tmp_path):
    pytest.importorskip("trackio")
    store.set_setting(project.db, "name", "trackio-test")
    run_id = make_toy_run(report_to="trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(project.path), str(run_id)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    steps, losses = store.run_metrics(project.db, run_id)["loss"]
    assert len(seen["runs"]) == 1
    assert [step for step, _ in seen["losses"]] == steps
    assert [loss for _, loss in seen["losses"]] == pytest.approx(losses)
    assert seen["tables"] == [3, 6]
    assert seen["config"]["max_steps"] == 6 and seen["config"]["method"] == "toy"


def test_wandb_offline_takes_metrics_and_samples_without_a_failure(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import time

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    run = trackers.RunInfo(project="wandb-test", run_id=1, run_name="DPO #1", run_dir=tmp_path,
                           config={"beta": 0.1, "dataset_ids": [1, 2]})
    lines = []
    reporter = trackers.Reporter(["wandb"], run, lines.append)
    for step in (1, 2, 3):
        reporter.log({"step": step, "time": time.time(), "loss": 1.0 / step})
    reporter.log_samples(3, [{"prompt": "user: Hi", "completion": "Hello!"}])
    reporter.close()
    assert lines == ["Reporting metrics to W&B"]  # any failure would have been reported here
    assert list(tmp_path.glob(f"wandb/offline-run-*-{run.unique_id}/run-{run.unique_id}.wandb"))


def test_cli_init_stores_the_projects_trackers_and_refuses_a_typo(tmp_path, tiny_model_dir, capsys):
    from studio.cli import main

    assert main(["init", str(tmp_path / "p"), "--model", str(tiny_model_dir), "--report-to", "tensorboard"]) == 0
    with store.Project.open(tmp_path / "p", read_only=True) as project:
        assert store.get_setting(project.db, "report_to") == ["tensorboard"]
    assert main(["init", str(tmp_path / "q"), "--model", str(tiny_model_dir), "--report-to", "tensorbord"]) == 2
    assert "Unknown tracker(s) in report_to: tensorbord" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_cli_train_reports_to_tensorboard(tmp_path, tiny_model_dir, capsys):
    from studio.cli import main

    folder = tmp_path / "p"
    assert main(["init", str(folder), "--model", str(tiny_model_dir)]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n")
    assert main(["import", str(folder), str(pairs)]) == 0
    assert main(["train", str(folder), "--method", "dpo", "--set", "max_steps=2", "--set", "batch_size=1",
                 "--set", "eval_max_new_tokens=1", "--report-to", "tensorboard"]) == 0
    assert "[run 1] Reporting metrics to TensorBoard" in capsys.readouterr().out
    assert [step for step, _ in tensorboard_scalars(folder / "runs" / "1" / "tensorboard")["loss"]] == [1, 2]
    assert main(["train", str(folder), "--resume", "1", "--report-to", "wandb"]) == 2
    assert "a resumed run reports where it did" in capsys.readouterr().err
