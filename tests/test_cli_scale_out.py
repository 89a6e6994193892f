"""The scale-out commands: clear messages and exit code 2 on bad input, never a traceback."""

import json

import pytest

from studio.cli import main


@pytest.fixture
def project_dir(tmp_path, tiny_model_dir):
    folder = tmp_path / "proj"
    assert main(["init", str(folder), "--model", str(tiny_model_dir)]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(["import", str(folder), str(pairs)]) == 0
    return folder


def dpo_run(project_dir) -> int:
    from studio.core import runs, store

    with store.Project.open(project_dir) as project:
        return runs.create_run(project.db, runs.make_config("dpo", {"max_steps": 1}))


def error(capsys) -> str:
    return capsys.readouterr().err


def test_run_bundle_on_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    assert main(["run-bundle", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run bundle (no manifest.json)" in error(capsys)


def test_import_run_of_a_folder_of_no_known_kind(project_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["import-run", str(project_dir), str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} is none of the folders import-run reads; looked for a run bundle (manifest.json)" \
        in error(capsys)


def test_bundle_of_a_missing_run(project_dir, tmp_path, capsys):
    assert main(["bundle", str(project_dir), "99", str(tmp_path / "out")]) == 2
    assert "No run with id 99" in error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_export_job_refuses_verl_dpo(project_dir, tmp_path, capsys):
    run_id = dpo_run(project_dir)
    assert main(["export-job", str(project_dir), str(run_id), "--engine", "verl", str(tmp_path / "job")]) == 2
    assert "verl has no offline DPO" in error(capsys)


def test_a_corrupt_metrics_line_is_named_by_file_and_line(project_dir, tmp_path, capsys):
    run_id = dpo_run(project_dir)
    out = tmp_path / "bundle"
    assert main(["bundle", str(project_dir), str(run_id), str(out), "--no-model"]) == 0
    (out / "run").mkdir()
    (out / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": \n{"step": 3}\n')
    assert main(["import-run", str(project_dir), str(out)]) == 2
    assert f"{out / 'run' / 'metrics.jsonl'}, line 2: not JSON" in error(capsys)
