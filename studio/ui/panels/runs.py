"""The runs panel: every run of the project, run controls, the queue, progress, log, config diff.

It drives a :class:`studio.ui.workers.RunQueue` (given to it) and listens to its signals; the
window connects the same queue to the charts. Selecting runs emits ``selection_changed`` with their
ids (the window overlays them in the charts); selecting exactly two shows their config differences.
"""

from __future__ import annotations

import json
import time
from typing import Any

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, Qt, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel, QListWidget, QListWidgetItem,
    QPlainTextEdit, QProgressBar, QPushButton, QSplitter, QStackedWidget, QTableView, QTableWidget,
    QTableWidgetItem, QTabWidget, QToolButton, QVBoxLayout, QWidget,
)

from studio.core.progress import ProgressMeter, format_duration

from . import DANGER, MUTED, OK, WARNING, EmptyState, RecordsTableModel, hint_label, icon

_Index = QModelIndex | QPersistentModelIndex

# Shown in the "Last metrics" column when present, in this order (TRL's names).
HEADLINE_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "objective/rlhf_reward",
                    "objective/scores", "objective/kl", "policy/approxkl_avg", "reward", "kl")
NOT_A_METRIC = ("step", "time", "step_seconds")

STATUS_STYLE = {  # status -> (icon, colour)
    "queued": ("fa6s.hourglass-half", MUTED), "waiting": ("fa6s.hourglass-half", MUTED),
    "starting": ("fa6s.circle-notch", "#2f6fde"), "running": ("fa6s.circle-play", "#2f6fde"),
    "pausing…": ("fa6s.circle-pause", WARNING), "paused": ("fa6s.circle-pause", WARNING),
    "stopping…": ("fa6s.circle-stop", WARNING), "stopped": ("fa6s.circle-stop", MUTED),
    "completed": ("fa6s.circle-check", OK), "failed": ("fa6s.circle-xmark", DANGER),
    "interrupted": ("fa6s.triangle-exclamation", WARNING), "not started": ("fa6s.clock", MUTED),
}


def headline(values: dict[str, float], limit: int = 3) -> str:
    names = [n for n in HEADLINE_METRICS if n in values]
    names += sorted(n for n in values if n not in names and n not in NOT_A_METRIC)
    return " · ".join(f"{n} {values[n]:.4g}" for n in names[:limit])


def higher_is_better(metric: str) -> bool:
    """A default for the keep-best direction; the user can change it."""
    lower = ("loss", "kl", "entropy", "perplexity", "seconds", "clipfrac")
    return not any(word in metric for word in lower) or any(
        word in metric for word in ("reward", "accurac", "margin", "score"))


def best_checkpoint(checkpoints: list[dict], steps: list[int], values: list[float],
                    higher: bool) -> tuple[dict, float] | None:
    """The checkpoint whose step has the best value of a metric (the last value at or before it)."""
    best: tuple[dict, float] | None = None
    for checkpoint in checkpoints:
        value = None
        for step, v in zip(steps, values):
            if step <= checkpoint["step"]:
                value = v
            else:
                break
        if value is None or value != value:  # no value yet, or NaN
            continue
        if best is None or (value > best[1] if higher else value < best[1]):
            best = (checkpoint, value)
    return best


