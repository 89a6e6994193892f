"""The studio window: QApplication, main window, menus, toolbar, docks, settings.

The window appears before torch is imported: ``studio.core.runs`` (torch, transformers) is imported
in a background job once the window is up (:func:`studio.ui.workers.load_engines`), and the run
setup panel fills in when it arrives.

Panels are laid out from one list, :meth:`MainWindow.panel_specs`: adding a dock or a centre tab is
one line there.
"""

from __future__ import annotations

import gc
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QSettings, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication, QDockWidget, QFileDialog, QLabel, QMainWindow, QMessageBox, QTabWidget, QToolBar,
    QWidget,
)

from studio.core import store

from .panels import MUTED, icon, show_message
from .panels.advisor import AdvisorPanel
from .panels.compare import ComparePanel
from .panels.data import DATA_SUFFIXES, DataPanel
from .panels.label import LabelPanel
from .panels.projects import NewProjectDialog, ProjectsPanel, default_projects_dir
from .panels.run_setup import RunSetupPanel
from .panels.runs import RunsPanel
from .pages import PageScroll
from .panels.walkthrough import WalkthroughPanel
from .reward_training import RewardTrainingActions
from .scale_out import ScaleOutActions, cuda_device_count
from .wheel import WheelGuard
from .workers import RunQueue, describe_error, load_engines, run_in_background, wait_for_background_jobs

try:
    from .panels.charts import ChartsPanel
except ImportError as exc:  # the charts panel is optional: the window works without it
    _CHARTS_IMPORT_ERROR = str(exc)
    ChartsPanel = None
else:
    _CHARTS_IMPORT_ERROR = ""

ORGANIZATION = "AlignmentStudio"
APPLICATION = "Alignment Studio"
LAYOUT_VERSION = 3  # bump when docks change: saved dock layouts of older versions are dropped
MAX_RECENT = 10
STYLE_SHEET = Path(__file__).resolve().parents[2] / "resources" / "style.qss"

AREAS = {"left": Qt.DockWidgetArea.LeftDockWidgetArea, "right": Qt.DockWidgetArea.RightDockWidgetArea,
         "bottom": Qt.DockWidgetArea.BottomDockWidgetArea, "top": Qt.DockWidgetArea.TopDockWidgetArea}
DOCK_SIZES = {"left": 370, "right": 410, "bottom": 290}
WIDE_LAYOUT = 1500  # px: narrower windows put the left docks in tabs beside run setup


@dataclass
class PanelSpec:
    """Where a panel goes. area: "centre" (a tab) or a dock area ("left", "right", "bottom", "top").

    project: what the panel's ``set_project`` receives when a project opens or closes: "project"
    (the ``store.Project``, whose connection belongs to the GUI thread), "path" (the folder, for
    panels that open their own connection), or "" (the panel has no ``set_project``).
    """

    key: str
    title: str
    widget: QWidget
    area: str
    project: str = "path"
    icon: str = ""


