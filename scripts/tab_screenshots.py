"""Screenshots of every centre tab at 1366x768 and 1600x900 with the default docks (issue 14: the
window must fit both without a sideways scroll bar or buttons below the fold).

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/tab_screenshots.py PROJECT_DIR docs/screenshots

Writes OUT_DIR/tab-<name>-<width>x<height>.png and prints, per tab, how many pixels its minimum
size exceeds the room it has (0 0 when it fits).
"""

import sys
import tempfile
import time
from pathlib import Path

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

from studio.ui.app import MainWindow, apply_style
from studio.ui.workers import wait_for_background_jobs

SIZES = ((1366, 768), (1600, 900))


def spin(app: QApplication, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.02)


def main(project_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    app = QApplication([])
    apply_style(app)
    with tempfile.TemporaryDirectory() as tmp:  # default docks: no remembered layout
        window = MainWindow(QSettings(str(Path(tmp) / "studio.ini"), QSettings.Format.IniFormat))
        window.show()
        window.open_project(project_dir)
        end = time.time() + 300
        while window.engines is None and time.time() < end:  # run setup shows its forms once torch is in
            spin(app, 0.2)
        spin(app, 3)
        for width, height in SIZES:
            window.resize(width, height)
            window.apply_default_layout()
            for index in range(window.centre.count()):
                window.centre.setCurrentIndex(index)
                spin(app, 3)
                name = window.centre.tabText(index).lower().replace(" ", "-")
                window.grab().save(str(out_dir / f"tab-{name}-{width}x{height}.png"))
                print(f"{width}x{height} {name}: overflow {window.centre.widget(index).overflow()}")
        window.queue.stop_all()
        window.close()
        wait_for_background_jobs()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
