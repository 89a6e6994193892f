"""The mouse wheel scrolls the page: it changes a value (spin box, combo box, slider) or zooms a chart
only when that widget has the keyboard focus or a modifier key is held.

Without this, scrolling down a form over a combo box silently picks another item, and scrolling
over the charts zooms every linked chart. One application-wide event filter covers every panel.
"""

from __future__ import annotations

import sys

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtWidgets import (
    QAbstractScrollArea, QAbstractSlider, QAbstractSpinBox, QApplication, QComboBox, QScrollBar, QWidget,
)

GUARDED = (QAbstractSpinBox, QComboBox, QAbstractSlider)


def _is_chart(widget: QWidget) -> bool:
    """A pyqtgraph view (looked up, never imported: no chart exists before pyqtgraph is imported)."""
    pyqtgraph = sys.modules.get("pyqtgraph")
    return pyqtgraph is not None and isinstance(widget, pyqtgraph.GraphicsView)


def guarded_widget(widget: QWidget | None) -> QWidget | None:
    """The value widget or chart that a wheel event over `widget` would change, if any.

    The walk up the parents stops at the first scroll area (a list, a text box, an open combo box's
    popup, a scroll bar's area): that one scrolls, which is what the wheel is for.
    """
    while widget is not None:
        if isinstance(widget, QScrollBar):
            return None
        if isinstance(widget, GUARDED) or _is_chart(widget):
            return widget
        if isinstance(widget, QAbstractScrollArea):
            return None
        widget = widget.parentWidget()
    return None


class WheelGuard(QObject):
    """Install with ``QApplication.instance().installEventFilter(WheelGuard(app))``."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() != QEvent.Type.Wheel or not isinstance(watched, QWidget):
            return False
        target = guarded_widget(watched)
        if target is None or target.hasFocus() or event.modifiers() != Qt.KeyboardModifier.NoModifier:
            return False
        area = target.parentWidget()
        while area is not None and not isinstance(area, QAbstractScrollArea):
            area = area.parentWidget()
        if area is not None:
            QApplication.sendEvent(area.verticalScrollBar(), event)
        return True  # never reaches the value widget or the chart
