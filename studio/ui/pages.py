"""The scroll area around each centre tab: the page fills the view and scrolls only when the view is
smaller than the page's minimum size.

QScrollArea's own resizing gives a page with wrapping text its *preferred* height for the width
(heightForWidth), so a tab whose parts would all fit scrolled anyway and its buttons sat below the
fold at 1366x768. Here a page gets the view's size, never less than its minimum: its text views
shrink first, and a scroll bar appears only when nothing more can shrink.
"""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject
from PySide6.QtWidgets import QFrame, QScrollArea, QWidget


class PageScroll(QScrollArea):
    def __init__(self, page: QWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setWidgetResizable(False)  # sized in fit(), below
        self.setWidget(page)
        page.installEventFilter(self)  # its minimum changes as its contents do

    def fit(self) -> None:
        page = self.widget()
        minimum = page.minimumSizeHint().expandedTo(page.minimumSize())
        view = self.maximumViewportSize()
        width = max(view.width(), minimum.width())
        height = max(view.height(), minimum.height())
        if width > view.width():  # the sideways bar takes room from the height, and the other way round
            height = max(view.height() - self.horizontalScrollBar().sizeHint().height(), minimum.height())
        if height > view.height():
            width = max(view.width() - self.verticalScrollBar().sizeHint().width(), minimum.width())
        page.resize(width, height)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.fit()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.fit()
        return False

    def overflow(self) -> tuple[int, int]:
        """How many pixels the page's minimum exceeds the view, (sideways, downwards); (0, 0) when it fits."""
        page = self.widget()
        minimum = page.minimumSizeHint().expandedTo(page.minimumSize())
        view = self.maximumViewportSize()
        return max(0, minimum.width() - view.width()), max(0, minimum.height() - view.height())


