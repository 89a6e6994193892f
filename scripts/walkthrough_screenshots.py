"""README screenshots from the walkthrough's own project, as it stands (nothing is trained here).

    studio demo /tmp/demo-story --story        # first: the walkthrough (or part of it)
    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/walkthrough_screenshots.py /tmp/demo-story docs/screenshots

Opens the window at 1600x900 on the project and saves walkthrough-*.png: the window with the
walkthrough's runs charted, the stage advisor judging the PPO run, the checklist, and compare with
the base, the PPO checkpoint the advisor named and the DPO checkpoint (stored greedy answers).
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from studio.core import store, story  # noqa: E402
from studio.ui.app import MainWindow, apply_style  # noqa: E402


def wait_for(app: QApplication, condition, timeout: float) -> None:
    end = time.time() + timeout
    while not condition() and time.time() < end:
        app.processEvents()
        time.sleep(0.05)


def main(project_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    app = QApplication([])
    apply_style(app)
    settings = QSettings(str(Path(tempfile.mkdtemp()) / "screenshots.ini"), QSettings.Format.IniFormat)
    window = MainWindow(settings)
    window.resize(1600, 900)
    window.show()
    window.open_project(project_dir)
    wait_for(app, lambda: window.engines is not None, 900)
    db = window.project.db
    ppo, dpo = story.find_run(db, story.PPO_RUN), story.find_run(db, story.DPO_RUN)
    runs = [run["id"] for run in (ppo, dpo) if run is not None]
    window.runs_panel.select_runs(runs)
    wait_for(app, lambda: False, 3)
    window.grab().save(str(out_dir / "walkthrough-window.png"))

    advisor_panel = window.advisor_panel
    window.show_tab(advisor_panel)
    advisor_panel.refresh()
    wait_for(app, lambda: advisor_panel.advice is not None and advisor_panel.advice.run_id == (ppo or {}).get("id"), 300)
    wait_for(app, lambda: False, 1)
    window.grab().save(str(out_dir / "walkthrough-advisor.png"))

    window.show_tab(window.walkthrough_panel)
    window.walkthrough_panel.refresh()
    wait_for(app, lambda: False, 1)
    window.grab().save(str(out_dir / "walkthrough-checklist.png"))

    compare = window.compare_panel
    for dock in window.docks.values():  # three panes side by side need the window's whole width
        dock.hide()
    window.show_tab(compare)
    compare.refresh()
    states = [None]
    if ppo and store.checkpoints(db, ppo["id"]):
        states.append(advisor_panel.advice.checkpoint_id or store.checkpoints(db, ppo["id"])[-1]["id"])
    if dpo and store.checkpoints(db, dpo["id"]):
        states.append(store.checkpoints(db, dpo["id"])[-1]["id"])
    while len(compare.panes) < len(states):
        compare.add_pane()
    for pane, state in zip(compare.panes, states):
        pane.set_state(state)
    compare.refresh()
    wait_for(app, lambda: not compare.busy, 300)
    wait_for(app, lambda: False, 2)
    window.grab().save(str(out_dir / "walkthrough-compare.png"))
    window.close()
    print("screenshots in", out_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
