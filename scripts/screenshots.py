"""Take the README screenshots of a real window under Xvfb.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py PROJECT_DIR OUT_DIR

PROJECT_DIR should already hold runs (e.g. made with `studio train`); the script opens it, starts a
DPO run from the window, grabs the window mid-run, then each centre tab (compare, with a typed
prompt answered live by the latest checkpoints and the base; label; advisor).
"""

import sys
import time
from pathlib import Path

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

from studio.core import labelling, store
from studio.core.generation import Decoding
from studio.ui.app import MainWindow, apply_style


def spin(app: QApplication, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.02)


def wait_for(app: QApplication, condition, timeout: float) -> None:
    end = time.time() + timeout
    while not condition() and time.time() < end:
        spin(app, 0.1)


def main(project_dir: Path, out_dir: Path, live_steps: int = 6) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    app = QApplication([])
    apply_style(app)
    settings_file = out_dir / "screenshots.ini"
    settings_file.unlink(missing_ok=True)
    window = MainWindow(QSettings(str(settings_file), QSettings.Format.IniFormat))
    window.resize(1600, 1000)
    window.show()
    window.open_project(project_dir)
    wait_for(app, lambda: window.engines is not None, 120)

    finished_runs = [run["id"] for run in store.list_runs(window.project.db)]
    setup = window.run_setup
    setup.select_method("dpo")
    setup.page("dpo").form.set_values({"max_steps": 200, "checkpoint_every": 100, "learning_rate": 2e-4})
    live = setup.launch()
    wait_for(app, lambda: (window.runs_panel.model.record(live) or {}).get("step", 0) >= live_steps, 900)
    window.runs_panel.select_runs(finished_runs + [live])
    spin(app, 2)
    window.grab().save(str(out_dir / "window.png"))

    window.queue.stop_all()
    wait_for(app, lambda: not window.queue.busy, 300)

    # Compare: the docks hidden for width, a pane for the base model, a typed prompt generated live.
    for dock in window.docks.values():
        dock.hide()
    compare = window.compare_panel
    window.show_tab(compare)
    compare.refresh()
    compare.add_pane()
    compare.panes[-1].set_state(None)
    compare.custom_edit.setText("Why is the sky blue? Answer in two sentences.")
    compare.generate_custom()
    wait_for(app, lambda: not compare.busy, 600)
    spin(app, 2)
    compare.grab().save(str(out_dir / "compare.png"))
    for dock in window.docks.values():
        dock.show()

    db = window.project.db
    ppo_checkpoint = store.checkpoints(db, finished_runs[0])[-1]["id"]
    comparison_ids = list(labelling.compare_states(db, labelling.BASE, ppo_checkpoint, store.eval_prompts(db)[:3],
                                                   Decoding(max_new_tokens=48)))
    window.label_comparisons(comparison_ids)
    spin(app, 2)
    window.label_panel.grab().save(str(out_dir / "label.png"))

    window.show_tab(window.advisor_panel)
    window.advisor_panel.refresh()
    spin(app, 8)
    window.advisor_panel.grab().save(str(out_dir / "advisor.png"))
    window.close()
    print("screenshots in", out_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