class _PlaceholderCharts(QWidget):
    """Stands in for the charts panel when it cannot be imported; counts points for tests."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from PySide6.QtWidgets import QVBoxLayout

        from .panels import EmptyState

        self.points: dict[int, int] = {}
        layout = QVBoxLayout(self)
        layout.addWidget(EmptyState("fa6s.chart-line", "Charts unavailable",
                                    f"The charts panel could not be loaded: {_CHARTS_IMPORT_ERROR}"))

    def set_project(self, project_path: Path | None) -> None:
        self.clear()

    def show_runs(self, run_ids: list[int]) -> None:
        pass

    def append_metrics(self, run_id: int, record: dict) -> None:
        self.points[run_id] = self.points.get(run_id, 0) + 1

    def clear(self) -> None:
        self.points.clear()


class MainWindow(QMainWindow):
    project_changed = Signal(object)  # store.Project or None
    engines_ready = Signal()

    def __init__(self, settings: QSettings | None = None, load_engines_now: bool = True) -> None:
        super().__init__()
        self.settings = settings if settings is not None else QSettings()
        self.project: store.Project | None = None
        self.engines: dict | None = None
        self.device: tuple[str, str] | None = None
        self._closing = False
        self.setWindowTitle(APPLICATION)
        self.setWindowIcon(icon("fa6s.scale-balanced", "#2f6fde"))
        self.setDockNestingEnabled(True)
        self.setAcceptDrops(True)

        self.wheel_guard = WheelGuard(self)  # the wheel scrolls the page over unfocused values and charts
        QApplication.instance().installEventFilter(self.wheel_guard)
        self.queue = RunQueue(self)
        self.backup_timer = QTimer(self)  # the open project's daily backup, looked at hourly
        self.backup_timer.timeout.connect(self.backup_daily)
        self.backup_timer.start(3600 * 1000)
        self.projects_panel = ProjectsPanel()
        self.data_panel = DataPanel()
        self.run_setup = RunSetupPanel()
        self.runs_panel = RunsPanel(self.queue)
        self.charts = ChartsPanel() if ChartsPanel is not None else _PlaceholderCharts()
        self.compare_panel = ComparePanel()
        self.label_panel = LabelPanel()
        self.advisor_panel = AdvisorPanel()
        self.walkthrough_panel = WalkthroughPanel()

        self.docks: dict[str, QDockWidget] = {}
        self._specs: list[PanelSpec] = []
        self.centre = QTabWidget()
        self.centre.setDocumentMode(True)
        self.setCentralWidget(self.centre)
        for spec in self.panel_specs():
            self._place(spec)
        self.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.BottomDockWidgetArea)

        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self._build_status_bar()
        self._connect()
        self.apply_default_layout()
        self._restore_window()
        self._update_actions()
        self._update_status()
        self._after_first_paint = [self.load_engines] if load_engines_now else []  # see paintEvent

    # --- layout: the one place panels are listed ---------------------------------------------
    def panel_specs(self) -> list[PanelSpec]:
        """Every panel and where it goes. Add a dock or a centre tab with one line here."""
        return [
            PanelSpec("charts", "Charts", self.charts, "centre", "path", "fa6s.chart-line"),
            PanelSpec("compare", "Compare", self.compare_panel, "centre", "path", "fa6s.table-columns"),
            PanelSpec("label", "Label", self.label_panel, "centre", "path", "fa6s.tags"),
            PanelSpec("advisor", "Stage advisor", self.advisor_panel, "centre", "path", "fa6s.signs-post"),
            PanelSpec("walkthrough", "Walkthrough", self.walkthrough_panel, "centre", "path", "fa6s.list-ol"),
            PanelSpec("projects", "Project", self.projects_panel, "left", "project", "fa6s.folder"),
            PanelSpec("data", "Data", self.data_panel, "left", "project", "fa6s.database"),
            PanelSpec("run_setup", "Run setup", self.run_setup, "right", "project", "fa6s.sliders"),
            PanelSpec("runs", "Runs", self.runs_panel, "bottom", "project", "fa6s.list-check"),
        ]

    def _place(self, spec: PanelSpec) -> None:
        self._specs.append(spec)
        if spec.area == "centre":
            # A scroll area per tab: a wide panel scrolls instead of squeezing the docks beside it.
            scroll = PageScroll(spec.widget)
            self.centre.addTab(scroll, icon(spec.icon) if spec.icon else icon(""), spec.title)
            self.centre.tabBar().setVisible(self.centre.count() > 1)
            return
        dock = QDockWidget(spec.title, self)
        dock.setObjectName(f"dock_{spec.key}")  # saveState needs names
        dock.setWidget(spec.widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.addDockWidget(AREAS[spec.area], dock)
        self.docks[spec.key] = dock

    def apply_default_layout(self) -> None:
        """Left: project over data; centre: charts; right: run setup; bottom: runs and log.

        A window narrower than WIDE_LAYOUT px puts project and data in tabs beside run setup, so the
        centre keeps room for compare and label; a low one gets a lower runs dock.
        """
        size, narrow = self.size(), self.width() < WIDE_LAYOUT
        by_area: dict[str, list[QDockWidget]] = {}
        for dock in self.docks.values():  # all out first: tabs of a previous layout must not survive
            dock.setFloating(False)
            self.removeDockWidget(dock)
        for spec in self._specs:
            if spec.area in AREAS:
                area = "right" if narrow and spec.area == "left" else spec.area
                dock = self.docks[spec.key]
                self.addDockWidget(AREAS[area], dock)
                dock.show()
                by_area.setdefault(area, []).append(dock)
        for area, docks in by_area.items():
            if narrow and area == "right":
                for dock in docks[1:]:
                    self.tabifyDockWidget(docks[0], dock)
                self.docks["run_setup"].raise_()
                self.resize(size)  # the docks were stacked for a moment: the window grew to hold them
                continue
            orientation = Qt.Orientation.Horizontal if area in ("top", "bottom") else Qt.Orientation.Vertical
            for previous, dock in zip(docks, docks[1:]):
                self.splitDockWidget(previous, dock, orientation)
        width = [d for a in ("left", "right") for d in by_area.get(a, [])[:1]]
        self.resizeDocks(width, [DOCK_SIZES[a] for a in ("left", "right") if by_area.get(a)],
                         Qt.Orientation.Horizontal)
        if by_area.get("bottom"):
            height = min(DOCK_SIZES["bottom"], int(self.height() * 0.3))
            self.resizeDocks(by_area["bottom"][:1], [height], Qt.Orientation.Vertical)
        left = by_area.get("left", [])
        if len(left) == 2:
            self.resizeDocks(left, [340, 560], Qt.Orientation.Vertical)

    def reset_layout(self) -> None:
        self.apply_default_layout()
        self.statusBar().showMessage("Layout reset", 3000)

    # --- actions, menus, toolbar, status bar -------------------------------------------------
    def _action(self, text: str, slot, icon_name: str = "", shortcut=None, tip: str = "") -> QAction:
        action = QAction(icon(icon_name) if icon_name else icon(""), text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip)
        action.triggered.connect(lambda _checked=False: slot())
        return action

    def _build_actions(self) -> None:
        a = self._action
        self.new_project_action = a("&New Project…", self.new_project_dialog, "fa6s.folder-plus",
                                    QKeySequence.StandardKey.New, "Create a project folder")
        self.open_project_action = a("&Open Project…", self.open_project_dialog, "fa6s.folder-open",
                                     QKeySequence.StandardKey.Open, "Open a project folder")
        self.import_action = a("&Import Data…", self.data_panel.choose_file, "fa6s.file-import", "Ctrl+I",
                               "Import prompts or preference pairs (JSONL, JSON, CSV, Parquet)")
        self.export_action = a("&Export Labelled Pairs…", self.export_labelled_pairs, "fa6s.file-export", None,
                               "Write the pairs made from your labels as TRL preference JSONL")
        self.export_gguf_action = a("Export Checkpoint as &GGUF…", self.export_gguf, "fa6s.file-export", None,
                                    "The merged model as a GGUF file for llama.cpp and Ollama, with a model card")
        self.check_action = a("&Check Project…", self.check_project, "fa6s.stethoscope", None,
                              "Check the whole database and every checkpoint's files (as `studio check`)")
        self.quit_action = a("&Quit", self.close, "fa6s.right-from-bracket", QKeySequence.StandardKey.Quit)
        self.new_dpo_action = a("New &DPO Run", lambda: self.new_run("dpo"), "fa6s.scale-balanced", "Ctrl+D",
                                "Configure a DPO run: learn from preference pairs")
        self.new_ppo_action = a("New &PPO Run", lambda: self.new_run("ppo"), "fa6s.wand-magic-sparkles", "Ctrl+P",
                                "Configure a PPO run: learn from reward signals")
        self.start_action = a("&Start", self.runs_panel.start_selected, "fa6s.play", "F5",
                              "Queue the selected runs (resume stopped ones)")
        self.pause_action = a("P&ause", self.runs_panel.pause, "fa6s.pause", "F6", "Pause after this step")
        self.resume_action = a("&Resume", self.runs_panel.resume, "fa6s.forward-step", "F7", "Resume the paused run")
        self.stop_action = a("S&top", self.runs_panel.stop, "fa6s.stop", "Shift+F5",
                             "Stop after this step (a checkpoint is saved)")
        self.stop_now_action = a("Stop &Now", self.runs_panel.stop_now, "fa6s.power-off", "Ctrl+Shift+F5",
                                 "End the run now, in any phase; it resumes from its last checkpoint")
        self.reset_layout_action = a("Reset &Layout", self.reset_layout, "fa6s.rotate-left")
        self.about_action = a("&About Alignment Studio", self.about, "fa6s.circle-info")

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addActions([self.new_project_action, self.open_project_action])
        self.recent_menu = file_menu.addMenu(icon("fa6s.clock"), "Recent &Projects")
        file_menu.addSeparator()
        file_menu.addActions([self.import_action, self.export_action, self.export_gguf_action])
        file_menu.addSeparator()
        file_menu.addAction(self.check_action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)
        run_menu = bar.addMenu("&Run")
        run_menu.addActions([self.new_dpo_action, self.new_ppo_action])
        run_menu.addSeparator()
        run_menu.addActions([self.start_action, self.pause_action, self.resume_action, self.stop_action,
                             self.stop_now_action])
        run_menu.addSeparator()
        self.scale_out = ScaleOutActions(self)  # bundle / import / follow / launch on N GPUs
        run_menu.addMenu(self.scale_out.menu)
        run_menu.addSeparator()
        self.reward_training = RewardTrainingActions(self)  # a trained_reward_model source from the labels
        run_menu.addActions([self.reward_training.train_action, self.reward_training.stop_action])
        self.view_menu = bar.addMenu("&View")
        for dock in self.docks.values():
            self.view_menu.addAction(dock.toggleViewAction())
        self.view_menu.addSeparator()
        self.view_menu.addAction(self.reset_layout_action)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self.about_action)
        self._rebuild_recent_menu()

    def _build_toolbar(self) -> None:
        toolbar = QToolBar("Main toolbar")
        toolbar.setObjectName("main_toolbar")
        toolbar.setIconSize(QSize(16, 16))
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        toolbar.setMovable(False)
        self.addToolBar(Qt.ToolBarArea.TopToolBarArea, toolbar)
        toolbar.addActions([self.new_project_action, self.open_project_action, self.import_action])
        toolbar.addSeparator()
        toolbar.addActions([self.new_dpo_action, self.new_ppo_action])
        toolbar.addSeparator()
        toolbar.addActions([self.start_action, self.pause_action, self.resume_action, self.stop_action])
        self.toolbar = toolbar

    def _build_status_bar(self) -> None:
        status = self.statusBar()
        self.project_label = QLabel()
        self.run_label = QLabel()
        self.device_label = QLabel("Device: detecting…")
        self.device_label.setToolTip("The device and dtype training will use (auto: CUDA with bf16, then MPS, then CPU)")
        for label in (self.project_label, self.run_label):
            label.setContentsMargins(6, 0, 6, 0)
        self.device_label.setContentsMargins(6, 0, 6, 0)
        status.addWidget(self.project_label)
        status.addWidget(self.run_label, 1)
        status.addPermanentWidget(self.device_label)

    def _connect(self) -> None:
        q = self.queue
        q.metrics.connect(self._on_metrics)
        q.started.connect(self._on_run_started)
        q.failed.connect(self._on_run_failed)
        q.finished.connect(self._on_run_finished)
        for signal in (q.paused, q.resumed, q.queue_changed, q.idle, q.cancelled):
            signal.connect(lambda *_args: (self._update_actions(), self._update_status()))
        self.projects_panel.open_requested.connect(self.open_project)
        self.projects_panel.new_requested.connect(self.new_project_dialog)
        self.projects_panel.browse_requested.connect(self.open_project_dialog)
        self.projects_panel.settings_changed.connect(lambda _key: self._update_status())
        self.data_panel.datasets_changed.connect(self.run_setup.refresh_hint)
        self.run_setup.run_created.connect(self._on_run_created)
        self.runs_panel.selection_changed.connect(self._on_runs_selected)
        self.runs_panel.controls_changed.connect(lambda: (self._update_actions(), self._update_status()))
        self.runs_panel.best_kept.connect(lambda _run, checkpoint: self.run_setup.set_start_checkpoint(checkpoint))
        self.label_panel.labels_changed.connect(self.run_setup.refresh_hint)  # labels are DPO pairs
        self.advisor_panel.label_requested.connect(self.label_comparisons)
        self.advisor_panel.run_created.connect(self._on_run_created)
        self.advisor_panel.trial_created.connect(self._on_trial_created)

    # --- engines (torch) in the background --------------------------------------------------
    def paintEvent(self, event) -> None:
        super().paintEvent(event)
        # Loading engines or a project starts threads that import torch; before this paint they
        # would hold the GIL the first paint needs.
        pending, self._after_first_paint = self._after_first_paint, None
        for action in pending or ():
            QTimer.singleShot(0, action)

    def after_first_paint(self, action) -> None:
        """Run `action` once the window has painted (at once if it has)."""
        if self._after_first_paint is None:
            QTimer.singleShot(0, action)
        else:
            self._after_first_paint.append(action)

    def load_engines(self) -> None:
        self._engines_job = run_in_background(load_engines, on_result=self._on_engines,
                                              on_error=self._on_engines_error)

    def _on_engines(self, result: dict) -> None:
        # torch and transformers are imported now: move their objects out of the garbage collector's
        # reach, or a full collection in the training thread holds the GIL for 100-300 ms.
        gc.freeze()
        self.engines = result
        self.device = tuple(result["device"])
        device, dtype = self.device
        self.device_label.setText(f"Training on {device} · {dtype}")
        self.run_setup.set_engines(result["engines"], result["train_fields"], result["rewards"])
        self.run_setup.set_project(self.project)
        self.scale_out.show_gpu_launch(cuda_device_count())
        self._update_actions()
        self.engines_ready.emit()

    def _on_engines_error(self, exc: BaseException) -> None:
        self.device_label.setText("Device: unknown")
        self.run_setup.set_loading_error(describe_error(exc))

    # --- projects ------------------------------------------------------------------------------
    def new_project_dialog(self) -> None:
        dialog = NewProjectDialog(self)
        dialog.accepted.connect(lambda: self.create_project(*dialog.values()))
        dialog.finished.connect(dialog.deleteLater)
        dialog.open()

    def open_project_dialog(self) -> None:
        start = str(self.project.path.parent if self.project else default_projects_dir())
        path = QFileDialog.getExistingDirectory(self, "Open project folder", start)
        if path:
            self.open_project(Path(path))

    def create_project(self, path: Path | str, name: str | None = None, base_model: dict | None = None) -> bool:
        if not self._can_switch_project():
            return False
        try:
            project = store.Project.create(Path(path), name=name or None, base_model=base_model)
        except (store.ProjectError, OSError) as exc:
            show_message(self, "Cannot create the project", describe_error(exc))
            return False
        self._set_project(project)
        return True

    def open_project(self, path: Path | str) -> bool:
        path = Path(path).expanduser()
        if self.project is not None and self.project.path == path.resolve():
            return True
        if not self._can_switch_project():
            return False
        try:
            project = store.Project.open(path)
        except store.ProjectError as exc:
            if not (path / store.DB_NAME).exists():
                self._remember(path, forget=True)
            show_message(self, "Cannot open the project", describe_error(exc))
            return False
        self._set_project(project)
        return True

    def close_project(self) -> bool:
        if self.project is None:
            return True
        if not self._can_switch_project():
            return False
        self._set_project(None)
        return True

    def _can_switch_project(self) -> bool:
        if self.queue.busy:
            show_message(self, "A run is in progress",
                         "Stop the running and queued runs before switching projects.", level="info")
            return False
        return True

    def _set_project(self, project: store.Project | None) -> None:
        old = self.project
        self.project = project
        self.queue.set_project(project.path if project else None)
        for spec in self._specs:
            setter = getattr(spec.widget, "set_project", None)
            if setter is None or not spec.project:
                continue
            setter(project if spec.project == "project" else (project.path if project else None))
        if old is not None:
            old.close()  # after the panels let go of it
        if project is not None:
            self._remember(project.path)
            self.settings.setValue("projects/last", str(project.path))
            self.backup_daily()
        self._update_actions()
        self._update_status()
        self.project_changed.emit(project)

    def backup_daily(self) -> None:
        """A rotating backup of the open project once a day (SQLite's online backup: fast, safe while open)."""
        if self.project is None:
            return
        try:
            made = store.daily_backup(self.project)
        except (OSError, sqlite3.Error) as exc:
            self.statusBar().showMessage(f"The daily backup failed: {describe_error(exc)}", 10_000)
            return
        if made is not None:
            self.statusBar().showMessage(f"Backed up the project to {made}", 5_000)

    def check_project(self):
        """The full integrity check of the open project, in the background; the result in a message."""
        if self.project is None:
            return None
        from studio.core.health import check_project

        self.statusBar().showMessage("Checking the project…")
        return run_in_background(check_project, self.project.path, on_result=self._project_checked,
                                 on_error=lambda exc: show_message(self, "Check failed", describe_error(exc)))

    def _project_checked(self, problems: list[str]) -> None:
        self.statusBar().clearMessage()
        if problems:
            show_message(self, "The project has problems", f"{len(problems)} problem(s) found.",
                         details="\n".join(problems))
        else:
            show_message(self, "Project checked", "The database and every checkpoint's files are whole.", level="info")

    def project_name(self) -> str:
        if self.project is None:
            return ""
        return store.get_setting(self.project.db, "name", self.project.path.name)

    # --- recent projects ---
    def recent_projects(self) -> list[str]:
        value = self.settings.value("projects/recent", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or [])]

    def last_project(self) -> Path | None:
        last = self.settings.value("projects/last", "")
        return Path(last) if last and (Path(last) / store.DB_NAME).exists() else None

    def _remember(self, path: Path, forget: bool = False) -> None:
        path_text = str(Path(path).resolve() if Path(path).exists() else path)
        recent = [p for p in self.recent_projects() if p != path_text]
        if not forget:
            recent.insert(0, path_text)
        self.settings.setValue("projects/recent", recent[:MAX_RECENT])
        self._rebuild_recent_menu()

    def _rebuild_recent_menu(self) -> None:
        recent = self.recent_projects()
        self.recent_menu.clear()
        for path in recent:
            action = self.recent_menu.addAction(icon("fa6s.folder", MUTED), f"{Path(path).name}   —   {path}")
            action.triggered.connect(lambda _c=False, p=path: self.open_project(Path(p)))
        if not recent:
            self.recent_menu.addAction("No recent projects").setEnabled(False)
        self.projects_panel.set_recent(recent)

    # --- data ----------------------------------------------------------------------------------
    def export_labelled_pairs(self, path: Path | str | None = None) -> int:
        if self.project is None:
            return 0
        records = store.labelled_pairs(self.project.db)
        if not records:
            show_message(self, "Nothing to export", "No labelled pairs yet: label some comparisons first "
                         "(a label of A or B makes a pair).", level="info")
            return 0
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(self, "Export labelled pairs",
                                                    str(self.project.exports_dir / "labelled_pairs.jsonl"),
                                                    "JSON Lines (*.jsonl)")
            if not chosen:
                return 0
            path = chosen
        from studio.core import datasets

        try:
            count = datasets.export_preference_jsonl(records, path)
        except (OSError, ValueError) as exc:
            show_message(self, "Export failed", describe_error(exc))
            return 0
        self.statusBar().showMessage(f"Exported {count} labelled pairs to {path}", 8000)
        return count

    def export_gguf(self, checkpoint_id: int | None = None, folder: Path | str | None = None):
        """Ask for a checkpoint and a folder (unless given), then convert in the background."""
        if self.project is None:
            return None
        db = self.project.db
        labels = {c["id"]: f"{store.get_run(db, c['run_id'])['name']}, step {c['step']} (checkpoint {c['id']})"
                  for c in reversed(store.checkpoints(db))}
        if not labels:
            show_message(self, "Nothing to export", "No checkpoints yet: train a run first.", level="info")
            return None
        if checkpoint_id is None:
            from PySide6.QtWidgets import QInputDialog

            label, ok = QInputDialog.getItem(self, "Export as GGUF", "Checkpoint:", list(labels.values()), 0, False)
            if not ok:
                return None
            checkpoint_id = next(i for i, text in labels.items() if text == label)
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Folder for the GGUF export", str(self.project.exports_dir))
            if not folder:
                return None
            folder = Path(folder) / f"checkpoint-{checkpoint_id}-gguf"
        from studio.core.export import export_gguf_in_project

        self.statusBar().showMessage(f"Exporting checkpoint {checkpoint_id} as GGUF…")
        return run_in_background(export_gguf_in_project, self.project.path, checkpoint_id, folder,
                                 on_result=self._gguf_exported, on_error=self._gguf_failed)

    def _gguf_exported(self, path: Path) -> None:
        self.statusBar().showMessage(f"GGUF written to {path}, with a Modelfile and README.md beside it", 10000)

    def _gguf_failed(self, exc: BaseException) -> None:
        self.statusBar().clearMessage()
        show_message(self, "GGUF export failed", describe_error(exc))

    def dragEnterEvent(self, event) -> None:
        if self._dropped_file(event.mimeData()) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        path = self._dropped_file(event.mimeData())
        if path is None:
            event.ignore()
            return
        event.acceptProposedAction()
        self.import_file(path)

    def import_file(self, path: Path | str):
        """Open the import preview for a file (drag and drop lands here)."""
        self.docks["data"].show()
        self.docks["data"].raise_()
        return self.data_panel.preview_file(Path(path))

    @staticmethod
    def _dropped_file(mime) -> Path | None:
        if not mime.hasUrls():
            return None
        for url in mime.urls():
            if url.isLocalFile() and Path(url.toLocalFile()).suffix.lower() in DATA_SUFFIXES:
                return Path(url.toLocalFile())
        return None

    # --- runs ----------------------------------------------------------------------------------
    def new_run(self, method: str) -> None:
        dock = self.docks["run_setup"]
        dock.show()
        dock.raise_()
        self.run_setup.select_method(method)
        self.run_setup.run_name.setFocus()

    def _on_run_created(self, run_id: int) -> None:
        self.runs_panel.refresh()
        self.runs_panel.start(run_id)
        if not self.runs_panel.selected_run_ids():
            self.runs_panel.select_runs([run_id])
        self.docks["runs"].raise_()

    def _on_trial_created(self, shaping_run_id: int, dpo_run_id: int) -> None:
        """A quick trial, shaping (PPO, GRPO or RLOO) vs DPO: queue both and overlay them in the charts."""
        self._on_run_created(shaping_run_id)
        self._on_run_created(dpo_run_id)
        self.runs_panel.select_runs([shaping_run_id, dpo_run_id])
        self.show_tab(self.charts)

    def show_tab(self, panel: QWidget) -> None:
        for index in range(self.centre.count()):
            if self.centre.widget(index).widget() is panel:
                self.centre.setCurrentIndex(index)

    def label_comparisons(self, comparison_ids: list) -> None:
        self.show_tab(self.label_panel)
        self.label_panel.start_session(list(comparison_ids))

    def _on_runs_selected(self, run_ids: list) -> None:
        self.charts.show_runs(list(run_ids))
        self._update_actions()

    def _on_metrics(self, run_id: int, record: dict) -> None:
        self.charts.append_metrics(run_id, record)

    def _on_run_started(self, run_id: int) -> None:
        if len(self.runs_panel.selected_run_ids()) <= 1:
            self.runs_panel.select_runs([run_id])  # follow the live run, unless runs are being compared
        self._update_actions()
        self._update_status()

    def _on_run_finished(self, run_id: int, status: str) -> None:
        self._refresh_model_state_views()
        self._update_actions()
        self._update_status()
        self.statusBar().showMessage(f"{self._run_name(run_id)} {status}", 8000)

    def _on_run_failed(self, run_id: int, message: str) -> None:
        self._refresh_model_state_views()
        self._update_actions()
        self._update_status()
        if not self._closing:
            show_message(self, f"{self._run_name(run_id)} failed", message, level="error")

    def _refresh_model_state_views(self) -> None:
        """New checkpoints exist: every view that lists model states reloads them."""
        self.run_setup.refresh_checkpoints()
        self.compare_panel.refresh()
        self.label_panel.refresh_sources()
        self.advisor_panel.refresh()

    def _run_name(self, run_id: int) -> str:
        run = self.runs_panel.model.record(run_id)
        return run["name"] if run else f"Run {run_id}"

    def _update_actions(self) -> None:
        has_project = self.project is not None
        for action in (self.import_action, self.export_action, self.new_dpo_action, self.new_ppo_action):
            action.setEnabled(has_project)
        panel = self.runs_panel
        panel.update_buttons()
        self.start_action.setEnabled(panel.start_button.isEnabled())
        self.pause_action.setEnabled(panel.pause_button.isEnabled())
        self.resume_action.setEnabled(panel.resume_button.isEnabled())
        self.stop_action.setEnabled(panel.stop_button.isEnabled())
        self.stop_now_action.setEnabled(panel.stop_now_button.isEnabled())
        self.scale_out.update_enabled()
        self.reward_training.update_enabled()

    def _update_status(self) -> None:
        if self.project is None:
            self.project_label.setText("No project open")
            self.setWindowTitle(APPLICATION)
        else:
            name = self.project_name()
            self.project_label.setText(f"Project: <b>{name}</b>")
            self.project_label.setToolTip(str(self.project.path))
            self.setWindowTitle(f"{name} — {APPLICATION}")
        current = self.queue.current
        if current is None:
            waiting = len(self.queue.queued)
            self.run_label.setText(f"{waiting} run(s) waiting" if waiting else "Idle")
        else:
            run = self.runs_panel.model.record(current) or {}
            state = run.get("display_status") or ("paused" if self.queue.is_paused else "running")
            waiting = len(self.queue.queued)
            more = f", {waiting} waiting" if waiting else ""
            phase = f" · {run['phase']}" if run.get("phase") else ""
            self.run_label.setText(f"{self._run_name(current)} {state}{phase}{more}")

    # --- settings, closing --------------------------------------------------------------------
    def _restore_window(self) -> None:
        geometry = self.settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            screen = QApplication.primaryScreen()
            available = screen.availableGeometry() if screen else None
            if available is not None and available.width() > 200:
                self.resize(min(1600, int(available.width() * 0.9)), min(1000, int(available.height() * 0.9)))
            else:
                self.resize(1440, 900)
            self.apply_default_layout()
        version = self.settings.value("window/layout_version")
        state = self.settings.value("window/state")
        if state is not None and str(version) == str(LAYOUT_VERSION):
            self.restoreState(state, LAYOUT_VERSION)

    def save_window(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState(LAYOUT_VERSION))
        self.settings.setValue("window/layout_version", LAYOUT_VERSION)
        self.settings.sync()

    def confirm(self, title: str, text: str) -> bool:
        """Ask a yes/no question (tests replace this method)."""
        answer = QMessageBox.question(self, title, text, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def ask_stop_strength(self) -> str | None:
        """Quitting during a run: "step" (stop after this step), "now" (end it now), or None (stay).
        Tests replace this method."""
        box = QMessageBox(QMessageBox.Icon.Question, "Stop training and quit?",
                          "A run is in progress. Stop it after the current step (a checkpoint is saved), or "
                          "end it now (it resumes from its last checkpoint)?", parent=self)
        after_step = box.addButton("Stop after this step", QMessageBox.ButtonRole.AcceptRole)
        now = box.addButton("Stop now", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(after_step)
        box.exec()
        return {after_step: "step", now: "now"}.get(box.clickedButton())

    def closeEvent(self, event) -> None:
        if self.queue.busy:
            strength = "now" if self._closing else None
            if not self._closing:
                strength = self.ask_stop_strength()
                if strength is None:
                    event.ignore()
                    return
                self._closing = True
                self.queue.idle.connect(self._close_when_idle)
                for dock in self.docks.values():
                    dock.widget().setEnabled(False)
                self.toolbar.setEnabled(False)
                self.statusBar().showMessage("Stopping the run now…" if strength == "now" else
                                             "Stopping the run after this step and saving a checkpoint… "
                                             "(Quit again to stop it now)")
            self.queue.stop_all(now=strength == "now")
            event.ignore()
            return
        self.save_window()
        self.compare_panel.cancel_generation()
        self.label_panel.stop_batch()
        if self.project is not None:
            self._set_project(None)
        event.accept()

    def _close_when_idle(self) -> None:
        QTimer.singleShot(0, self.close)

    def about(self) -> None:
        show_message(self, "About Alignment Studio",
                     "Alignment Studio\n\nAlign a causal language model on your own workstation: shape it "
                     "with PPO, settle it with DPO, with LoRA adapters, live charts and checkpoints you "
                     "can compare.", level="info")


def apply_style(app: QApplication) -> None:
    app.setStyle("Fusion")
    font = app.font()
    if font.pointSizeF() < 10:
        font.setPointSizeF(10)
        app.setFont(font)
    if STYLE_SHEET.exists():
        app.setStyleSheet(STYLE_SHEET.read_text(encoding="utf-8"))


def main(project_path: Path | str | None = None, demo: bool = False) -> int:
    """Show the window (fast: torch is imported after it appears) and open a project."""
    app = QApplication.instance() or QApplication(sys.argv)
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName(APPLICATION)
    apply_style(app)
    if demo and project_path is None:
        from studio.core.demo import ensure_demo_project

        project_path = ensure_demo_project()
    window = MainWindow()
    window.show()
    target = Path(project_path) if project_path else window.last_project()
    if target is not None:
        window.after_first_paint(lambda: window.open_project(target))
    code = app.exec()
    wait_for_background_jobs(5000)
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
