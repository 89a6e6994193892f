"""The stage advisor panel: which stage the project is in, the evidence, and the switch to DPO.

The verdict sits on top with its explanation, the risk tolerance it was judged at and the checkpoint
it refers to; below, one card per signal with its value, trend, threshold and a small chart (the
value per checkpoint, the firing zone shaded). Gathering the evidence and every action run in
background workers with their own database connection; the panel reports what the window should do
through signals.
"""

from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox, QFrame, QGridLayout, QHBoxLayout, QLabel, QPushButton, QScrollArea, QVBoxLayout,
    QWidget,
)

from studio.core import advisor, store
from studio.core.errors import StudioError
from studio.core.progress import ProgressMeter

from . import MUTED, ask_once, bold, hint_label, icon
from ..workers import describe_error, run_in_background

VERDICT_COLOURS = {
    "ppo_first": "#2e7d32", "keep_ppo": "#2e7d32",  # green: shaping with PPO
    "switch_now": "#b26a00",  # amber: time to switch
    "settle_dpo": "#2f6fde",  # blue: settling with DPO
    "need_evidence": "#6b7280",
}
FIRING = "#c62828"
CALM = "#1f2937"
TRENDS = {"rising": "↑ rising", "falling": "↓ falling", "flat": "→ flat", "": ""}
CHART_HEIGHT = 96
NO_RUN = -1  # the selector's "judge the base" entry
SECTIONS = (
    ("Is the base messy?", advisor.BASE_SIGNALS),
    ("Is shaping still paying off?", advisor.PROGRESS_SIGNALS),
    ("RL health", advisor.HEALTH_SIGNALS),
    ("Side effects", advisor.SIDE_EFFECT_SIGNALS),
)
# The verdicts under which starting DPO works against the advice: PPO has shaping left to do.
DPO_ADVISED_AGAINST = ("ppo_first", "keep_ppo")
DPO_SHOWN = ("max_steps", "learning_rate", "beta", "batch_size")  # the settings its confirmation names


def gather_advice(project_path: str, run_id: int | None, refresh_id: int) -> tuple:
    """Runs in a worker thread: its own connection, the shaping runs for the selector, and the advice.

    The refresh id travels with the result, so the panel shows only its newest refresh.
    """
    db = store.connect(project_path)
    try:
        return refresh_id, run_id, advisor.shaping_runs(db), advisor.advise(advisor.gather(db, run_id))
    finally:
        db.close()


def context_text(advice: advisor.Advice) -> str:
    """The lines under the explanation: intended changes, what is missing, the labelled-quality fit."""
    lines = [f"Treated as intended: {reason}" for reason in advice.intended]
    lines += [f"Missing: {item}" for item in advice.missing]
    if advice.quality_peak:
        lines.append(advice.quality_peak[0].upper() + advice.quality_peak[1:])
    return "<br>".join(lines)


def dpo_blocked_reason(advice: advisor.Advice | None) -> str:
    """Why "Start DPO" is disabled under this advice ('' when it is not)."""
    if advice is None or advice.verdict not in DPO_ADVISED_AGAINST:
        return ""
    return (f"Disabled: the advisor says \u201c{advice.title}\u201d. DPO settles what PPO has shaped; "
            "start it once the verdict is to switch (or to settle).")


class ProgressRelay(QObject):
    """Carries a worker's (phase, done, total) reports to the panel's thread (Qt queues the signal)."""

    reported = Signal(str, int, int)


def with_connection(project_path: str, function, *args, **kwargs):
    """Call `function(db, *args, **kwargs)` on a connection of this (worker) thread."""
    db = store.connect(project_path)
    try:
        return function(db, *args, **kwargs)
    finally:
        db.close()




CARD_MIN_WIDTH = 220
CARD_SPACING = 8


