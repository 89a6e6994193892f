"""The `studio` command: same core as the window, clear messages and exit codes on errors."""

import json

import pytest

from studio.cli import main


@pytest.fixture
def project_dir(tmp_path, tiny_model_dir):
    folder = tmp_path / "proj"
    assert main(["init", str(folder), "--model", str(tiny_model_dir)]) == 0
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_init_import_and_list(project_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3)
    assert main(["import", str(project_dir), str(pairs)]) == 0
    assert "Imported 3 preference rows" in capsys.readouterr().out
    assert main(["runs", str(project_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_bad_file_names_row_and_field_and_imports_nothing(project_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                               {"prompt": "q", "chosen": "", "rejected": "b"}])
    assert main(["import", str(project_dir), str(bad)]) == 2
    assert "bad.jsonl, row 2, field 'chosen'" in capsys.readouterr().err
    from studio.core import store

    with store.Project.open(project_dir, read_only=True) as project:
        assert store.datasets(project.db) == []


def test_init_refuses_a_model_that_cannot_load(tmp_path, capsys):
    assert main(["init", str(tmp_path / "p"), "--model", str(tmp_path / "missing")]) == 2
    assert "Model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_opening_a_non_project_is_a_clear_error(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    assert "not a studio project" in capsys.readouterr().err


def test_unknown_setting_is_refused(project_dir, capsys):
    assert main(["train", str(project_dir), "--method", "dpo", "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_export_labels_writes_trl_jsonl(project_dir, tmp_path):
    from studio.core import store

    with store.Project.open(project_dir) as project:
        comparison = project.db["comparisons"].insert(
            {"prompt": json.dumps([{"role": "user", "content": "q"}]), "response_a": "A", "response_b": "B"}).last_pk
        project.db["labels"].insert({"comparison_id": comparison, "annotator": "me", "choice": "b"})
    out = tmp_path / "labels.jsonl"
    assert main(["export", str(project_dir), str(out), "--labels"]) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["chosen"] == [{"role": "assistant", "content": "B"}]
    assert row["rejected"] == [{"role": "assistant", "content": "A"}]
    assert row["annotator"] == "me"


def test_train_starts_from_the_defaults_for_the_models_size(project_dir, tmp_path, monkeypatch):
    from studio.core import defaults, store

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Say hi.", "chosen": " Hi.", "rejected": " No."}] * 2)
    assert main(["import", str(project_dir), str(pairs)]) == 0
    # The tiny model counts as "medium" once the small class ends below its size.
    monkeypatch.setattr(defaults, "SIZE_CLASSES", (("small", 10), ("medium", 4_000_000_000), ("large", float("inf"))))
    assert main(["train", str(project_dir), "--method", "dpo", "--set", "max_steps=1", "--set", "batch_size=2",
                 "--set", "eval_max_new_tokens=2"]) == 0
    with store.Project.open(project_dir, read_only=True) as project:
        (run,) = store.list_runs(project.db)
    assert run["config"]["learning_rate"] == defaults.DEFAULTS["dpo"]["medium"]["learning_rate"]
    assert run["config"]["batch_size"] == 2
