"""The project store: schema migrations, the write lock, settings, atomic writes."""

import sqlite3
import subprocess
import sys

import pytest

from studio.core import store


def test_create_and_reopen_keeps_settings(tmp_path):
    with store.Project.create(tmp_path / "p", name="demo", base_model={"kind": "demo"}) as project:
        store.set_setting(project.db, "risk_tolerance", "low")
    with store.Project.open(tmp_path / "p") as project:
        assert store.get_setting(project.db, "name") == "demo"
        assert store.get_setting(project.db, "base_model") == {"kind": "demo"}
        assert store.get_setting(project.db, "risk_tolerance") == "low"
        assert project.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert project.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_invalid_risk_tolerance_is_refused(tmp_path):
    with store.Project.create(tmp_path / "p") as project:
        with pytest.raises(ValueError, match="risk_tolerance"):
            store.set_setting(project.db, "risk_tolerance", "reckless")


def test_database_made_by_an_older_schema_is_migrated_without_loss(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    db = store.connect(folder)
    store.migrations.apply(db, stop_before="m002_labelling")  # the schema before labelling existed
    assert not db["labels"].exists()
    dataset_id = db["datasets"].insert({"name": "old", "kind": "preference", "row_count": 1}).last_pk
    db["pairs"].insert({"dataset_id": dataset_id, "prompt": '"q"', "chosen": '"a"', "rejected": '"b"'})
    db.close()

    with store.Project.open(folder) as project:
        assert project.db["labels"].exists() and project.db["comparisons"].exists()
        assert [m.name for m in store.migrations.applied(project.db)] == [
            "m001_core_tables", "m002_labelling", "m003_portable_checkpoints", "m004_reference_answers_and_feedback",
            "m005_pair_tools"]
        assert store.pairs(project.db)[0]["chosen"] == "a"
    backups = list((folder / store.BACKUP_DIR).glob("*-before-upgrade.db"))
    assert len(backups) == 1  # taken before the migrations ran: the old schema, with its pair
    old = sqlite3.connect(backups[0])
    assert old.execute("SELECT chosen FROM pairs").fetchall() == [('"a"',)]
    assert not old.execute("SELECT name FROM sqlite_master WHERE name = 'labels'").fetchall()
    old.close()


def test_second_process_cannot_open_for_writing(tmp_path):
    with store.Project.create(tmp_path / "p"):
        code = ("import sys; from studio.core import store\n"
                "try:\n    store.Project.open(sys.argv[1])\nexcept store.ProjectLockedError as e:\n"
                "    print(e); sys.exit(3)\n")
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], capture_output=True, text=True)
        assert result.returncode == 3
        assert "already open for writing in another studio process" in result.stdout
        # Reading is still allowed (e.g. `studio runs` while the window trains).
        read_only = subprocess.run(
            [sys.executable, "-c", "import sys; from studio.core import store; "
             "print(store.get_setting(store.Project.open(sys.argv[1], read_only=True).db, 'name'))",
             str(tmp_path / "p")], capture_output=True, text=True)
        assert read_only.stdout.strip() == "p"


def test_lock_is_released_on_close(tmp_path):
    store.Project.create(tmp_path / "p").close()
    store.Project.open(tmp_path / "p").close()


def test_opening_marks_runs_of_a_dead_process_interrupted(tmp_path):
    with store.Project.create(tmp_path / "p") as project:
        run_id = store.create_run(project.db, "dpo", {}, status="running")
    with store.Project.open(tmp_path / "p") as project:
        assert store.get_run(project.db, run_id)["status"] == "interrupted"


