"""The window's GGUF export: File > Export Checkpoint as GGUF converts in the background."""

from studio.core import runs, store
from tests.test_ui_window import TIMEOUT, make_window, settings_file, window_with_project  # noqa: F401 (fixtures)


def test_window_exports_a_checkpoint_as_gguf_with_card_and_modelfile(qtbot, window_with_project, monkeypatch,
                                                                    tmp_path):
    monkeypatch.setitem(runs.ENGINE_MODULES, "toy", "tests.toy_engine")
    window = window_with_project
    db = window.project.db
    run_id = runs.create_run(db, runs.make_config("toy", {"max_steps": 1, "eval_max_new_tokens": 1}))
    runs.execute(window.project.path, run_id)
    checkpoint_id = store.checkpoints(db, run_id)[-1]["id"]
    assert "Export Checkpoint as &GGUF…" in [a.text() for a in window.menuBar().actions()[0].menu().actions()]

    window.export_gguf(checkpoint_id, tmp_path / "gguf")
    qtbot.waitUntil(lambda: "GGUF written" in window.statusBar().currentMessage(), timeout=TIMEOUT)
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["Modelfile", "README.md", "model-f16.gguf"]
