"""Live training charts: a dashboard of small x-linked plots, one per TRL metric, runs overlaid.

Data lives in numpy buffers (studio.ui.charting.RunData); a live record only appends to them and
marks its run dirty, and a single-shot timer redraws at most every REDRAW_MS. Everything here runs
in the GUI thread: workers hand records over through a Qt signal (pyqtgraph issue #1398).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QCheckBox, QComboBox, QGridLayout, QHBoxLayout, QLabel, QPushButton,
                               QScrollArea, QStackedWidget, QToolButton, QVBoxLayout, QWidget)
from superqt import QLabeledDoubleSlider

from studio.core import store
from studio.ui.charting import (CHART_MIN_WIDTH, METRIC_GROUPS, MONOTONIC_AXES, X_AXES, X_AXIS_NAMES,
                                RunData, group_of, run_colour, sort_key)
from studio.ui.panels import EmptyState

if TYPE_CHECKING:
    from studio.ui.panels.metric_chart import MetricChart


REDRAW_MS = 100  # at most ~10 redraws a second, however fast records arrive
# A pyqtgraph chart costs ~10 ms to build (its menus mostly), and several times that while a
# training thread competes for the GIL: building a dashboard when a run's first record arrived froze
# the window for ~1 s. So spare charts are built ahead, one per idle moment once a project is open.
SPARE_CHARTS = 24  # PPO logs ~22 metrics
SPARE_BUILD_MS = 50
# Updating a chart costs ~1 ms, ~4 ms when its axes change (often, while a run is young), and
# showing a new one ~15 ms: a live tick does at most this much, the rest on ticks BUILD_MS apart.
TICK_BUDGET = 4
NEW_CHART_COST = 3
BUILD_MS = 30
X_PADDING = 0.02  # of the x span, on the left
X_HEADROOM = 0.2  # following growing curves: room on the right, so the linked x range (all charts
# re-decimate, all x axes redraw: ~5 ms a chart) changes every 20% of growth, not every step
EMPTY_TEXT = "Select a run to see its curves"
EMPTY_HINT = "Curves grow here while a run trains. Select several runs to overlay them."
NO_DATA_TEXT = "No metrics recorded yet for the selected runs"
X_AXIS_TIPS = {
    "step": "Optimizer steps.",
    "samples": "Training samples seen (samples_seen).",
    "wall": "Seconds since the run's first record (pauses included).",
    "kl": ("PPO: objective/kl, the KL of the policy from the reference on its own samples.\n"
           "GRPO, RLOO: kl, the same per token (mean over the completions' tokens).\n"
           "DPO: mean log-ratio policy/reference over the chosen and rejected answers,\n"
           "(rewards/chosen + rewards/rejected) / (2 beta), with beta from the run config:\n"
           "an estimate on the preference data, which can be negative."),
}




def new_metric_chart(parent: QWidget | None = None) -> MetricChart:
    from studio.ui.panels.metric_chart import MetricChart  # pyqtgraph loads here, after the first paint

    return MetricChart(parent=parent)


class _Section(QWidget):
    """A titled, collapsible group of charts laid out in a grid."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.charts: list[MetricChart] = []
        self._placed: tuple[int, list[MetricChart]] = (0, [])  # columns, charts in the grid
        self._header = QToolButton(text=title, checkable=True, checked=True, autoRaise=True)
        self._header.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self._header.setArrowType(Qt.ArrowType.DownArrow)
        self._header.setStyleSheet("QToolButton { font-weight: bold; border: none; }")
        self._header.toggled.connect(self._toggle)
        self._body = QWidget()
        self._grid = QGridLayout(self._body)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setSpacing(6)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 4, 0, 4)
        layout.addWidget(self._header)
        layout.addWidget(self._body)
        self.hide()

    def _toggle(self, expanded: bool) -> None:
        self._header.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self._body.setVisible(expanded)

    def add_chart(self, chart: MetricChart) -> None:
        chart.setParent(self._body)  # never a top-level window, even before its first curve
        chart.hide()
        self.charts.append(chart)
        self.charts.sort(key=lambda c: sort_key(c.metric_name))

    def relayout(self, columns: int) -> None:
        """Place the charts that have curves in reading order; hide the rest and empty sections."""
        shown = [chart for chart in self.charts if chart.curves]
        if (columns, shown) == self._placed:
            return  # moving charts resizes them, which re-syncs every linked chart: only on change
        for chart in self.charts:
            self._grid.removeWidget(chart)
        for index, chart in enumerate(shown):
            self._grid.addWidget(chart, index // columns, index % columns)
        for chart in self.charts:
            chart.setVisible(bool(chart.curves))
        for column in range(max(columns, self._placed[0])):
            self._grid.setColumnStretch(column, 1 if column < columns else 0)
        self._placed = (columns, shown)
        self.setVisible(bool(shown))


class ChartsPanel(QWidget):
    """The charts dashboard: show_runs, append_metrics, set_project, clear."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._db = None
        self._data: dict[int, RunData] = {}  # shown runs, and runs that sent live records
        self._shown: list[int] = []
        self._hidden: dict[int, str] = {}  # shown runs with no value on the x-axis -> why
        self._dirty: dict[int, set[str] | None] = {}  # run -> metrics left to draw (None: all)
        self._layout_dirty = False
        self._charts: dict[str, MetricChart] = {}
        self._x_master: MetricChart | None = None
        self._axis = "step"
        self._smoothing = 0.6  # TensorBoard's default
        self._log_y = False
        self._follow_x = True  # x range follows the data until the user zooms
        self._columns = 2
        self._timer = QTimer(self, singleShot=True, interval=REDRAW_MS)
        self._timer.timeout.connect(self._redraw_live)
        self._budget: int | None = None  # chart updates the current redraw may still do
        self._spare: list[MetricChart] = []
        self._spare_timer = QTimer(self, singleShot=True, interval=SPARE_BUILD_MS)
        self._spare_timer.timeout.connect(self._build_spare_chart)
        self._build()

    # --- layout ---

    def _build(self) -> None:
        self.x_axis_box = QComboBox()
        for key, name in X_AXIS_NAMES.items():
            self.x_axis_box.addItem(name, key)
            self.x_axis_box.setItemData(self.x_axis_box.count() - 1, X_AXIS_TIPS[key],
                                        Qt.ItemDataRole.ToolTipRole)
        self.x_axis_box.setToolTip(X_AXIS_TIPS["kl"])
        self.x_axis_box.currentIndexChanged.connect(
            lambda _: self.set_x_axis(self.x_axis_box.currentData()))
        self.smoothing_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.smoothing_slider.setRange(0.0, 0.99)
        self.smoothing_slider.setDecimals(2)
        self.smoothing_slider.setValue(self._smoothing)
        self.smoothing_slider.setMaximumWidth(220)
        self.smoothing_slider.setToolTip("Exponential moving average, debiased as in TensorBoard and W&B; "
                                         "the raw curve stays faint behind.")
        self.smoothing_slider.valueChanged.connect(self.set_smoothing)
        self.log_y_box = QCheckBox("Log y")
        self.log_y_box.toggled.connect(self.set_log_y)
        self.reset_zoom_button = QPushButton("Reset zoom")
        self.reset_zoom_button.setToolTip("Show every point again and follow new ones")
        self.reset_zoom_button.clicked.connect(self.reset_zoom)
        self.reset_zoom_button.setEnabled(False)

        tools = QHBoxLayout()
        tools.addWidget(QLabel("X axis"))
        tools.addWidget(self.x_axis_box)
        tools.addSpacing(12)
        tools.addWidget(QLabel("Smoothing"))
        tools.addWidget(self.smoothing_slider)
        tools.addSpacing(12)
        tools.addWidget(self.log_y_box)
        tools.addWidget(self.reset_zoom_button)
        tools.addStretch(1)

        self.legend = QLabel(wordWrap=True, textFormat=Qt.TextFormat.RichText)
        self.note = QLabel(wordWrap=True)
        self.note.setStyleSheet("color: #8a6d00;")
        self.note.hide()
        self.empty_state = EmptyState("fa6s.chart-line", EMPTY_TEXT, EMPTY_HINT)

        dashboard = QWidget()
        dashboard_layout = QVBoxLayout(dashboard)
        self._sections = {group: _Section(group) for group, _ in METRIC_GROUPS}
        for section in self._sections.values():
            dashboard_layout.addWidget(section)
        dashboard_layout.addStretch(1)
        self._scroll = QScrollArea(widgetResizable=True)
        self._scroll.setWidget(dashboard)
        self._stack = QStackedWidget()
        self._stack.addWidget(self.empty_state)
        self._stack.addWidget(self._scroll)

        layout = QVBoxLayout(self)
        layout.addLayout(tools)
        layout.addWidget(self.legend)
        layout.addWidget(self.note)
        layout.addWidget(self._stack, 1)
        self._refresh_texts()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        # The scroll area has not been resized yet here: estimate from the panel's own width.
        columns = max(1, (self.width() - 40) // CHART_MIN_WIDTH)
        if columns != self._columns:
            self._columns = columns
            self._relayout()

    # --- the interface the main window uses ---

    def set_project(self, project_path: Path | None) -> None:
        """Forget every run and read from this project from now on (None: no project)."""
        self.clear()
        if self._db is not None:
            self._db.close()
        self._db = store.connect(project_path) if project_path is not None else None
        if self._db is not None:
            self._spare_timer.start()
        else:
            self._spare_timer.stop()

    def _build_spare_chart(self) -> None:
        if len(self._spare) + len(self._charts) < SPARE_CHARTS:
            self._spare.append(new_metric_chart(parent=self))
            self._spare[-1].hide()
            self._spare_timer.start()

    def show_runs(self, run_ids: list[int]) -> None:
        """Overlay these runs (loaded from the store) and drop the others."""
        run_ids = list(dict.fromkeys(run_ids))
        for run_id in set(self._shown) - set(run_ids):
            self._remove_run(run_id)
        self._shown = []
        for run_id in run_ids:
            data = self._data.get(run_id)
            if data is None or not data.from_store:
                data = self._load_run(run_id, live=data)
            if data is not None:
                self._data[run_id] = data
                self._shown.append(run_id)
        self._dirty.update(dict.fromkeys(self._shown))
        self.redraw_now()  # a user action: no wait

    def add_run_data(self, data: RunData) -> None:
        """Overlay a run whose data is already in memory (show_runs loads them from the store)."""
        self._data[data.run_id] = data
        if data.run_id not in self._shown:
            self._shown.append(data.run_id)
        self._dirty[data.run_id] = None
        self._schedule()

    def append_metrics(self, run_id: int, record: dict) -> None:
        """One live step record from a worker signal; drawn at the next timer tick."""
        data = self._data.get(run_id)
        if data is None:  # not shown: keep it anyway, to fill the store's lag if it gets shown
            data = self._data[run_id] = self._live_run(run_id)
        data.append(record)
        if run_id in self._shown:
            self._dirty[run_id] = None
            self._schedule()

    def clear(self) -> None:
        for run_id in list(self._data):
            self._remove_run(run_id)
        self._shown = []
        self._dirty.clear()
        self._relayout()
        self._refresh_texts()

    # --- view options ---

    def set_x_axis(self, axis: str) -> None:
        if axis not in X_AXES:
            raise ValueError(f"unknown x-axis {axis!r}; expected one of {list(X_AXES)}")
        self._axis = axis
        self.x_axis_box.setCurrentIndex(self.x_axis_box.findData(axis))
        for chart in self._charts.values():
            chart.set_x_label(axis)
        self._redraw_all()
        self.reset_zoom()

    def set_smoothing(self, weight: float) -> None:
        self._smoothing = min(max(float(weight), 0.0), 0.99)
        if abs(self.smoothing_slider.value() - self._smoothing) > 1e-9:
            self.smoothing_slider.setValue(self._smoothing)
        self._redraw_all()

    def set_log_y(self, on: bool) -> None:
        self._log_y = bool(on)
        self.log_y_box.setChecked(self._log_y)
        for chart in self._charts.values():
            chart.set_log_y(self._log_y)

    def reset_zoom(self) -> None:
        self._follow_x = True
        self.reset_zoom_button.setEnabled(False)
        self._fit_x()
        for chart in self._charts.values():
            chart.fit_y(force=True)

    # --- charts and exports ---

    def chart(self, metric: str) -> MetricChart | None:
        return self._charts.get(metric)

    def visible_metrics(self) -> list[str]:
        return sorted((m for m, c in self._charts.items() if c.curves), key=sort_key)

    def export_png(self, metric: str, path: Path | str) -> None:
        self._charts[metric].export_png(path)

    def export_csv(self, metric: str, path: Path | str) -> int:
        return self._charts[metric].export_csv(path)

    # --- loading ---

    def _load_run(self, run_id: int, live: RunData | None) -> RunData | None:
        """The run from the store, plus live rows newer than what the store has (it writes in batches)."""
        if self._db is None:
            return live or RunData(run_id)
        try:
            run = store.get_run(self._db, run_id)
        except store.ProjectError:
            return None
        data = RunData.from_metrics(run_id, store.run_metrics(self._db, run_id),
                                    store.step_times(self._db, run_id), **_run_info(run))
        if live is not None:
            data.extend_after(live, data.last_step)
        return data

    def _live_run(self, run_id: int) -> RunData:
        if self._db is not None:
            try:
                return RunData(run_id, **_run_info(store.get_run(self._db, run_id)))
            except store.ProjectError:
                pass
        return RunData(run_id)

    def _remove_run(self, run_id: int) -> None:
        for chart in self._charts.values():
            chart.remove_run(run_id)
        self._data.pop(run_id, None)
        self._hidden.pop(run_id, None)
        self._dirty.pop(run_id, None)
        self._layout_dirty = True

    # --- drawing ---

    def _schedule(self, interval: int = REDRAW_MS) -> None:
        if not self._timer.isActive():
            self._timer.start(interval)

    def _redraw_all(self) -> None:
        self._dirty.update(dict.fromkeys(self._shown))
        self._schedule()

    def redraw_now(self) -> None:
        """Draw everything that changed since the last redraw, now."""
        self._redraw(budget=None)

    def _redraw_live(self) -> None:
        """The timer's redraw: a few charts per tick, the others on the next ticks."""
        self._redraw(budget=TICK_BUDGET)

    def _redraw(self, budget: int | None) -> None:
        self._timer.stop()
        self._budget = budget
        touched: set[MetricChart] = set()
        for run_id in [r for r in self._shown if r in self._dirty]:
            left = self._draw_run(self._data[run_id], self._dirty.pop(run_id), touched)
            if left:
                self._dirty[run_id] = left
        if self._dirty:
            self._schedule(BUILD_MS)
        if self._layout_dirty:
            self._relayout()
        self._fit_x()
        for chart in touched:
            chart.fit_y()
        self._refresh_texts()

    def _draw_run(self, data: RunData, metrics: set[str] | None, touched: set[MetricChart]) -> set[str]:
        """Update the run's curves of `metrics` (None: all) within the budget, adding the charts to
        `touched`; returns the metrics left for a later tick."""
        x = data.x_values(self._axis)
        if x is None:
            self._hidden[data.run_id] = data.missing_axis_reason(self._axis)
            for chart in self._charts.values():
                if self._take_curve(chart, data.run_id):
                    touched.add(chart)
            return set()
        self._hidden.pop(data.run_id, None)
        todo = [m for m in data.metric_names() if metrics is None or m in metrics]
        for index, metric in enumerate(todo):
            chart = self._charts.get(metric)
            cost = 1 if chart is not None else NEW_CHART_COST
            if self._budget is not None and index > 0 and cost > self._budget:
                return set(todo[index:])
            if self._budget is not None:
                self._budget = max(self._budget - cost, 0)
            curve = data.curve(metric, x, self._smoothing)
            if curve is None:
                if chart is not None and self._take_curve(chart, data.run_id):
                    touched.add(chart)
                continue
            chart = chart or self._new_chart(metric)
            self._layout_dirty |= data.run_id not in chart.curves
            chart.show_curve(curve, self._axis in MONOTONIC_AXES)
            touched.add(chart)
        return set()

    def _take_curve(self, chart: MetricChart, run_id: int) -> bool:
        if run_id not in chart.curves:
            return False
        chart.remove_run(run_id)
        self._layout_dirty = True
        return True

    def _new_chart(self, metric: str) -> MetricChart:
        chart = self._spare.pop() if self._spare else new_metric_chart()
        chart.set_metric(metric)
        self._charts[metric] = chart
        chart.set_x_label(self._axis)
        chart.set_log_y(self._log_y)
        chart.hovered.connect(lambda x, source=chart: self._show_cursor(source, x))
        chart.plotItem.getViewBox().sigRangeChangedManually.connect(self._user_zoomed)
        if self._x_master is None:
            self._x_master = chart
        else:
            chart.setXLink(self._x_master)
        self._sections[group_of(metric)].add_chart(chart)
        self._layout_dirty = True
        return chart

    def _relayout(self) -> None:
        for section in self._sections.values():
            section.relayout(self._columns)
        self._layout_dirty = False

    def _fit_x(self) -> None:
        """While following, show every point of every shown run on all (linked) charts."""
        if not self._follow_x or self._x_master is None:
            return
        lows, highs = [], []
        for chart in self._charts.values():
            for curve in chart.curves.values():
                ends = curve.x[[0, -1]] if chart.monotonic_x else (np.min(curve.x), np.max(curve.x))
                lows.append(float(ends[0]))
                highs.append(float(ends[1]))
        if not lows:
            return
        low, high = min(lows), max(highs)
        span = high - low if high > low else max(abs(high), 1.0)  # one point: a readable range around it
        (left, right), _ = self._x_master.plotItem.getViewBox().viewRange()
        # A new x range re-downsamples every curve and redraws every axis: keep the current one
        # while the data fits it without too much empty room, and leave room to grow into.
        fits = left <= low and high <= right
        snug = low - left <= 2 * X_PADDING * span and right - high <= 2 * X_HEADROOM * span
        if not (fits and snug):
            self._x_master.setXRange(low - X_PADDING * span, high + X_HEADROOM * span, padding=0)

    def _user_zoomed(self) -> None:
        self._follow_x = False
        self.reset_zoom_button.setEnabled(True)

    def _show_cursor(self, source: MetricChart, x: float | None) -> None:
        for chart in self._charts.values():
            if chart.isVisible():
                chart.show_cursor(x, with_readout=chart is source)

    def _refresh_texts(self) -> None:
        items = []
        for run_id in self._shown:
            name = self._data[run_id].name
            if run_id in self._hidden:
                items.append(f'<span style="color:#aaaaaa">■ {name} (hidden)</span>')
            else:
                items.append(f'<span style="color:{run_colour(run_id)}">■</span> {name}')
        self.legend.setText("&nbsp;&nbsp;&nbsp;".join(items))
        self.legend.setVisible(bool(items))
        notes = [f"{self._data[r].name}: {reason}" for r, reason in self._hidden.items()]
        self.note.setText(f"Hidden on the {X_AXIS_NAMES[self._axis].lower()} axis: " + "; ".join(notes))
        self.note.setVisible(bool(notes))
        has_curves = any(chart.curves for chart in self._charts.values())
        self.empty_state.title.setText(NO_DATA_TEXT if self._shown else EMPTY_TEXT)
        self._stack.setCurrentIndex(1 if has_curves else 0)


def _run_info(run: dict) -> dict:
    beta = run["config"].get("beta")
    usable = isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0
    return {"name": run["name"], "beta": float(beta) if usable else None}
