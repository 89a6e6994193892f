"""The studio window's panels, one module each, and the few small helpers they share.

Every panel is a plain ``QWidget`` that knows nothing of the main window: it receives the open
project through ``set_project`` and reports what the user did through signals. The window lays the
panels out (see ``MainWindow.panel_specs`` in ``studio.ui.app``).

Nothing heavy is imported here: the window must appear before torch is imported.
"""

from __future__ import annotations

import json
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtGui import QFont, QIcon
from PySide6.QtWidgets import (
    QFrame, QHBoxLayout, QLabel, QMessageBox, QPushButton, QSizePolicy, QVBoxLayout, QWidget,
)

ACCENT = "#2f6fde"
DANGER = "#c62828"
WARNING = "#b26a00"
OK = "#2e7d32"
MUTED = "#6b7280"


def icon(name: str, color: str | None = None) -> QIcon:
    """A qtawesome icon by name (e.g. "fa6s.play"); an empty icon if the name is unknown."""
    import qtawesome

    try:
        return qtawesome.icon(name, color=color or "#374151")
    except Exception:  # an unknown name must never break a panel
        return QIcon()


def as_text(value: Any) -> str:
    """A prompt or response as readable text: plain text as it is, messages as "role: content" lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "\n".join(f"{m.get('role', '?')}: " + " ".join(filter(None, [m.get("content", ""), *_calls(m)]))
                         for m in value)
    return json.dumps(value, ensure_ascii=False)


def _calls(message: dict) -> list[str]:
    """An assistant message's function calls, each as [calls name(arguments)]."""
    return [f"[calls {c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})]"
            for c in message.get("tool_calls") or []]


def one_line(text: str, limit: int = 160) -> str:
    """Text for a table cell: newlines shown as ⏎, cut at `limit` characters."""
    text = text.replace("\r", "").replace("\n", " ⏎ ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bold(widget: QWidget, point_delta: float = 0) -> QWidget:
    font = QFont(widget.font())
    font.setBold(True)
    if point_delta:
        font.setPointSizeF(font.pointSizeF() + point_delta)
    widget.setFont(font)
    return widget


def hint_label(text: str = "", color: str = MUTED) -> QLabel:
    """A wrapped, muted, selectable label for explanations and inline messages."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    label.setStyleSheet(f"color: {color};")
    return label


def hline() -> QFrame:
    line = QFrame()
    line.setFrameShape(QFrame.Shape.HLine)
    line.setFrameShadow(QFrame.Shadow.Sunken)
    return line


class EmptyState(QWidget):
    """What a panel shows when there is nothing yet: an icon, a title, a hint and one action."""

    def __init__(self, icon_name: str, title: str, hint: str, action_text: str | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 24, 24, 24)
        layout.addStretch(1)
        picture = QLabel()
        picture.setPixmap(icon(icon_name, "#9ca3af").pixmap(40, 40))
        picture.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(picture)
        self.title = bold(QLabel(title), 1)
        self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.title.setWordWrap(True)
        layout.addWidget(self.title)
        self.hint = hint_label(hint)
        self.hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(self.hint)
        self.button: QPushButton | None = None
        if action_text:
            self.button = QPushButton(action_text)
            self.button.setProperty("primary", True)
            self.button.setSizePolicy(QSizePolicy.Policy.Maximum, QSizePolicy.Policy.Fixed)
            row = QHBoxLayout()
            row.addStretch(1)
            row.addWidget(self.button)
            row.addStretch(1)
            layout.addLayout(row)
        layout.addStretch(2)


def show_message(parent: QWidget, title: str, text: str, details: str | None = None,
                 level: str = "warning") -> QMessageBox:
    """A non-blocking message box (it never stops the event loop, so runs keep drawing)."""
    box = QMessageBox(parent)
    box.setIcon({"info": QMessageBox.Icon.Information, "warning": QMessageBox.Icon.Warning,
                 "error": QMessageBox.Icon.Critical}[level])
    box.setWindowTitle(title)
    box.setText(text)
    if details:
        box.setDetailedText(details)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.open()
    return box


def ask_once(parent: QWidget, key: str, title: str, text: str, settings: dict[str, Any], on_yes) -> QMessageBox | None:
    """Before long work: show the `settings` it will use and call `on_yes()` if the user goes ahead.

    Non-blocking like show_message. "Don't ask again" (kept in QSettings under ``ask/<key>``) makes
    later calls go ahead at once; returns the box, or None when it was not shown.
    """
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QCheckBox

    if QSettings().value(f"ask/{key}", False, bool):
        on_yes()
        return None
    box = QMessageBox(QMessageBox.Icon.Question, title, text,
                      QMessageBox.StandardButton.Ok | QMessageBox.StandardButton.Cancel, parent)
    box.button(QMessageBox.StandardButton.Ok).setText("Start")
    box.setInformativeText("<br>".join(f"{name}: <b>{value}</b>" for name, value in settings.items()))
    dont_ask = QCheckBox("Don't ask again")  # kept referenced (by finished): PySide would free it otherwise
    box.setCheckBox(dont_ask)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

    def finished(_result: int) -> None:
        if box.clickedButton() is box.button(QMessageBox.StandardButton.Ok):
            if dont_ask.isChecked():
                QSettings().setValue(f"ask/{key}", True)
            on_yes()

    box.finished.connect(finished)
    box.open()
    return box


class RecordsTableModel(QAbstractTableModel):
    """A table of dicts with an "id", one per row, under fixed column titles: subclasses say what each
    cell shows."""

    COLUMNS: tuple[str, ...] = ()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.records: list[dict] = []

    def set_records(self, records: list[dict]) -> None:
        self.beginResetModel()
        self.records = records
        self.endResetModel()

    def row_of(self, record_id: int) -> int | None:
        for row, record in enumerate(self.records):
            if record["id"] == record_id:
                return row
        return None

    def record(self, record_id: int) -> dict | None:
        row = self.row_of(record_id)
        return None if row is None else self.records[row]

    def update_record(self, record_id: int, **changes: Any) -> None:
        row = self.row_of(record_id)
        if row is None:
            return
        self.records[row].update(changes)
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(self.COLUMNS) - 1))

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.records)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return self.COLUMNS[section]
        return None