class SignalCard(QFrame):
    """One signal: name, value, trend, threshold, a chart, and the plain-words detail."""

    def __init__(self, key: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.key = key
        self.setObjectName("signalCard")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setStyleSheet("#signalCard { background: white; border: 1px solid #e5e7eb; border-radius: 6px; }")
        self.setMinimumWidth(CARD_MIN_WIDTH)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 8, 10, 8)
        layout.setSpacing(2)
        self.title = bold(QLabel(advisor.LABELS[key]))
        self.title.setWordWrap(True)
        layout.addWidget(self.title)
        numbers = QHBoxLayout()
        self.value = bold(QLabel("—"), 6)
        self.trend = QLabel()
        self.trend.setStyleSheet(f"color: {MUTED};")
        self.interval = QLabel()  # the 95% interval the firing rule uses
        self.interval.setStyleSheet(f"color: {MUTED};")
        numbers.addWidget(self.value)
        numbers.addWidget(self.trend)
        numbers.addWidget(self.interval)
        numbers.addStretch(1)
        layout.addLayout(numbers)
        self.threshold = QLabel()
        self.threshold.setStyleSheet(f"color: {MUTED};")
        layout.addWidget(self.threshold)
        # The chart is built the first time the card is on screen with a signal to draw: fifteen
        # pyqtgraph plots cost about a second, which the window's first paint should not wait for.
        self.chart = None  # a signal_chart.SignalChart once drawn
        self.signal: advisor.Signal | None = None
        self.chart_room = QWidget(self)
        self.chart_room.setFixedHeight(CHART_HEIGHT)
        QVBoxLayout(self.chart_room).setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.chart_room)
        self.detail = hint_label()
        layout.addWidget(self.detail)

    def show_signal(self, signal: advisor.Signal) -> None:
        self.value.setText(advisor.format_number(signal.key, signal.value))
        self.value.setStyleSheet(f"color: {FIRING if signal.fires else CALM};")
        self.trend.setText(TRENDS[signal.trend])
        if signal.low is not None:
            self.interval.setText(f"· 95%: {advisor.format_number(signal.key, signal.low)} to "
                                  f"{advisor.format_number(signal.key, signal.high)}")
        else:
            self.interval.setText("no interval yet" if signal.value is not None else "")
        state = ("intended" if signal.intended else "FIRES" if signal.fires else
                 "quiet" if signal.value is not None else "not measured")
        self.threshold.setText(f"fires at {advisor.threshold_text(signal)} · {state}")
        self.threshold.setStyleSheet(f"color: {FIRING if signal.fires else MUTED};")
        self.detail.setText(signal.detail + (f". Treated as intended: {signal.intended}" if signal.intended else ""))
        self.setToolTip(signal.detail)
        self.signal = signal
        if self.isVisible():
            self.draw_chart()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self.signal is not None:
            self.draw_chart()

    def draw_chart(self) -> None:
        if self.chart is None:
            from .signal_chart import SignalChart  # pyqtgraph loads here, after the first paint

            self.chart = SignalChart(self.chart_room)
            self.chart_room.layout().addWidget(self.chart)
        if self.chart.drawn is not self.signal:
            self.chart.show_signal(self.signal)


