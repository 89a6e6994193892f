"""Run bundles: a run trained from a folder with no database, and brought back into the project."""

import json
import shutil

import pytest

from studio.core import bundles, runs, store

TIMING = {"tokens_per_second", "step_seconds", "memory/peak_mb"}


def add_pairs(project, count=8):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Yes, {i}."}],
             "rejected": [{"role": "assistant", "content": f"No... {'really ' * (i % 3)}no."}]} for i in range(count)]
    store.add_dataset(project.db, "pairs", "preference", rows)


def dpo_run(project, **overrides) -> int:
    config = runs.make_config("dpo", {"max_steps": 4, "checkpoint_every": 2, "eval_max_new_tokens": 2,
                                      "learning_rate": 1e-3, "batch_size": 2, **overrides})
    return runs.create_run(project.db, config)


def metrics_without_timing(db, run_id):
    return {name: series for name, series in store.run_metrics(db, run_id).items() if name not in TIMING}


def test_a_bundle_trains_like_the_local_run_and_imports_back_as_one_run(project, tmp_path):
    add_pairs(project)
    local, bundled = dpo_run(project), dpo_run(project)
    assert runs.execute(project.path, local) == "completed"
    out = bundles.make_bundle(project.path, bundled, tmp_path / "bundle")
    assert not (out / "studio.db").exists() and (out / "model" / "config.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": 8, "prompts": 0, "eval_prompts": 4} and "data.json" in manifest["files"]

    assert bundles.run_bundle(out) == "completed"
    assert json.loads((out / "run" / "status.json").read_text())["status"] == "completed"
    imported = bundles.import_run(project.db, project.path, out)
    assert bundles.import_run(project.db, project.path, out) == imported  # importing again updates the same run

    db = store.connect(project.path)
    assert metrics_without_timing(db, imported) == metrics_without_timing(db, local)
    assert [c["step"] for c in store.checkpoints(db, imported)] == [2, 4]
    last_local, last_imported = store.checkpoints(db, local)[-1], store.checkpoints(db, imported)[-1]
    assert [s["text"] for s in store.samples(db, last_imported["id"])] == \
        [s["text"] for s in store.samples(db, last_local["id"])]
    assert store.get_run(db, imported)["status"] == "completed"
    assert len(store.list_runs(db)) == 3


def test_import_of_a_bundle_still_being_written_takes_complete_records_only(project, tmp_path):
    add_pairs(project)
    out = bundles.make_bundle(project.path, dpo_run(project), tmp_path / "bundle", include_model=False)
    run = out / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "time": 1.0, "loss": 0.7}\n{"step": 2, "time": 2.0, "lo')
    (run / "status.json").write_text(json.dumps({"status": "running", "error": None, "step": 1, "updated_at": 0}))
    run_id = bundles.import_run(project.db, project.path, out)
    db = store.connect(project.path)
    assert store.run_metrics(db, run_id)["loss"] == ([1], [0.7])
    assert store.get_run(db, run_id)["status"] == "running"

    with open(run / "metrics.jsonl", "a") as f:  # the writer finishes its line and the next one
        f.write('ss": 0.6}\n{"step": 3, "time": 3.0, "loss": 0.5}\n')
    assert bundles.import_run(project.db, project.path, out) == run_id
    assert store.run_metrics(db, run_id)["loss"] == ([1, 2, 3], [0.7, 0.6, 0.5])


def test_a_bundle_with_a_changed_file_is_refused_naming_it(project, tmp_path):
    add_pairs(project)
    out = bundles.make_bundle(project.path, dpo_run(project), tmp_path / "bundle", include_model=False)
    with open(out / "data.json", "a") as f:
        f.write(" ")
    with pytest.raises(bundles.BundleError, match="data.json: its sha256 differs"):
        bundles.run_bundle(out)


def test_bundle_refuses_a_folder_that_is_not_empty(project, tmp_path):
    add_pairs(project)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(bundles.BundleError, match="not empty"):
        bundles.make_bundle(project.path, dpo_run(project), tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_run_from_a_checkpoint_carries_its_start_adapters(project, tmp_path):
    add_pairs(project)
    first = dpo_run(project, max_steps=2)
    runs.execute(project.path, first)
    parent = store.checkpoints(project.db, first)[-1]["id"]
    child = dpo_run(project, parent_checkpoint_id=parent)
    out = bundles.make_bundle(project.path, child, tmp_path / "bundle", include_model=False)
    assert (out / "start" / "adapter-0" / "adapter_model.safetensors").exists()
    start = bundles.bundle_start(out, bundles.load_manifest(out))
    assert start.adapters == [out / "start" / "adapter-0"]
    assert json.loads((out / "config.json").read_text())["parent_checkpoint_id"] is None


def test_a_trl_output_folder_imports_its_log_history_and_adapters(project, tmp_path):
    add_pairs(project)
    source = dpo_run(project, max_steps=2)
    runs.execute(project.path, source)
    adapter = store.checkpoint_folder(project.db, store.checkpoints(project.db, source)[-1]) / "adapter"
    trl = tmp_path / "trl-out"
    shutil.copytree(adapter, trl / "checkpoint-2")
    log = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0, "epoch": 0.5},
           {"step": 2, "loss": 0.6, "rewards/margins": 0.2, "epoch": 1.0},
           {"step": 2, "train_runtime": 3.0, "train_loss": 0.65}]
    (trl / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    run_id = bundles.import_run(project.db, project.path, trl)
    assert bundles.import_run(project.db, project.path, trl) == run_id
    db = store.connect(project.path)
    metrics = store.run_metrics(db, run_id)
    assert metrics["loss"] == ([1, 2], [0.69, 0.6]) and "train_runtime" not in metrics
    [checkpoint] = store.checkpoints(db, run_id)
    assert checkpoint["step"] == 2
    model, _ = runs.load_model_state(db, checkpoint["id"])  # the adapter loads like a local one


def test_bundle_sink_writes_metrics_in_batches_while_the_run_goes_on(tmp_path):
    sink = bundles.BundleSink(tmp_path, batch_size=2, max_delay_s=3600)
    sink.set_status("running")
    for step in (1, 2, 3):
        sink.add({"step": step, "time": 0.0, "loss": 1.0 / step})
    assert [r["step"] for r in bundles.read_jsonl(sink.metrics_path)] == [1, 2]  # a follower sees them now
    sink.flush()
    assert [r["step"] for r in bundles.read_jsonl(sink.metrics_path)] == [1, 2, 3]
    follower = bundles.BundleSink(tmp_path / "rank1", writes=False, batch_size=2)  # a rank other than 0
    for step in (1, 2, 3):
        follower.add({"step": step, "time": 0.0, "loss": 1.0})
    follower.flush()
    follower.set_status("completed")
    assert not (tmp_path / "rank1").exists()


def test_a_bundle_whose_config_was_edited_badly_is_refused_by_field_before_training(project, tmp_path):
    add_pairs(project)
    out = bundles.make_bundle(project.path, dpo_run(project), tmp_path / "bundle")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "checkpoint_every": 0}))
    manifest = json.loads((out / "manifest.json").read_text())  # a hand edit the manifest is told about
    manifest["files"]["config.json"] = bundles.sha256(out / "config.json")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runs.SettingsError, match="checkpoint_every"):
        bundles.run_bundle(out)
    assert not (out / "run" / "metrics.jsonl").exists()