def test_add_dataset_is_all_or_nothing(tmp_path):
    with store.Project.create(tmp_path / "p") as project:
        store.add_dataset(project.db, "good", "preference", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
        with pytest.raises(KeyError):
            store.add_dataset(project.db, "bad", "preference",
                              [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2"}])
        assert [d["name"] for d in store.datasets(project.db)] == ["good"]
        assert len(store.pairs(project.db)) == 1


def test_missing_folder_and_non_project_folder_are_clear_errors(tmp_path):
    with pytest.raises(store.ProjectError, match="No project folder"):
        store.Project.open(tmp_path / "nowhere")
    with pytest.raises(store.ProjectError, match="not a studio project"):
        store.Project.open(tmp_path)


def test_metrics_round_trip_in_step_order(tmp_path):
    with store.Project.create(tmp_path / "p") as project:
        run_id = store.create_run(project.db, "dpo", {"beta": 0.1})
        store.write_metrics(project.db, run_id, [{"step": s, "time": 0.0, "loss": 1.0 / s} for s in (2, 1, 3)])
        steps, values = store.run_metrics(project.db, run_id)["loss"]
        assert steps == [1, 2, 3] and values == [1.0, 0.5, 1.0 / 3]
        store.delete_metrics_after(project.db, run_id, 1)
        assert store.run_metrics(project.db, run_id)["loss"] == ([1], [1.0])


def test_a_run_keeps_its_first_start_time_through_pause_stop_and_resume(tmp_path):
    with store.Project.create(tmp_path / "p") as project:
        run_id = store.create_run(project.db, "dpo", {"beta": 0.1})
        store.set_run_status(project.db, run_id, "running")
        started = store.get_run(project.db, run_id)["started_at"]
        assert started is not None
        for status in ("paused", "running", "stopped", "running"):
            store.set_run_status(project.db, run_id, status)
        assert store.get_run(project.db, run_id)["started_at"] == started


def test_labelled_pairs_follow_undo_and_edits(tmp_path):
    with store.Project.create(tmp_path / "p") as project:
        db = project.db
        comparison = db["comparisons"].insert({"prompt": '"q"', "response_a": "A", "response_b": "B"}).last_pk
        first = db["labels"].insert({"comparison_id": comparison, "annotator": "ann", "choice": "a"}).last_pk
        assert [(p["chosen"], p["rejected"]) for p in store.labelled_pairs(db)] == [("A", "B")]
        db["labels"].insert({"comparison_id": comparison, "annotator": "ann", "choice": "undo", "undoes_label_id": first})
        assert store.labelled_pairs(db) == []
        db["labels"].insert({"comparison_id": comparison, "annotator": "ann", "choice": "b", "edited_text": "B+"})
        assert [(p["chosen"], p["rejected"]) for p in store.labelled_pairs(db)] == [("B+", "A")]
        assert db["labels"].count == 3  # history kept


def test_metric_summaries_for_the_runs_table_and_the_wall_time_axis(tmp_path):
    with store.Project.create(tmp_path / "p", base_model={"kind": "demo"}) as project:
        db = project.db
        first, second = (store.create_run(db, "dpo", {}) for _ in range(2))
        store.write_metrics(db, first, [{"step": 1, "time": 10.0, "loss": 0.7, "accuracy": 0.5},
                                        {"step": 2, "time": 12.5, "loss": 0.6}])
        assert store.latest_metrics(db) == {first: (2, {"loss": 0.6})}  # a run without metrics is absent
        assert store.metric_names(db, first) == ["accuracy", "loss"] and store.metric_names(db, second) == []
        assert store.step_times(db, first) == {1: 10.0, 2: 12.5}


def test_eval_flags_follow_set_eval(tmp_path):
    with store.Project.create(tmp_path / "p", base_model={"kind": "demo"}) as project:
        db = project.db
        dataset = store.add_dataset(db, "prompts", "prompts", [{"prompt": "a"}, {"prompt": "b"}])
        assert store.eval_flags(db) == {dataset: False} and store.count_rows(db, "prompts", "is_eval = 0") == 2
        store.set_eval(db, dataset, True)
        assert store.eval_flags(db) == {dataset: True} and store.count_rows(db, "prompts", "is_eval = 0") == 0
        assert store.count_rows(db, "pairs") == 0