class AdvisorPanel(QWidget):
    """Which stage the project is in, with evidence, and the switch from PPO to DPO in one action."""

    label_requested = Signal(list)  # comparison ids to label
    run_created = Signal(int)  # a new queued run id for the window to enqueue
    trial_created = Signal(int, int)  # (shaping run id, DPO run id) of a quick trial
    advice_ready = Signal(object)  # the Advice just shown

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project_path: str | None = None
        self.advice: advisor.Advice | None = None
        self.run_methods: dict[int, str] = {}  # shaping run id -> its method, for the quick trial
        self._refresh_id = 0  # only the newest refresh's result is shown
        self._on_action_result = None  # what to do with the running action's result (one at a time)
        self._progress = ProgressMeter()  # count, rate and ETA of the base sampling
        self._relay = ProgressRelay(self)
        self._relay.reported.connect(self._show_progress)
        self._stop = threading.Event()  # set by Stop: the base sampling ends after its batch in progress
        self._build()
        self._update_buttons()

    # --- layout ---

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(12, 12, 12, 12)
        outer.setSpacing(10)
        outer.addLayout(self._build_toolbar())
        outer.addWidget(self._build_verdict())
        outer.addLayout(self._build_actions())
        scroll = self.scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        body = QWidget()
        self.cards: dict[str, SignalCard] = {}
        self._grids: list[tuple[QGridLayout, tuple[str, ...]]] = []  # each section's cards, reflowed to the width
        self._columns = 0
        self.section_hints: dict[tuple[str, ...], QLabel] = {}  # shown while a section has no card
        sections = QVBoxLayout(body)
        sections.setContentsMargins(0, 0, 0, 0)
        for title, keys in SECTIONS:
            sections.addWidget(bold(QLabel(title), 2))
            self.section_hints[keys] = hint_label("Measured at each checkpoint of a shaping run (PPO, GRPO or "
                                                  "RLOO): choose a run with checkpoints above.")
            sections.addWidget(self.section_hints[keys])
            grid = QGridLayout()
            grid.setSpacing(CARD_SPACING)
            for key in keys:
                self.cards[key] = SignalCard(key)
            self._grids.append((grid, keys))
            sections.addLayout(grid)
        sections.addStretch(1)
        scroll.setWidget(body)
        outer.addWidget(scroll, 1)
        scroll.viewport().installEventFilter(self)  # reflow when the cards' viewport itself resizes
        self._reflow()

    def eventFilter(self, watched, event) -> bool:
        if event.type() == QEvent.Type.Resize and watched is self.scroll.viewport():
            self._reflow()
        return super().eventFilter(watched, event)

    def _reflow(self) -> None:
        """As many cards per row as the width holds (no sideways scrolling in a narrow centre area)."""
        width = self.scroll.viewport().width()
        columns = max(1, min(max(len(keys) for _grid, keys in self._grids),
                             (width + CARD_SPACING) // (CARD_MIN_WIDTH + CARD_SPACING)))
        if columns == self._columns:
            return
        self._columns = columns
        for grid, keys in self._grids:
            for index, key in enumerate(keys):
                grid.removeWidget(self.cards[key])
                grid.addWidget(self.cards[key], index // columns, index % columns)
            for column in range(grid.columnCount()):
                grid.setColumnStretch(column, 1 if column < columns else 0)

    def _build_toolbar(self) -> QHBoxLayout:
        row = QHBoxLayout()
        row.addWidget(QLabel("Shaping run"))
        self.run_selector = QComboBox()
        self.run_selector.setMinimumWidth(280)
        self.run_selector.currentIndexChanged.connect(self._run_selected)
        row.addWidget(self.run_selector)
        self.refresh_button = QPushButton(icon("fa6s.rotate"), "Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        row.addWidget(self.refresh_button)
        row.addStretch(1)
        self.status = hint_label()
        self.status.setWordWrap(False)  # one line: wrapped, the progress read-out was cut off in the toolbar
        row.addWidget(self.status)
        self.stop_button = QPushButton(icon("fa6s.stop"), "Stop")
        self.stop_button.setToolTip("Stop sampling after the batch in progress; nothing of this pass is stored.")
        self.stop_button.clicked.connect(self.stop_sampling)
        self.stop_button.hide()
        row.addWidget(self.stop_button)
        return row

    def _build_verdict(self) -> QFrame:
        box = QFrame()
        box.setObjectName("verdictBox")
        self.verdict_box = box
        layout = QVBoxLayout(box)
        layout.setContentsMargins(16, 12, 16, 12)
        top = QHBoxLayout()
        self.verdict = bold(QLabel("Open a project"), 9)
        top.addWidget(self.verdict)
        top.addStretch(1)
        self.tolerance = QLabel()
        self.tolerance.setToolTip("The project's risk tolerance moves every threshold below. "
                                  "Change it in the project settings.")
        top.addWidget(self.tolerance)
        layout.addLayout(top)
        self.refers_to = bold(QLabel())
        layout.addWidget(self.refers_to)
        self.explanation = QLabel()
        self.explanation.setWordWrap(True)
        self.explanation.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        font = self.explanation.font()
        font.setPointSizeF(font.pointSizeF() + 1)
        self.explanation.setFont(font)
        layout.addWidget(self.explanation)
        self.context = hint_label()  # what is treated as intended, what is missing, the quality fit
        layout.addWidget(self.context)
        self.error = QLabel()  # a failure is shown here, never in a modal that comes back on each refresh
        self.error.setWordWrap(True)
        self.error.setStyleSheet(f"color: {FIRING};")
        self.error.hide()
        layout.addWidget(self.error)
        self._colour_verdict("need_evidence")
        return box

    def _build_actions(self) -> QGridLayout:
        # Two by two: in one row the four buttons would make the panel wider than the centre area of
        # a 1600 px window with its docks open, and the verdict would be clipped.
        grid = QGridLayout()
        self.sample_button = QPushButton(icon("fa6s.dice"), "Sample the base")
        self.sample_button.setToolTip(f"Sample every eval prompt {advisor.BASE_SAMPLES} times from the "
                                      "base model (temperature > 0) to see whether it is messy.")
        self.sample_button.clicked.connect(self.sample_base)
        self.label_button = QPushButton(icon("fa6s.tags"), "Label pairs from this checkpoint")
        self.label_button.setToolTip("Two samples of the advised checkpoint per prompt, for the labelling view.")
        self.label_button.clicked.connect(self.label_pairs)
        self.dpo_button = QPushButton(icon("fa6s.right-left"), "Start DPO from this checkpoint")
        self.dpo_button.setToolTip("A DPO run whose starting policy and reference are the advised checkpoint, "
                                   "trained on the labelled and imported pairs.")
        self.dpo_button.clicked.connect(self.start_dpo)
        self.trial_button = QPushButton(icon("fa6s.code-compare"), "Run a quick PPO vs DPO trial")
        self.trial_button.setToolTip(f"Two short runs ({advisor.TRIAL_STEPS} steps) from the advised "
                                     "checkpoint, on the same eval prompts, to compare side by side.")
        self.trial_button.clicked.connect(self.start_trial)
        self.dpo_tooltip = self.dpo_button.toolTip()  # shown again once the verdict allows DPO
        for index, button in enumerate((self.sample_button, self.label_button, self.dpo_button, self.trial_button)):
            grid.addWidget(button, index // 2, index % 2)
        grid.setColumnStretch(2, 1)
        return grid

    def _colour_verdict(self, verdict: str) -> None:
        colour = VERDICT_COLOURS[verdict]
        tint = QColor(colour)
        tint.setAlpha(22)
        self.verdict_box.setStyleSheet(
            f"#verdictBox {{ border-left: 6px solid {colour}; border-radius: 4px; "
            f"background: rgba({tint.red()}, {tint.green()}, {tint.blue()}, {tint.alpha()}); }}")
        self.verdict.setStyleSheet(f"color: {colour};")

    # --- project and refresh ---

    def set_project(self, project_path: Path | str | None) -> None:
        self.project_path = str(project_path) if project_path else None
        self.advice = None
        self.run_selector.blockSignals(True)
        self.run_selector.clear()
        self.run_selector.blockSignals(False)
        if self.project_path is None:
            self._colour_verdict("need_evidence")
            self.verdict.setText("Open a project")
            for label in (self.tolerance, self.refers_to, self.explanation):
                label.setText("")
        self._update_buttons()
        self.refresh()

    def selected_run(self) -> int | None:
        run_id = self.run_selector.currentData()
        return None if run_id in (None, NO_RUN) else run_id

    def refresh(self) -> None:
        """Gather the evidence and advise, in a worker; the newest result is shown."""
        if self.project_path is None:
            return
        self._refresh_id += 1
        if not self.busy:  # an action's message stays until the action ends
            self.status.setText("Reading the project…")
        # Bound methods, not lambdas: Qt drops the connection if the panel is deleted meanwhile.
        run_in_background(gather_advice, self.project_path, self.selected_run(), self._refresh_id,
                          on_result=self._show, on_error=self._refresh_failed)

    def _run_selected(self, _index: int) -> None:
        self.refresh()

    def _show(self, result: tuple) -> None:
        refresh_id, chosen, runs, advice = result
        if refresh_id != self._refresh_id:
            return
        first_look = self.run_selector.count() == 0
        self._fill_selector(runs, chosen)
        if first_look and chosen is None:
            # First look at a project: judge its newest shaping run with checkpoints, if any.
            default = next((r["id"] for r in runs if r["checkpoints"]), None)
            if default is not None:
                self.run_selector.setCurrentIndex(self.run_selector.findData(default))
                return  # _run_selected refreshes
        self.advice = advice
        if not self.busy:
            self.status.setText("")
        self._colour_verdict(advice.verdict)
        self.verdict.setText(advice.title)
        self.tolerance.setText(f"Risk tolerance: <b>{advice.risk_tolerance}</b>")
        self.refers_to.setText(f"Advice refers to {advice.checkpoint_label}")
        self.explanation.setText(advice.explanation)
        self.context.setText(context_text(advice))
        self.context.setVisible(bool(self.context.text()))
        self.show_error("")
        for signal in advice.base_signals + advice.run_signals:
            self.cards[signal.key].show_signal(signal)
        shown = {s.key for s in advice.base_signals + advice.run_signals}
        for key, card in self.cards.items():
            card.setVisible(key in shown)
        for keys, hint in self.section_hints.items():
            hint.setVisible(not shown & set(keys))
        self._update_buttons()
        self.advice_ready.emit(advice)

    def _fill_selector(self, runs: list[dict], chosen: int | None) -> None:
        self.run_selector.blockSignals(True)
        self.run_selector.clear()
        self.run_selector.addItem("No shaping run: judge the base", NO_RUN)
        self.run_methods = {run["id"]: run["method"] for run in runs}
        for run in runs:
            text = f"{run['name']} · {run['checkpoints']} checkpoints · {run['status']}"
            self.run_selector.addItem(text, run["id"])
        wanted = NO_RUN if chosen is None else chosen
        self.run_selector.setCurrentIndex(max(0, self.run_selector.findData(wanted)))
        self.run_selector.blockSignals(False)

    def _refresh_failed(self, exc: BaseException) -> None:
        self.status.setText("")
        self.show_error(f"Could not read the project: {describe_error(exc)}")

    def show_error(self, message: str) -> None:
        self.error.setText(message)
        self.error.setVisible(bool(message))

    # --- actions ---

    # Each action that starts long work shows the settings it will use and asks once ("don't ask again").

    def sample_base(self) -> None:
        run_id = self.selected_run()
        decoding = self._read_settings(advisor.base_sampling, run_id)
        if decoding is None:
            return
        ask_once(self, "advisor_sample_base", "Sample the base model?",
                 f"Every eval prompt is answered {advisor.BASE_SAMPLES} times by the base model (seeds "
                 f"0 to {advisor.BASE_SAMPLES - 1}) and once greedily; base samples stored earlier with "
                 "the same settings are replaced.",
                 {"samples per prompt": f"{advisor.BASE_SAMPLES} sampled + 1 greedy", **decoding},
                 lambda: self._sample_base(run_id))

    def _sample_base(self, run_id: int | None) -> None:
        self._stop.clear()
        self._progress.clear()
        self._run_action("Sampling the base…", advisor.sample_base, self.project_path, run_id=run_id,
                         on_progress=self._relay.reported.emit, should_stop=self._stop.is_set,
                         on_result=self._base_sampled, stoppable=True)

    def stop_sampling(self) -> None:
        self._stop.set()
        self.stop_button.setEnabled(False)
        self.status.setText("Stopping after the batch in progress…")

    def _show_progress(self, phase: str, done: int, total: int) -> None:
        if not self.busy or self._stop.is_set():  # a late report, or Stop's message stays
            return
        self._progress.update(phase, done, total)
        self.status.setText(self._progress.text())

    def label_pairs(self) -> None:
        checkpoint_id, where = self.advice.checkpoint_id, self.advised_state()
        ask_once(self, "advisor_label_pairs", f"Sample pairs to label from {where}?",
                 "Two samples per prompt for the labelling view, on the training prompts (the eval "
                 "prompts when there are none).",
                 {"from": where, "prompts": f"up to {advisor.LABEL_PROMPTS}", **advisor.SAMPLING},
                 lambda: self._run_action("Sampling pairs to label…", with_connection, self.project_path,
                                          advisor.label_pairs_from_checkpoint, checkpoint_id,
                                          on_result=self.label_requested.emit))

    def start_dpo(self) -> None:
        checkpoint_id, where = self.advice.checkpoint_id, self.advised_state()
        config = self._read_settings(advisor.dpo_config, checkpoint_id)
        if config is None:
            return
        config = config.to_json()
        ask_once(self, "advisor_start_dpo", f"Start DPO from {where}?",
                 f"A DPO run whose starting policy and reference are {where}, trained on the labelled "
                 "and imported preference pairs:",
                 {"start and reference": where, **{key: config[key] for key in DPO_SHOWN}},
                 lambda: self._run_action("Creating the DPO run…", with_connection, self.project_path,
                                          advisor.start_dpo_from_checkpoint, checkpoint_id,
                                          on_result=self._run_created))

    def trial_method(self) -> str:
        """The shaping method of the quick trial: the judged run's (PPO when the base is judged)."""
        return advisor.trial_method(self.run_methods.get(self.advice.run_id) if self.advice else None)

    def start_trial(self) -> None:
        checkpoint_id, where, run_id = self.advice.checkpoint_id, self.advised_state(), self.advice.run_id
        method = self.trial_method().upper()
        ask_once(self, "advisor_quick_trial", f"Run a quick {method} vs DPO trial?",
                 f"Two short runs from {where}, same seed and length, to compare side by side on the "
                 f"eval prompts. The shaping run uses {method}, the method of the judged run, and its "
                 "reward sources.",
                 {"start": where, "runs": f"{method} and DPO", "steps each": advisor.TRIAL_STEPS},
                 lambda: self._run_action("Creating the trial runs…", with_connection, self.project_path,
                                          advisor.create_quick_trial, checkpoint_id, judged_run_id=run_id,
                                          on_result=self._trial_created))

    def _read_settings(self, function, *args):
        """The settings an action will use, read before asking; None (the reason shown) when they cannot be."""
        try:
            return with_connection(self.project_path, function, *args)
        except (StudioError, OSError, ValueError) as exc:  # a bad setting or an unreadable model
            self.show_error(f"The advisor's action cannot start: {describe_error(exc)}")
            return None

    def advised_state(self) -> str:
        """The advised checkpoint by the name the labelling and compare views give it."""
        if self.advice is None or self.advice.checkpoint_id is None:
            return "the base"
        return self.advice.checkpoint_label

    def _base_sampled(self, count: int) -> None:
        self._progress.clear()
        if count == 0 and self._stop.is_set():  # nothing changed: no refresh to wipe the message
            self.status.setText("Sampling stopped: nothing stored, the earlier base samples stay.")
            return
        self.refresh()

    def _run_created(self, run_id: int) -> None:
        self.run_created.emit(run_id)
        self.refresh()

    def _trial_created(self, run_ids: tuple[int, int]) -> None:
        self.trial_created.emit(*run_ids)
        self.refresh()

    @property
    def busy(self) -> bool:
        return self._on_action_result is not None

    def _run_action(self, message: str, function, *args, on_result, stoppable: bool = False, **kwargs) -> None:
        self._on_action_result = on_result
        self._update_buttons()
        self.stop_button.setEnabled(True)
        self.stop_button.setVisible(stoppable)
        self.status.setText(message)
        run_in_background(function, *args, **kwargs, on_result=self._action_done, on_error=self._action_failed)

    def _action_done(self, result) -> None:
        on_result, self._on_action_result = self._on_action_result, None
        self.status.setText("")
        self.stop_button.hide()
        self._update_buttons()
        on_result(result)

    def _action_failed(self, exc: BaseException) -> None:
        self._on_action_result = None
        self.status.setText("")
        self.stop_button.hide()
        self._update_buttons()
        self.show_error(f"The advisor's action failed: {describe_error(exc)}")

    def _update_buttons(self) -> None:
        has_project = self.project_path is not None and not self.busy
        has_advice = has_project and self.advice is not None
        where = self.advised_state() if self.advice is not None else "this checkpoint"
        short = where.rpartition(", ")[2]  # "checkpoint 2 (step 24)": the run is named in the verdict above
        self.label_button.setText(f"Label pairs from {short}")
        self.label_button.setToolTip(f"Two samples of {where} per prompt, for the labelling view.")
        self.dpo_button.setText(f"Start DPO from {short}")
        self.trial_button.setText(f"Run a quick {self.trial_method().upper()} vs DPO trial")
        self.sample_button.setEnabled(has_project)  # sampling the base is never advised against
        self.refresh_button.setEnabled(self.project_path is not None)
        for button in (self.label_button, self.trial_button):
            button.setEnabled(has_advice)
        blocked = dpo_blocked_reason(self.advice)
        self.dpo_button.setEnabled(has_advice and not blocked)
        self.dpo_button.setToolTip(blocked or self.dpo_tooltip)
