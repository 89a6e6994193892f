"""The window's Past One Machine menu: follow a bundle that is still being written."""

import json

from studio.core import bundles, runs, store
from tests.test_ui_window import TIMEOUT, make_window, settings_file  # noqa: F401 - fixtures


def test_following_a_bundle_updates_the_run_until_it_ends(make_window, qtbot, tmp_path, tiny_model_dir):
    project = store.Project.create(tmp_path / "project", base_model={"kind": "folder", "path": str(tiny_model_dir)})
    store.add_dataset(project.db, "pairs", "preference", [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}])
    run_id = runs.create_run(project.db, runs.make_config("dpo", {"max_steps": 3}))
    project.close()
    bundle = bundles.make_bundle(tmp_path / "project", run_id, tmp_path / "bundle", include_model=False)
    (bundle / "run").mkdir()
    (bundle / "run" / "metrics.jsonl").write_text('{"step": 1, "time": 1.0, "loss": 0.7}\n')
    (bundle / "run" / "status.json").write_text(json.dumps({"status": "running", "error": None}))

    window = make_window()
    actions = window.scale_out
    assert [a.text() for a in actions.menu.actions()][:3] == [
        "&Bundle Selected Run…", "&Import Run or Bundle…", "&Follow Bundle…"]
    assert not actions.launch_action.isVisible()  # no CUDA devices here
    assert window.open_project(tmp_path / "project")
    actions.start_import(bundle, follow=True)
    imported = lambda: store.get_setting(window.project.db, bundles.IMPORTED_KEY, {})  # noqa: E731
    qtbot.waitUntil(lambda: len(imported()) == 1, timeout=TIMEOUT)
    new_run = next(iter(imported().values()))
    assert bundle in actions.followed

    with open(bundle / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "time": 2.0, "loss": 0.6}\n{"step": 3, "time": 3.0, "loss": 0.5}\n')
    (bundle / "run" / "status.json").write_text(json.dumps({"status": "completed", "error": None}))
    qtbot.waitUntil(lambda: bundle not in actions.followed, timeout=TIMEOUT)  # stops at the run's end
    assert store.run_metrics(window.project.db, new_run)["loss"] == ([1, 2, 3], [0.7, 0.6, 0.5])
    assert store.get_run(window.project.db, new_run)["status"] == "completed"


def test_bundle_selected_run_writes_the_bundle_in_the_background(make_window, qtbot, tmp_path, tiny_model_dir):
    project = store.Project.create(tmp_path / "project", base_model={"kind": "folder", "path": str(tiny_model_dir)})
    store.add_dataset(project.db, "pairs", "preference", [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}])
    run_id = runs.create_run(project.db, runs.make_config("dpo", {"max_steps": 3}))
    project.close()
    window = make_window()
    assert window.open_project(tmp_path / "project")
    window.runs_panel.select_runs([run_id])
    assert window.scale_out.bundle_action.isEnabled()
    written = []
    window.scale_out.bundle_selected(tmp_path / "bundle", then=written.append)
    qtbot.waitUntil(lambda: written == [tmp_path / "bundle"], timeout=TIMEOUT)
    assert bundles.verify_bundle(tmp_path / "bundle")["source"]["run_id"] == run_id


def test_the_import_action_brings_a_verl_output_folder_back(make_window, qtbot, tmp_path, tiny_model_dir):
    from tests.test_import_engines import add_data, verl_output

    project = store.Project.create(tmp_path / "project", base_model={"kind": "folder", "path": str(tiny_model_dir)})
    add_data(project)
    output = verl_output(project, tmp_path, tiny_model_dir)
    project.close()
    window = make_window()
    assert window.open_project(tmp_path / "project")
    window.scale_out.start_import(output, follow=False)
    imported = lambda: store.get_setting(window.project.db, bundles.IMPORTED_KEY, {})  # noqa: E731
    qtbot.waitUntil(lambda: len(imported()) == 1, timeout=TIMEOUT)
    run_id = next(iter(imported().values()))
    qtbot.waitUntil(lambda: window.statusBar().currentMessage() == f"Imported output as run {run_id} (completed)",
                    timeout=TIMEOUT)
    assert [c["step"] for c in store.checkpoints(window.project.db, run_id)] == [2, 4]
    window.runs_panel.select_runs([run_id])  # the runs table shows it
    assert window.runs_panel.selected_run_ids() == [run_id]
