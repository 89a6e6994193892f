"""The window fits 1366x768 and 1600x900 with its default docks: no tab or dock needs more room than it
has (which is what puts buttons behind a sideways scroll bar or below the fold)."""

import pytest
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

from studio.core import store
from studio.ui.app import MainWindow
from studio.ui.workers import wait_for_background_jobs


@pytest.fixture
def window(qtbot, tmp_path, project):
    store.add_dataset(project.db, "pairs", "preference", [
        {"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No, not at all, never."} for i in range(4)])
    project.close()
    window = MainWindow(QSettings(str(tmp_path / "studio.ini"), QSettings.Format.IniFormat))
    window.show()
    assert window.open_project(project.path)
    qtbot.waitUntil(lambda: window.engines is not None, timeout=180_000)  # run setup's forms are built
    yield window
    window.close()
    window.deleteLater()
    wait_for_background_jobs()


@pytest.mark.parametrize("size", [(1366, 768), (1600, 900)])
def test_every_tab_and_dock_fits_its_space_at_the_default_layout(qtbot, window, size):
    window.resize(*size)
    window.apply_default_layout()
    too_small = []
    for index in range(window.centre.count()):
        window.centre.setCurrentIndex(index)
        QApplication.processEvents()
        sideways, down = window.centre.widget(index).overflow()
        if sideways or down:
            too_small.append(f"tab {window.centre.tabText(index)}: {sideways} px too wide, {down} px too tall")
    for name, dock in window.docks.items():
        if dock.isVisible():
            minimum = dock.widget().minimumSizeHint()
            if minimum.width() > dock.widget().width() or minimum.height() > dock.widget().height():
                too_small.append(f"dock {name}: needs {minimum.width()}x{minimum.height()}, "
                                 f"has {dock.widget().width()}x{dock.widget().height()}")
    assert (window.width(), window.height()) == size
    assert not too_small, "\n".join(too_small)
