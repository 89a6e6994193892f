"""The data panel: the project's datasets, their rows (model/view, searchable), and importing files.

Importing always goes through :class:`ImportPreviewDialog`: the file is checked in the background
(``datasets.preview`` reads every row), the first rows and every row-level problem are shown, and
the Import button stays disabled while the file has problems. The import itself runs in the
background too, on its own database connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel, QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt, Signal,
)
from PySide6.QtWidgets import (
    QAbstractItemView, QCheckBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout,
    QHeaderView, QLabel, QLineEdit, QProgressBar, QPushButton, QSplitter, QStackedWidget,
    QTableView, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from . import DANGER, OK, EmptyState, RecordsTableModel, as_text, bold, hint_label, icon, one_line, show_message
from ..workers import describe_error, run_in_background

FILE_FILTER = "Data files (*.jsonl *.json *.csv *.parquet);;All files (*)"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_ERRORS_SHOWN = 500
KIND_NAMES = {"preference": "preference pairs", "prompts": "prompts"}
SHORT_KIND = {"preference": "pairs", "prompts": "prompts"}

_Index = QModelIndex | QPersistentModelIndex


class RowsModel(QAbstractTableModel):
    """Rows of one dataset (pairs or prompts) for a QTableView: one line per cell, full text as tooltip."""

    COLUMNS = {"preference": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.kind = "preference"
        self._rows: list[dict] = []
        self._text: list[tuple[str, ...]] = []  # rendered once: sorting and filtering stay fast

    def set_rows(self, kind: str, rows: list[dict]) -> None:
        self.beginResetModel()
        self.kind = kind if kind in self.COLUMNS else "preference"
        self._rows = rows
        self._text = [tuple(as_text(row.get(c, "")) for c in self.COLUMNS[self.kind]) for row in rows]
        self.endResetModel()

    def row(self, index: int) -> dict:
        return self._rows[index]

    def rowCount(self, parent: _Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS[self.kind])

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return self.COLUMNS[self.kind][section].capitalize()
        return str(section + 1)

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        text = self._text[index.row()][index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return one_line(text)
        if role == Qt.ItemDataRole.ToolTipRole:
            return text if len(text) < 3000 else text[:3000] + "…"
        if role == Qt.ItemDataRole.UserRole:  # what the search box matches
            return text
        return None


class DatasetsModel(RecordsTableModel):
    """The project's datasets; the Eval column is checkable for prompt datasets."""

    COLUMNS = ("Name", "Kind", "Rows", "Eval")
    eval_toggled = Signal(int, bool)

    def flags(self, index: _Index) -> Qt.ItemFlag:
        flags = super().flags(index)
        if index.isValid() and index.column() == 3 and self.records[index.row()]["kind"] == "prompts":
            flags |= Qt.ItemFlag.ItemIsUserCheckable
        return flags

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        d = self.records[index.row()]
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return {0: d["name"], 1: SHORT_KIND.get(d["kind"], d["kind"]), 2: f"{d['row_count'] or 0:,}",
                    3: ""}[column]
        if role == Qt.ItemDataRole.CheckStateRole and column == 3 and d["kind"] == "prompts":
            return Qt.CheckState.Checked if d.get("is_eval") else Qt.CheckState.Unchecked
        if role == Qt.ItemDataRole.ToolTipRole:
            if column == 3:
                return ("Evaluation prompts: every checkpoint stores greedy answers to them, "
                        "for comparing checkpoints" if d["kind"] == "prompts"
                        else "Only prompt datasets can be evaluation prompts")
            fmt = (d.get("format") or "").upper()
            return f"{d['name']}: {KIND_NAMES.get(d['kind'], d['kind'])}, {fmt}\n{d.get('source_file') or ''}".strip()
        if role == Qt.ItemDataRole.TextAlignmentRole and column == 2:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def setData(self, index: _Index, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        if role == Qt.ItemDataRole.CheckStateRole and index.column() == 3:
            checked = Qt.CheckState(value) == Qt.CheckState.Checked
            self.eval_toggled.emit(self.records[index.row()]["id"], checked)
            return True
        return False


class SearchProxy(QSortFilterProxyModel):
    """Case-insensitive search in every column's full text."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.setFilterKeyColumn(-1)
        self.setFilterRole(Qt.ItemDataRole.UserRole)


def make_table(model, stretch_last: bool = True) -> QTableView:
    view = QTableView()
    view.setModel(model)
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setAlternatingRowColors(True)
    view.setWordWrap(False)
    view.verticalHeader().setDefaultSectionSize(24)
    view.verticalHeader().setVisible(False)
    view.horizontalHeader().setStretchLastSection(stretch_last)
    view.horizontalHeader().setHighlightSections(False)
    return view


# --- the import dialog ------------------------------------------------------------------------

class ImportPreviewDialog(QDialog):
    """Shows a file's first rows and its problems; imports it (in the background) if it has none."""

    imported = Signal(int)  # dataset id

    def __init__(self, path: Path | str, project_path: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path = Path(path)
        self.project_path = project_path
        self.loaded = None  # datasets.LoadedFile once checked
        self.dataset_id: int | None = None
        self._checked = False
        self.setWindowTitle(f"Import {self.path.name}")
        self.resize(900, 600)

        layout = QVBoxLayout(self)
        self.summary = bold(QLabel(f"Checking {self.path.name}…"), 1)
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        self.column_plan = hint_label("")  # every column of the file and what the import does with it
        layout.addWidget(self.column_plan)
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setMaximumHeight(6)
        self.busy.setTextVisible(False)
        layout.addWidget(self.busy)

        form = QFormLayout()
        self.name = QLineEdit(self.path.stem)
        form.addRow("Dataset name", self.name)
        self.as_eval = QCheckBox("Use these prompts as evaluation prompts")
        self.as_eval.setToolTip("Every checkpoint stores greedy answers to evaluation prompts, so "
                                "checkpoints can be compared on the same questions")
        self.as_eval.setVisible(False)
        form.addRow("", self.as_eval)
        layout.addLayout(form)

        splitter = QSplitter(Qt.Orientation.Vertical)
        self.rows = RowsModel(self)
        self.rows_view = make_table(self.rows)
        rows_box = QWidget()
        rows_layout = QVBoxLayout(rows_box)
        rows_layout.setContentsMargins(0, 0, 0, 0)
        self.rows_caption = hint_label("")
        rows_layout.addWidget(self.rows_caption)
        rows_layout.addWidget(self.rows_view)
        splitter.addWidget(rows_box)

        errors_box = QWidget()
        errors_layout = QVBoxLayout(errors_box)
        errors_layout.setContentsMargins(0, 0, 0, 0)
        self.errors_caption = hint_label("", DANGER)
        errors_layout.addWidget(self.errors_caption)
        self.errors = QTableWidget(0, 3)
        self.errors.setHorizontalHeaderLabels(["Row", "Field", "Problem"])
        self.errors.verticalHeader().setVisible(False)
        self.errors.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.errors.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.errors.setAlternatingRowColors(True)
        errors_layout.addWidget(self.errors)
        splitter.addWidget(errors_box)
        self.errors_box = errors_box
        errors_box.setVisible(False)
        layout.addWidget(splitter, 1)

        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.import_button = self.buttons.addButton("Import", QDialogButtonBox.ButtonRole.AcceptRole)
        self.import_button.setIcon(icon("fa6s.file-import", "white"))
        self.import_button.setProperty("primary", True)
        self.import_button.setEnabled(False)
        self.buttons.rejected.connect(self.reject)
        self.import_button.clicked.connect(self.start_import)
        layout.addWidget(self.buttons)

        from studio.core import datasets

        self._job = run_in_background(datasets.preview, self.path, limit=50,
                                      on_result=self._on_preview, on_error=self._on_preview_error)

    @property
    def ready(self) -> bool:
        """The check has finished (whatever it found)."""
        return self._checked

    def _on_preview(self, loaded) -> None:
        self.loaded = loaded
        self._checked = True
        self.busy.setVisible(False)
        kind = KIND_NAMES.get(loaded.kind, "rows")
        self.rows.set_rows(loaded.kind or "preference", loaded.rows)
        self.rows_view.resizeColumnsToContents()
        for column in range(self.rows.columnCount()):
            self.rows_view.setColumnWidth(column, min(self.rows_view.columnWidth(column), 320))
        self.as_eval.setVisible(loaded.kind == "prompts")
        self.rows_caption.setText(f"First {len(loaded.rows)} valid rows" if loaded.rows else "No valid rows")
        self.column_plan.setText("Columns: " + "; ".join(f"{column}: {use}" for column, use in loaded.column_plan()))
        if loaded.errors:
            self.show_errors(loaded.errors)
            self.summary.setText(f"{self.path.name}: {loaded.fmt.upper() or 'unknown format'}, {kind}. "
                                 "Fix the problems below to import it.")
        else:
            self.summary.setText(f"{self.path.name}: {loaded.fmt.upper()}, {kind}. No problems found.")
            self.summary.setStyleSheet(f"color: {OK};")
            self.import_button.setEnabled(True)

    def _on_preview_error(self, exc: BaseException) -> None:
        self._checked = True
        self.busy.setVisible(False)
        self.summary.setText(f"Cannot read {self.path.name}")
        self.errors_caption.setText(describe_error(exc))
        self.errors_box.setVisible(True)

    def show_errors(self, errors: list) -> None:
        total = len(errors)
        shown = errors[:MAX_ERRORS_SHOWN]
        self.errors.setRowCount(len(shown))
        for r, error in enumerate(shown):
            for c, value in enumerate(("" if error.row is None else str(error.row),
                                       error.field or "", error.message)):
                item = QTableWidgetItem(value)
                item.setToolTip(str(error))
                self.errors.setItem(r, c, item)
        self.errors.resizeColumnToContents(0)
        self.errors.resizeColumnToContents(1)
        more = f" (the first {len(shown)} are listed)" if total > len(shown) else ""
        self.errors_caption.setText(f"{total} problem{'s' if total != 1 else ''} found{more}. "
                                    "Nothing will be imported until the file is fixed.")
        self.errors_box.setVisible(True)
        self.import_button.setEnabled(False)

    def start_import(self) -> None:
        if self.loaded is None or self.loaded.errors:
            return
        self.import_button.setEnabled(False)
        self.busy.setVisible(True)
        self.summary.setText(f"Importing {self.path.name}…")
        self._job = run_in_background(
            _import_in_background, self.project_path, self.path, self.name.text().strip() or self.path.stem,
            self.loaded.kind, self.loaded.kind == "prompts" and self.as_eval.isChecked(),
            on_result=self._on_imported, on_error=self._on_import_error)

    def _on_imported(self, dataset_id: int) -> None:
        self.busy.setVisible(False)
        self.dataset_id = dataset_id
        self.imported.emit(dataset_id)
        self.accept()

    def _on_import_error(self, exc: BaseException) -> None:
        self.busy.setVisible(False)
        self.summary.setText(f"{self.path.name} was not imported")
        errors = getattr(exc, "errors", None)
        if errors:
            self.show_errors(errors)
        else:
            self.errors_caption.setText(describe_error(exc))
            self.errors_box.setVisible(True)


def _import_in_background(project_path: Path, path: Path, name: str, kind: str, as_eval: bool) -> int:
    from studio.core import datasets, store

    db = store.connect(project_path)  # this thread's own connection
    try:
        return datasets.import_file(db, path, name=name, kind=kind, as_eval=as_eval)
    finally:
        db.close()


# --- the panel --------------------------------------------------------------------------------

class DataPanel(QWidget):
    """Datasets of the open project, the rows of the selected one, and import."""

    datasets_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = None
        self.preview_dialog: ImportPreviewDialog | None = None

        outer = QVBoxLayout(self)
        outer.setContentsMargins(6, 6, 6, 6)
        self.stack = QStackedWidget()
        outer.addWidget(self.stack)

        self.no_project = EmptyState("fa6s.folder-open", "No project open",
                                     "Create or open a project to import data.")
        self.empty = EmptyState("fa6s.file-import", "No data yet",
                                "Import preference pairs to start a DPO run, or prompts for PPO "
                                "(JSONL, JSON, CSV or Parquet, in TRL's formats). You can also drop "
                                "a file on the window.", "Import data…")
        self.empty.button.clicked.connect(self.choose_file)
        self.stack.addWidget(self.no_project)
        self.stack.addWidget(self.empty)

        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(0, 0, 0, 0)
        toolbar = QHBoxLayout()
        title = bold(QLabel("Datasets"))
        toolbar.addWidget(title)
        toolbar.addStretch(1)
        self.import_button = QPushButton(icon("fa6s.file-import"), "Import…")
        self.import_button.setToolTip("Import prompts or preference pairs from a file")
        self.import_button.clicked.connect(self.choose_file)
        toolbar.addWidget(self.import_button)
        layout.addLayout(toolbar)

        splitter = QSplitter(Qt.Orientation.Vertical)
        self.datasets_model = DatasetsModel(self)
        self.datasets_model.eval_toggled.connect(self.set_eval)
        self.datasets_view = make_table(self.datasets_model, stretch_last=False)
        header = self.datasets_view.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in (1, 2, 3):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        self.datasets_view.setMinimumHeight(110)
        self.datasets_view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.datasets_view.selectionModel().currentRowChanged.connect(self._on_dataset_selected)
        splitter.addWidget(self.datasets_view)

        rows_box = QWidget()
        rows_layout = QVBoxLayout(rows_box)
        rows_layout.setContentsMargins(0, 4, 0, 0)
        search_row = QHBoxLayout()
        self.rows_title = bold(QLabel("Rows"))
        search_row.addWidget(self.rows_title)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search rows…")
        self.search.setClearButtonEnabled(True)
        self.search.addAction(icon("fa6s.magnifying-glass", "#9ca3af"), QLineEdit.ActionPosition.LeadingPosition)
        search_row.addWidget(self.search, 1)
        rows_layout.addLayout(search_row)
        self.rows_model = RowsModel(self)
        self.proxy = SearchProxy(self)
        self.proxy.setSourceModel(self.rows_model)
        self.search.textChanged.connect(self._on_search)
        self.rows_view = make_table(self.proxy)
        self.rows_view.setSortingEnabled(True)
        self.rows_view.sortByColumn(-1, Qt.SortOrder.AscendingOrder)
        rows_layout.addWidget(self.rows_view)
        self.rows_count = hint_label("")
        rows_layout.addWidget(self.rows_count)
        splitter.addWidget(rows_box)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([140, 400])
        layout.addWidget(splitter)
        self.stack.addWidget(content)
        self.content = content
        self.stack.setCurrentWidget(self.no_project)

    # --- project ---
    def set_project(self, project) -> None:
        self.project = project
        self.rows_model.set_rows("preference", [])
        self.refresh()

    def refresh(self) -> None:
        if self.project is None:
            self.datasets_model.set_records([])
            self.stack.setCurrentWidget(self.no_project)
            return
        from studio.core import store

        db = self.project.db
        eval_flags = store.eval_flags(db)
        rows = [{**d, "is_eval": eval_flags.get(d["id"], False)} for d in store.datasets(db)]
        selected = self.selected_dataset_id()
        self.datasets_model.set_records(rows)
        self.stack.setCurrentWidget(self.content if rows else self.empty)
        ids = [d["id"] for d in rows]
        if rows:
            self.select_dataset(selected if selected in ids else ids[-1])
        self.datasets_changed.emit()

    def selected_dataset_id(self) -> int | None:
        index = self.datasets_view.currentIndex()
        if not index.isValid() or index.row() >= len(self.datasets_model.records):
            return None
        return self.datasets_model.records[index.row()]["id"]

    def select_dataset(self, dataset_id: int) -> None:
        row = self.datasets_model.row_of(dataset_id)
        if row is not None:
            self.datasets_view.setCurrentIndex(self.datasets_model.index(row, 0))
            self._load_rows(self.datasets_model.records[row])

    def _on_dataset_selected(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if current.isValid():
            self._load_rows(self.datasets_model.records[current.row()])

    def _load_rows(self, dataset: dict) -> None:
        from studio.core import store

        if dataset["kind"] == "preference":
            rows = store.pairs(self.project.db, [dataset["id"]])
        else:
            rows = [r for r in store.prompts(self.project.db) if r["dataset_id"] == dataset["id"]]
        self.rows_model.set_rows(dataset["kind"], rows)
        self.rows_title.setText(dataset["name"])
        self._update_count()

    def _on_search(self, text: str) -> None:
        self.proxy.setFilterFixedString(text)
        self._update_count()

    def _update_count(self) -> None:
        total, shown = self.rows_model.rowCount(), self.proxy.rowCount()
        noun = "pairs" if self.rows_model.kind == "preference" else "prompts"
        self.rows_count.setText(f"{total:,} {noun}" if shown == total else f"{shown:,} of {total:,} {noun} match")

    def set_eval(self, dataset_id: int, is_eval: bool) -> None:
        """Mark a prompt dataset as evaluation prompts (or back to training prompts)."""
        if self.project is None:
            return
        from studio.core import store

        store.set_eval(self.project.db, dataset_id, is_eval)
        self.datasets_model.update_record(dataset_id, is_eval=is_eval)
        if self.rows_model.kind == "prompts" and self.selected_dataset_id() == dataset_id:
            for row in self.rows_model._rows:
                row["is_eval"] = int(is_eval)
        self.datasets_changed.emit()

    # --- import ---
    def choose_file(self) -> None:
        if self.project is None:
            show_message(self, "No project", "Create or open a project before importing data.", level="info")
            return
        path, _ = QFileDialog.getOpenFileName(self, "Import data", str(Path.home()), FILE_FILTER)
        if path:
            self.preview_file(Path(path))

    def preview_file(self, path: Path | str) -> ImportPreviewDialog | None:
        """Open the preview dialog for `path` (non-blocking); the import happens from there."""
        if self.project is None:
            show_message(self, "No project", "Create or open a project before importing data.", level="info")
            return None
        if self.preview_dialog is not None:
            self.preview_dialog.close()
            self.preview_dialog.deleteLater()
        dialog = ImportPreviewDialog(path, self.project.path, self)
        dialog.imported.connect(self._on_imported)
        self.preview_dialog = dialog
        dialog.open()
        return dialog

    def _on_imported(self, dataset_id: int) -> None:
        self.refresh()
        self.select_dataset(dataset_id)