def config_diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """(setting, value in a, value in b) for every setting that differs, sorted by name."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "—"), b.get(key, "—")
        if json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True, default=str):
            out.append((key, va, vb))
    return out


def tokens_per_second(record: dict) -> float | None:
    for key, value in record.items():
        k = key.lower()
        if "token" in k and ("per_s" in k or "/s" in k or "per_second" in k or "throughput" in k):
            return float(value)
    for key in ("tokens", "num_tokens", "objective/num_tokens"):
        if key in record and record.get("step_seconds"):
            return float(record[key]) / float(record["step_seconds"])
    return None


class RunsTableModel(RecordsTableModel):
    COLUMNS = ("Run", "Method", "Status", "Steps", "Last metrics", "Started")

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        run, column = self.records[index.row()], index.column()
        status = run["display_status"]
        if role == Qt.ItemDataRole.DisplayRole:
            if column == 0:
                return run["name"]
            if column == 1:
                return run["method"].upper()
            if column == 2:
                return status
            if column == 3:
                return f"{run['step']:,} / {run['max_steps']:,}" if run["max_steps"] else f"{run['step']:,}"
            if column == 4:  # a long phase (model load, reference pass, eval samples) while it lasts
                return run.get("phase") or headline(run["last"]) or "—"
            if column == 5:
                started = run.get("started_at")
                return time.strftime("%d %b %H:%M", time.localtime(started)) if started else "—"
        if role == Qt.ItemDataRole.DecorationRole and column == 2:
            name, colour = STATUS_STYLE.get(status, ("fa6s.circle-info", MUTED))
            return icon(name, colour)
        if role == Qt.ItemDataRole.ForegroundRole and column == 2 and status in STATUS_STYLE:
            return QColor(STATUS_STYLE[status][1])
        if role == Qt.ItemDataRole.ToolTipRole:
            if column == 2 and run.get("error"):
                return run["error"]
            if column == 4 and run["last"]:
                return "\n".join(f"{k}: {v:.6g}" for k, v in sorted(run["last"].items()))
            if column == 0:
                return f"Run {run['id']}" + (f", from checkpoint {run['parent_checkpoint_id']}"
                                             if run.get("parent_checkpoint_id") else "")
        if role == Qt.ItemDataRole.FontRole and column == 0 and status in ("running", "paused", "starting"):
            font = QFont()
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.TextAlignmentRole and column == 3:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class RunsPanel(QWidget):
    """Runs table, Start/Pause/Resume/Stop, queue, progress, log and config diff."""

    selection_changed = Signal(list)  # selected run ids, in table order
    best_kept = Signal(int, int)  # run id, checkpoint id
    runs_changed = Signal()  # the list of runs or their checkpoints changed
    controls_changed = Signal()  # pause/resume/stop was requested, or a run's state changed: buttons and status may change

    def __init__(self, queue, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.queue = queue
        self.project = None
        self._pending_best: dict[int, tuple[str, bool]] = {}
        self._step_seconds: dict[int, float] = {}  # moving average per run, for the ETA
        self._phase = ProgressMeter()  # the current run's long phase, if one is under way
        self._last_selection: list[int] | None = []

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(6)

        # --- controls ---
        controls = QHBoxLayout()
        self.start_button = QPushButton(icon("fa6s.play"), "Start")
        self.start_button.setToolTip("Queue the selected runs (a stopped, failed or interrupted run resumes "
                                     "from its last checkpoint)")
        self.pause_button = QPushButton(icon("fa6s.pause"), "Pause")
        self.pause_button.setToolTip("Pause the running run after the current step")
        self.resume_button = QPushButton(icon("fa6s.play"), "Resume")
        self.resume_button.setToolTip("Resume the paused run")
        self.stop_button = QPushButton(icon("fa6s.stop"), "Stop")
        self.stop_button.setToolTip("Stop the running run after the current step; a checkpoint is saved")
        self.stop_now_button = QPushButton(icon("fa6s.power-off"), "Stop now")
        self.stop_now_button.setToolTip("End the run's process now, in any phase (model load, reference pass, "
                                        "eval samples); resuming continues from its last checkpoint")
        for button, slot in ((self.start_button, self.start_selected), (self.pause_button, self.pause),
                             (self.resume_button, self.resume), (self.stop_button, self.stop),
                             (self.stop_now_button, self.stop_now)):
            button.clicked.connect(slot)
            controls.addWidget(button)
        controls.addSpacing(16)
        controls.addStretch(1)
        keep = QLabel("Keep best by")
        controls.addWidget(keep)
        self.best_metric = QComboBox()
        self.best_metric.setMinimumContentsLength(14)
        self.best_metric.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.best_metric.setToolTip("The metric that decides which checkpoint is best")
        self.best_metric.currentTextChanged.connect(self._on_best_metric)
        controls.addWidget(self.best_metric)
        self.best_direction = QComboBox()
        self.best_direction.addItem("highest", True)
        self.best_direction.addItem("lowest", False)
        controls.addWidget(self.best_direction)
        self.keep_best_button = QPushButton(icon("fa6s.trophy"), "Stop && keep best")
        self.keep_best_button.setToolTip("Stop the run (if running), then mark the checkpoint whose step has the "
                                         "best value of this metric; it is preselected to start new runs from")
        self.keep_best_button.clicked.connect(self.stop_and_keep_best)
        controls.addWidget(self.keep_best_button)
        layout.addLayout(controls)

        # --- progress ---
        progress = QHBoxLayout()
        self.progress_label = QLabel("No run in progress")
        self.progress_label.setMinimumWidth(200)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("%p%")
        self.progress.setMaximumHeight(16)
        self.progress.setValue(0)
        progress.addWidget(self.progress_label, 2)
        progress.addWidget(self.progress, 3)
        layout.addLayout(progress)

        # --- table | tabs ---
        splitter = QSplitter(Qt.Orientation.Horizontal)
        self.model = RunsTableModel(self)
        self.view = QTableView()
        self.view.setModel(self.model)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setAlternatingRowColors(True)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setDefaultSectionSize(24)
        self.view.setWordWrap(False)
        header = self.view.horizontalHeader()
        header.setHighlightSections(False)
        for column in (0, 1, 2, 3, 5):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(4, QHeaderView.ResizeMode.Stretch)
        self.view.selectionModel().selectionChanged.connect(self._on_selection)
        self.table_stack = QStackedWidget()
        self.empty = EmptyState("fa6s.flask", "No runs yet",
                                "Configure a DPO or PPO run in Run setup and press Queue run. "
                                "Runs execute one after another; select runs here to overlay their curves.")
        self.table_stack.addWidget(self.empty)
        self.table_stack.addWidget(self.view)
        splitter.addWidget(self.table_stack)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.StyleHint.TypeWriter)
        self.log_view.setFont(mono)
        self.log_view.setPlaceholderText("Run messages appear here.")
        self.tabs.addTab(self.log_view, icon("fa6s.list-check"), "Log")

        queue_page = QWidget()
        queue_layout = QVBoxLayout(queue_page)
        queue_layout.setContentsMargins(4, 4, 4, 4)
        self.queue_list = QListWidget()
        queue_layout.addWidget(self.queue_list)
        queue_buttons = QHBoxLayout()
        self.up_button = QToolButton()
        self.up_button.setIcon(icon("fa6s.arrow-up"))
        self.up_button.setToolTip("Run earlier")
        self.down_button = QToolButton()
        self.down_button.setIcon(icon("fa6s.arrow-down"))
        self.down_button.setToolTip("Run later")
        self.cancel_button = QPushButton(icon("fa6s.xmark"), "Cancel")
        self.cancel_button.setToolTip("Take the run out of the queue (it is marked stopped and can be started later)")
        self.up_button.clicked.connect(lambda: self._move_selected(-1))
        self.down_button.clicked.connect(lambda: self._move_selected(1))
        self.cancel_button.clicked.connect(self._cancel_selected)
        queue_buttons.addWidget(self.up_button)
        queue_buttons.addWidget(self.down_button)
        queue_buttons.addStretch(1)
        queue_buttons.addWidget(self.cancel_button)
        queue_layout.addLayout(queue_buttons)
        self.tabs.addTab(queue_page, icon("fa6s.layer-group"), "Queue")

        diff_page = QWidget()
        diff_layout = QVBoxLayout(diff_page)
        diff_layout.setContentsMargins(4, 4, 4, 4)
        self.diff_caption = hint_label("Select two runs to compare their settings.")
        diff_layout.addWidget(self.diff_caption)
        self.diff = QTableWidget(0, 3)
        self.diff.verticalHeader().setVisible(False)
        self.diff.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.diff.setAlternatingRowColors(True)
        self.diff.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.diff.setHorizontalHeaderLabels(["Setting", "A", "B"])
        diff_layout.addWidget(self.diff)
        self.tabs.addTab(diff_page, icon("fa6s.code-compare"), "Compare settings")
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self.splitter = splitter
        layout.addWidget(splitter, 1)

        for signal, slot in ((queue.started, self._on_started), (queue.finished, self._on_finished),
                             (queue.failed, self._on_failed), (queue.metrics, self._on_metrics),
                             (queue.log, self._on_log), (queue.progress, self._on_progress),
                             (queue.paused, self._on_paused),
                             (queue.resumed, self._on_resumed), (queue.queue_changed, self._on_queue_changed),
                             (queue.cancelled, self._on_cancelled)):
            signal.connect(slot)
        self.queue_list.currentRowChanged.connect(lambda _r: self.update_buttons())
        self._reset_progress()
        self.update_buttons()

    # --- project ---
    def set_project(self, project) -> None:
        self.project = project
        self._last_selection = []
        self._step_seconds.clear()
        self._pending_best.clear()
        self.log_view.clear()
        self.refresh()
        self._reset_progress()
        self._show_stored_logs()

    def _show_stored_logs(self, lines: int = 400) -> None:
        """The last `lines` lines the project's runs logged (kept in each run's folder), oldest first."""
        if self.project is None:
            return
        from studio.core.run_log import read_run_log

        entries = sorted((stamp, run["id"], text) for run in self.model.records
                         for stamp, text in read_run_log(self.project.run_dir(run["id"])))
        for stamp, run_id, text in entries[-lines:]:
            self._log(run_id, text, stamp)

    def refresh(self) -> None:
        """Reload the runs from the store, keeping the selection."""
        selected = self.selected_run_ids()
        if self.project is None:
            self.model.set_records([])
        else:
            self.model.set_records(self._load_runs())
        self.table_stack.setCurrentWidget(self.view if self.model.records else self.empty)
        self.select_runs(selected, emit=False)
        self._on_queue_changed(self.queue.queued)
        self.update_buttons()
        self.runs_changed.emit()

    def _load_runs(self) -> list[dict]:
        from studio.core import store

        db = self.project.db
        latest = store.latest_metrics(db)
        out = []
        for run in store.list_runs(db):
            run["step"], last = latest.get(run["id"], (0, {}))
            run["last"] = {k: v for k, v in last.items() if k not in NOT_A_METRIC}
            run["max_steps"] = run["config"].get("max_steps") or 0
            run["display_status"] = self._display_status(run["id"], run["status"])
            out.append(run)
        return out

    def _display_status(self, run_id: int, status: str) -> str:
        if run_id in self.queue.queued:
            return "waiting"
        if run_id == self.queue.current:
            if self.queue.stopping:  # until the store says it has ended
                return status if status in ("stopped", "completed", "failed") else "stopping…"
            if self.queue.is_paused and status != "paused":
                return "pausing…"
            if not self.queue.is_paused and status == "paused":  # resumed; the store follows a moment later
                return "running"
            if status == "queued":
                return "starting"
            return status
        return "not started" if status == "queued" else status

    # --- selection ---
    def selected_run_ids(self) -> list[int]:
        rows = sorted({index.row() for index in self.view.selectionModel().selectedRows()})
        return [self.model.records[row]["id"] for row in rows if row < len(self.model.records)]

    def select_runs(self, run_ids: list[int], emit: bool = True) -> None:
        selection = self.view.selectionModel()
        selection.blockSignals(not emit)
        selection.clearSelection()
        for run_id in run_ids:
            row = self.model.row_of(run_id)
            if row is not None:
                selection.select(self.model.index(row, 0),
                                 selection.SelectionFlag.Select | selection.SelectionFlag.Rows)
        selection.blockSignals(False)
        if emit:
            self._last_selection = None  # a request to show these runs: always tell the listeners
            self._on_selection()
        else:
            self._update_side_panes()

    def _on_selection(self, *_args) -> None:
        ids = self.selected_run_ids()
        self._update_side_panes()
        self.update_buttons()
        if ids != self._last_selection:
            self._last_selection = ids
            self.selection_changed.emit(ids)

    def _update_side_panes(self) -> None:
        ids = self.selected_run_ids()
        self._update_diff(ids)
        self._update_metric_choices(ids)

    def _update_diff(self, ids: list[int]) -> None:
        if len(ids) != 2:
            self.diff.setRowCount(0)
            self.diff_caption.setText("Select two runs to compare their settings.")
            return
        a, b = (self.model.record(i) for i in ids)
        first = {"method": a["method"], "start from checkpoint": a.get("parent_checkpoint_id"), **a["config"]}
        second = {"method": b["method"], "start from checkpoint": b.get("parent_checkpoint_id"), **b["config"]}
        rows = config_diff(first, second)
        self.diff.setHorizontalHeaderLabels(["Setting", a["name"], b["name"]])
        self.diff.setRowCount(len(rows))
        for r, (key, va, vb) in enumerate(rows):
            for c, value in enumerate((key, va, vb)):
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.diff.setItem(r, c, item)
        self.diff_caption.setText(f"{len(rows)} setting{'s' if len(rows) != 1 else ''} differ"
                                  if rows else "These two runs have the same settings.")

    def _update_metric_choices(self, ids: list[int]) -> None:
        run_id = ids[0] if len(ids) == 1 else self.queue.current
        names: list[str] = []
        if self.project is not None and run_id is not None:
            from studio.core import store

            names = [name for name in store.metric_names(self.project.db, run_id) if name not in NOT_A_METRIC]
            live = self.model.record(run_id)
            if live:
                names = sorted(set(names) | set(live["last"]))
        current = self.best_metric.currentText()
        if names == [self.best_metric.itemText(i) for i in range(self.best_metric.count())]:
            return
        self.best_metric.blockSignals(True)
        self.best_metric.clear()
        ordered = [n for n in HEADLINE_METRICS if n in names] + [n for n in names if n not in HEADLINE_METRICS]
        self.best_metric.addItems(ordered)
        if current in ordered:
            self.best_metric.setCurrentText(current)
        self.best_metric.blockSignals(False)
        self._on_best_metric(self.best_metric.currentText())

    def _on_best_metric(self, metric: str) -> None:
        if metric:
            self.best_direction.setCurrentIndex(0 if higher_is_better(metric) else 1)
        self.update_buttons()

    # --- controls ---
    def start_selected(self) -> None:
        if self.project is None:
            return
        for run_id in self.selected_run_ids():
            run = self.model.record(run_id)
            if run and run["status"] != "completed":
                self.start(run_id)

    def start(self, run_id: int) -> None:
        if self.queue.enqueue(run_id):
            name = (self.model.record(run_id) or {}).get("name", f"Run {run_id}")
            self._log(run_id, f"Queued {name}" if self.queue.current != run_id else f"Starting {name}")
        self.refresh()

    def pause(self) -> None:
        self.queue.pause()
        self._refresh_current()

    def resume(self) -> None:
        self.queue.resume()
        self._refresh_current()

    def stop(self) -> None:
        if self.queue.current is not None:
            self._log(self.queue.current, "Stop requested: the run stops after this step and saves a checkpoint")
        self.queue.stop()
        self._refresh_current()

    def stop_now(self) -> None:
        if self.queue.current is not None:
            self._log(self.queue.current, "Stop now requested: ending the run's process")
        self.queue.stop_now()
        self._refresh_current()

    def _refresh_current(self) -> None:
        current = self.queue.current
        if current is not None:
            run = self.model.record(current)
            if run:
                self.model.update_record(current, display_status=self._display_status(current, run["status"]))
        self.update_buttons()
        self.controls_changed.emit()

    def update_buttons(self) -> None:
        has_project = self.project is not None
        current = self.queue.current
        selected = [self.model.record(i) for i in self.selected_run_ids()]
        startable = [r for r in selected if r and r["status"] != "completed" and r["id"] != current
                     and r["id"] not in self.queue.queued]
        self.start_button.setEnabled(has_project and bool(startable))
        running = current is not None and not self.queue.stopping
        self.pause_button.setEnabled(running and not self.queue.is_paused)
        self.resume_button.setEnabled(running and self.queue.is_paused)
        self.stop_button.setEnabled(running)
        self.stop_now_button.setEnabled(current is not None and not self.queue.stopping_now)
        target = self._keep_best_target()
        self.keep_best_button.setEnabled(has_project and target is not None and bool(self.best_metric.currentText()))
        row = self.queue_list.currentRow()
        self.up_button.setEnabled(row > 0)
        self.down_button.setEnabled(0 <= row < self.queue_list.count() - 1)
        self.cancel_button.setEnabled(row >= 0)

    # --- queue tab ---
    def _on_queue_changed(self, queued: list) -> None:
        selected = self._queue_selected()
        self.queue_list.clear()
        for position, run_id in enumerate(queued, 1):
            run = self.model.record(run_id)
            item = QListWidgetItem(icon("fa6s.hourglass-half", MUTED),
                                   f"{position}. {run['name'] if run else f'Run {run_id}'}")
            item.setData(Qt.ItemDataRole.UserRole, run_id)
            self.queue_list.addItem(item)
            if run_id == selected:
                self.queue_list.setCurrentItem(item)
        current = self.queue.current
        title = f"Queue ({len(queued)})" if queued else "Queue"
        self.tabs.setTabText(1, title)
        for run_id in queued:
            run = self.model.record(run_id)
            if run:
                self.model.update_record(run_id, display_status="waiting")
        if current is not None and self.model.record(current):
            self._refresh_current()
        self.update_buttons()

    def _queue_selected(self) -> int | None:
        item = self.queue_list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item else None

    def _move_selected(self, offset: int) -> None:
        run_id = self._queue_selected()
        if run_id is not None:
            self.queue.move(run_id, offset)

    def _cancel_selected(self) -> None:
        run_id = self._queue_selected()
        if run_id is not None:
            self.queue.cancel(run_id)

    def _on_cancelled(self, run_id: int) -> None:
        self._log(run_id, "Cancelled before it started")
        self.refresh()

    # --- worker signals ---
    def _on_started(self, run_id: int) -> None:
        self._step_seconds.pop(run_id, None)
        self._phase.clear()
        self.refresh()
        run = self.model.record(run_id)
        if run:
            self._show_progress(run_id, run["step"], {})

    def _on_metrics(self, run_id: int, record: dict) -> None:
        run = self.model.record(run_id)
        if run is None:
            return
        last = {k: v for k, v in record.items() if k not in NOT_A_METRIC}
        status = "running" if run["status"] in ("queued", "running") else run["status"]
        self._phase.clear()
        changes = {"step": record.get("step", run["step"]), "last": last, "status": status, "phase": ""}
        if run.get("started_at") is None:  # set in the store when the run started, after the table loaded
            from studio.core import store

            changes["started_at"] = store.get_run(self.project.db, run_id)["started_at"]
        changes["display_status"] = self._display_status(run_id, status)
        state_changed = changes["display_status"] != run.get("display_status")
        self.model.update_record(run_id, **changes)
        if state_changed:  # e.g. "starting" -> "running" at the first record: the status bar follows
            self.controls_changed.emit()
        seconds = record.get("step_seconds")
        if seconds:
            previous = self._step_seconds.get(run_id)
            self._step_seconds[run_id] = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        self._show_progress(run_id, changes["step"], record)
        if self.best_metric.count() == 0 or (self.selected_run_ids() in ([], [run_id])
                                             and any(k not in self._metric_names() for k in last)):
            self._update_metric_choices(self.selected_run_ids())

    def _metric_names(self) -> set[str]:
        return {self.best_metric.itemText(i) for i in range(self.best_metric.count())}

    def _on_progress(self, run_id: int, phase: str, done: int, total: int) -> None:
        """A long phase of the current run: its count, rate and ETA in the table, progress bar and label."""
        run = self.model.record(run_id)
        if run is None:
            return
        if done >= total:  # the phase is over: back to the step count
            self._phase.clear()
            self.model.update_record(run_id, phase="")
            self._show_progress(run_id, run["step"], {})
        else:
            self._phase.update(phase, done, total)
            text = self._phase.text()
            self.model.update_record(run_id, phase=text)
            self.progress.setRange(0, max(total, 1))
            self.progress.setValue(done)
            self.progress.setFormat(f"{done} / {total}")
            self.progress_label.setText(f"<b>{run['name']}</b> · {text}")
        self.controls_changed.emit()  # the status bar shows the phase too

    def _show_progress(self, run_id: int, step: int, record: dict) -> None:
        run = self.model.record(run_id)
        if run is None:
            return
        total = run["max_steps"] or 0
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(min(step, total) if total else 0)
        self.progress.setFormat(f"{step} / {total}" if total else f"{step}")
        parts = [f"<b>{run['name']}</b>", f"step {step:,}" + (f" of {total:,}" if total else "")]
        seconds = self._step_seconds.get(run_id)
        if seconds and total:
            parts.append(f"ETA {format_duration((total - step) * seconds)}")
        tps = tokens_per_second(record) if record else None
        if tps:
            parts.append(f"{tps:,.0f} tokens/s")
        elif seconds:
            parts.append(f"{seconds:.2f} s/step")
        self.progress_label.setText(" · ".join(parts))

    def _reset_progress(self) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("")
        self.progress_label.setText("No run in progress")

    def _on_paused(self, run_id: int) -> None:
        self.refresh()  # the core logs "Paused after step N"

    def _on_resumed(self, run_id: int) -> None:
        self._log(run_id, "Resumed")
        self.refresh()

    def _on_finished(self, run_id: int, status: str) -> None:
        self._finish(run_id)

    def _on_failed(self, run_id: int, message: str) -> None:
        self._log(run_id, f"Failed: {message}")
        self._finish(run_id)

    def _finish(self, run_id: int) -> None:
        if run_id in self._pending_best:
            metric, higher = self._pending_best.pop(run_id)
            self.keep_best(run_id, metric, higher)
        self.refresh()
        if self.queue.current in (None, run_id):
            run = self.model.record(run_id)
            if run:
                self._show_progress(run_id, run["step"], {})
                self.progress_label.setText(self.progress_label.text().split(" · ETA")[0] + f" · {run['status']}")

    def _on_log(self, run_id: int, message: str) -> None:
        self._log(run_id, message)

    def _log(self, run_id: int | None, message: str, when: float | None = None) -> None:
        run = self.model.record(run_id) if run_id is not None else None
        who = run["name"] if run else (f"Run {run_id}" if run_id is not None else "")
        stamp = time.strftime("%H:%M:%S" if when is None or time.time() - when < 86400 else "%d %b %H:%M",
                              time.localtime(when))
        lines = message.splitlines() or [""]
        self.log_view.appendPlainText(f"{stamp}  {who:<10}  {lines[0]}")
        for line in lines[1:]:
            self.log_view.appendPlainText(f"{'':8}  {'':<10}  {line}")

    # --- keep the best checkpoint ---
    def _keep_best_target(self) -> int | None:
        ids = self.selected_run_ids()
        if len(ids) == 1:
            return ids[0]
        return self.queue.current if not ids else None

    def stop_and_keep_best(self) -> None:
        run_id = self._keep_best_target()
        metric = self.best_metric.currentText()
        if run_id is None or not metric:
            return
        higher = bool(self.best_direction.currentData())
        if run_id == self.queue.current:
            self._pending_best[run_id] = (metric, higher)
            self._log(run_id, f"Stopping; then keeping the checkpoint with the {'highest' if higher else 'lowest'} {metric}")
            self.queue.stop()
            self._refresh_current()
        else:
            self.keep_best(run_id, metric, higher)

    def keep_best(self, run_id: int, metric: str, higher: bool) -> dict | None:
        """Mark the run's best checkpoint by `metric` in the project settings; returns the record."""
        if self.project is None:
            return None
        from studio.core import store

        db = self.project.db
        steps, values = store.run_metrics(db, run_id).get(metric, ([], []))
        found = best_checkpoint(store.checkpoints(db, run_id), steps, values, higher)
        if found is None:
            self._log(run_id, f"No checkpoint has a value of {metric} yet: nothing kept")
            return None
        checkpoint, value = found
        record = {"checkpoint_id": checkpoint["id"], "step": checkpoint["step"], "path": checkpoint["path"],
                  "metric": metric, "value": value, "higher_is_better": higher, "chosen_at": time.time()}
        best = dict(store.get_setting(db, "best_checkpoints", {}) or {})
        best[str(run_id)] = record
        store.set_setting(db, "best_checkpoints", best)
        self._log(run_id, f"Best checkpoint by {metric}: step {checkpoint['step']} ({metric} = {value:.4g}); "
                          "kept and selected in Run setup")
        self.best_kept.emit(run_id, checkpoint["id"])
        return record
