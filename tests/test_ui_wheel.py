"""The wheel scrolls the page over value widgets and charts unless they have the focus or a modifier is held."""

import pyqtgraph as pg
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QApplication, QComboBox, QLineEdit, QScrollArea, QSpinBox, QVBoxLayout, QWidget

from studio.ui.wheel import WheelGuard


@pytest.fixture
def page(qtbot):
    guard = WheelGuard()
    QApplication.instance().installEventFilter(guard)
    area = QScrollArea()
    content = QWidget()
    layout = QVBoxLayout(content)
    name, combo, spin, chart = QLineEdit(), QComboBox(), QSpinBox(), pg.PlotWidget()
    combo.addItems(["base", "checkpoint 1", "checkpoint 2"])
    spin.setValue(5)
    chart.plot([0, 1, 2], [1, 2, 3])
    chart.setMinimumHeight(300)
    for widget in (name, combo, spin, chart):
        layout.addWidget(widget)
    layout.addSpacing(2000)  # a page taller than the view: there is something to scroll
    area.setWidget(content)
    area.setWidgetResizable(True)
    area.resize(400, 300)
    qtbot.addWidget(area)
    area.show()
    qtbot.waitExposed(area)
    name.setFocus()  # the focus is elsewhere, as when the user is reading the page
    QApplication.processEvents()
    yield area, combo, spin, chart
    QApplication.instance().removeEventFilter(guard)


def wheel(widget, modifiers=Qt.KeyboardModifier.NoModifier):
    centre = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(centre, widget.mapToGlobal(centre), QPoint(0, 0), QPoint(0, -120),
                        Qt.MouseButton.NoButton, modifiers, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)


def test_the_wheel_scrolls_the_page_instead_of_changing_an_unfocused_value(page):
    area, combo, spin, chart = page
    view_range = chart.getViewBox().viewRange()
    for widget in (combo, spin, chart.viewport()):
        wheel(widget)
    assert combo.currentText() == "base" and spin.value() == 5
    assert chart.getViewBox().viewRange() == view_range
    assert area.verticalScrollBar().value() > 0  # the page scrolled


def test_a_focused_widget_or_a_held_modifier_takes_the_wheel(page):
    area, combo, spin, chart = page
    combo.setFocus()
    QApplication.processEvents()
    wheel(combo)
    assert combo.currentText() == "checkpoint 1"
    view_range = chart.getViewBox().viewRange()
    wheel(chart.viewport(), Qt.KeyboardModifier.ControlModifier)
    assert chart.getViewBox().viewRange() != view_range
