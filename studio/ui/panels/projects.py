"""The projects panel: recent projects, new/open, and the open project's settings.

Settings (name, base model, risk tolerance) are stored in the project with ``store.set_setting``.
"""

from __future__ import annotations

import re
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
    QLineEdit, QListWidget, QListWidgetItem, QMenu, QScrollArea, QSizePolicy, QToolButton,
    QVBoxLayout, QWidget,
)

from . import MUTED, bold, hint_label, icon
from .model_picker import ModelPicker

RISK_HELP = {
    "low": "Low: conservative updates; the advisor warns early when a run drifts from the base model",
    "medium": "Medium: the usual balance between learning fast and staying close to the base model",
    "high": "High: bolder updates; you accept more drift for faster change",
}


def default_projects_dir() -> Path:
    """./projects when run from a checkout that has one, else ~/AlignmentStudio."""
    here = Path.cwd() / "projects"
    return here if here.is_dir() else Path.home() / "AlignmentStudio"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-").lower() or "project"


class ElidedLabel(QLabel):
    """A one-line label that elides long text (paths) in the middle instead of widening its panel."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._full = text
        self.setMinimumWidth(40)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

    def setText(self, text: str) -> None:
        self._full = text
        self._elide()

    def text(self) -> str:
        return self._full

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        metrics = self.fontMetrics()
        super().setText(metrics.elidedText(self._full, Qt.TextElideMode.ElideMiddle, max(self.width(), 40)))


class NewProjectDialog(QDialog):
    """Name, folder and base model of a new project."""

    def __init__(self, parent: QWidget | None = None, base_dir: Path | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("New project")
        self.setMinimumWidth(560)
        self.base_dir = base_dir or default_projects_dir()
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.name = QLineEdit("My alignment project")
        form.addRow("Name", self.name)
        folder_row = QHBoxLayout()
        self.folder = QLineEdit()
        browse = QToolButton()
        browse.setIcon(icon("fa6s.folder-open"))
        browse.clicked.connect(self._browse)
        folder_row.addWidget(self.folder, 1)
        folder_row.addWidget(browse)
        form.addRow("Folder", folder_row)
        self.picker = ModelPicker(self, apply_text=None)
        form.addRow("Base model", self.picker)
        layout.addLayout(form)
        layout.addWidget(hint_label("A project is one folder: its database, checkpoints and exports."))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Create")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self._folder_edited = False
        self.folder.textEdited.connect(lambda _t: setattr(self, "_folder_edited", True))
        self.name.textChanged.connect(self._suggest_folder)
        self._suggest_folder(self.name.text())
        self.picker.set_source({"kind": "demo"})

    def _suggest_folder(self, name: str) -> None:
        if not self._folder_edited:
            self.folder.setText(str(self.base_dir / slug(name)))

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Parent folder", str(self.base_dir))
        if path:
            self.folder.setText(str(Path(path) / slug(self.name.text())))
            self._folder_edited = True

    def values(self) -> tuple[Path, str, dict]:
        return Path(self.folder.text()).expanduser(), self.name.text().strip(), self.picker.source()


class ProjectsPanel(QWidget):
    """Recent projects and the settings of the open one."""

    open_requested = Signal(Path)
    new_requested = Signal()
    browse_requested = Signal()
    settings_changed = Signal(str)  # the setting's key

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = None
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        layout = QVBoxLayout(body)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(8)

        # --- recent projects: a list while no project is open, a drop-down menu after ---
        header = QHBoxLayout()
        self.recent_title = bold(QLabel("Recent projects"))
        header.addWidget(self.recent_title)
        header.addStretch(1)
        self.recent_button = QToolButton()
        self.recent_button.setIcon(icon("fa6s.clock"))
        self.recent_button.setToolTip("Recent projects")
        self.recent_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.recent_menu = QMenu(self.recent_button)
        self.recent_button.setMenu(self.recent_menu)
        self.new_button = QToolButton()
        self.new_button.setIcon(icon("fa6s.folder-plus"))
        self.new_button.setToolTip("New project…")
        self.new_button.clicked.connect(self.new_requested)
        self.open_button = QToolButton()
        self.open_button.setIcon(icon("fa6s.folder-open"))
        self.open_button.setToolTip("Open project…")
        self.open_button.clicked.connect(self.browse_requested)
        for button in (self.recent_button, self.new_button, self.open_button):
            header.addWidget(button)
        layout.addLayout(header)
        self.recent = QListWidget()
        self.recent.setMinimumHeight(70)
        self.recent.setMaximumHeight(180)
        self.recent.itemActivated.connect(self._open_item)
        self.recent.setToolTip("Double-click to open")
        layout.addWidget(self.recent)

        # --- the open project ---
        self.settings_box = QGroupBox("Settings")
        form = QFormLayout(self.settings_box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.name = QLineEdit()
        self.name.setToolTip("The project's display name (the folder keeps its name)")
        self.name.editingFinished.connect(self._save_name)
        form.addRow("Name", self.name)
        self.folder = ElidedLabel()
        self.folder.setStyleSheet(f"color: {MUTED};")
        form.addRow("Folder", self.folder)
        self.risk = QComboBox()
        for level in ("low", "medium", "high"):
            self.risk.addItem(level.capitalize(), level)
            self.risk.setItemData(self.risk.count() - 1, RISK_HELP[level], Qt.ItemDataRole.ToolTipRole)
        self.risk.setToolTip("How much drift from the base model you accept; the advisor's verdicts use it")
        self.risk.currentIndexChanged.connect(self._save_risk)
        form.addRow("Risk tolerance", self.risk)
        self.picker = ModelPicker(self)
        self.picker.source_chosen.connect(self._save_base_model)
        self.base_model_label = QLabel("Base model")
        form.addRow(self.base_model_label, self.picker)
        layout.addWidget(self.settings_box)
        self.no_project = hint_label("No project open. Create one, or open an existing project folder.")
        layout.addWidget(self.no_project)

        layout.addStretch(1)
        self.set_project(None)

    # --- recent ---
    def set_recent(self, paths: list[str]) -> None:
        self.recent_menu.clear()
        for path in paths:
            action = self.recent_menu.addAction(icon("fa6s.folder", MUTED), Path(path).name)
            action.setToolTip(path)
            action.triggered.connect(lambda _c=False, p=path: self.open_requested.emit(Path(p)))
        self.recent_button.setEnabled(bool(paths))
        self.recent.clear()
        for path in paths:
            item = QListWidgetItem(icon("fa6s.folder", MUTED), Path(path).name)
            item.setToolTip(path)
            item.setData(Qt.ItemDataRole.UserRole, path)
            self.recent.addItem(item)
        if not paths:
            item = QListWidgetItem("No recent projects")
            item.setFlags(Qt.ItemFlag.NoItemFlags)
            self.recent.addItem(item)

    def _open_item(self, item: QListWidgetItem) -> None:
        path = item.data(Qt.ItemDataRole.UserRole)
        if path:
            self.open_requested.emit(Path(path))

    # --- the open project ---
    def set_project(self, project) -> None:
        self.project = project
        self.settings_box.setVisible(project is not None)
        self.no_project.setVisible(project is None)
        self.recent.setVisible(project is None)
        self.recent_title.setText("Recent projects" if project is None else "")
        self.recent_button.setVisible(project is not None)
        if project is None:
            return
        from studio.core import store

        db = project.db
        self.name.setText(store.get_setting(db, "name", project.path.name))
        self.folder.setText(str(project.path))
        self.folder.setToolTip(str(project.path))
        self.risk.blockSignals(True)
        self.risk.setCurrentIndex(max(0, self.risk.findData(store.get_setting(db, "risk_tolerance", "medium"))))
        self.risk.blockSignals(False)
        self.picker.set_source(store.get_setting(db, "base_model", {"kind": "demo"}))
        for widget in (self.name, self.risk, self.picker):
            widget.setEnabled(not project.read_only)

    def _save_name(self) -> None:
        if self.project is None:
            return
        from studio.core import store

        name = self.name.text().strip()
        if name and name != store.get_setting(self.project.db, "name"):
            store.set_setting(self.project.db, "name", name)
            self.settings_changed.emit("name")

    def _save_risk(self) -> None:
        if self.project is None:
            return
        from studio.core import store

        store.set_setting(self.project.db, "risk_tolerance", self.risk.currentData())
        self.settings_changed.emit("risk_tolerance")

    def _save_base_model(self, source: dict) -> None:
        if self.project is None:
            return
        from studio.core import store

        store.set_setting(self.project.db, "base_model", source)
        self.settings_changed.emit("base_model")
