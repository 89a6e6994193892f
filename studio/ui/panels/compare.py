"""The compare panel: what the model says, checkpoint by checkpoint, shaping (PPO, GRPO, RLOO) next to DPO.

Two to four panes side by side, each bound to a model state (the base or a checkpoint) with a
slider to scrub through its run's checkpoints. Every pane answers the same prompt with the same
decoding settings and seed. Outputs stored at checkpoint time show at once; anything else (a new
prompt, other settings) is generated in a background job that streams tokens into the panes, then
scores every output (reward, log-prob under the base). Words that differ from the first pane are
highlighted. Grid mode lays out every eval prompt against the panes' states, stored outputs only.

The background job opens its own database connection and never touches a widget: it reports
through a :class:`Relay` whose signals Qt queues to the window's thread.
"""

from __future__ import annotations

import html
import json
import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, QPersistentModelIndex, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QDoubleSpinBox, QFrame, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
    QPushButton, QSizePolicy, QSlider, QSpinBox, QSplitter, QStackedWidget, QTableView, QTextBrowser, QToolButton,
    QVBoxLayout, QWidget,
)

from studio.core import compare, store

from . import DANGER, MUTED, EmptyState, as_text, bold, hint_label, icon, one_line
from ..workers import describe_error, run_in_background

MIN_PANES, MAX_PANES = 2, 4
HIGHLIGHT = "#fbe7a1"  # soft amber behind words that differ from the first pane
GENERATE_DELAY_MS = 400  # let a slider drag or a spin box settle before starting a job
GRID_CELL_CHARS = 500  # grid cells are for scanning; the full text is in the tooltip
CUSTOM = -1  # prompt combo data of the free-text prompt

_Index = QModelIndex | QPersistentModelIndex


# --- small pure helpers -----------------------------------------------------------------------

def prompt_label(prompt: Any) -> str:
    """A prompt as a person reads it: a single user message is just its content."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict):
        return str(prompt[0].get("content", ""))
    return as_text(prompt)


def output_key(project_path: Path, state: int | None, prompt: Any, decoding: dict) -> tuple:
    """What identifies an output: seeded decoding makes it a function of state, prompt and decoding.

    The project is part of it so that a late signal from a job of the previous project matches nothing.
    """
    return (str(project_path), state, json.dumps(prompt, sort_keys=True),
            tuple(decoding[k] for k in compare.DECODING_KEYS))


def diff_html(reference: str | None, text: str) -> str:
    """`text` as HTML, words absent from `reference` on a highlight (none without a reference)."""
    pieces = [("equal", text)] if reference is None else compare.word_diff(reference, text)
    spans = []
    for op, piece in pieces:
        if op == "equal":
            spans.append(html.escape(piece))
        elif op == "insert":
            spans.append(f'<span style="background-color:{HIGHLIGHT}">{html.escape(piece)}</span>')
    return f'<div style="white-space: pre-wrap">{"".join(spans)}</div>'


def message_html(message: str, color: str = MUTED) -> str:
    return f'<p style="color:{color}"><i>{html.escape(message)}</i></p>'


def figures_html(figures: dict, stored: bool, note: str = "") -> str:
    """Two lines of figures: length and where the text comes from; reward and log-prob under the base."""
    origin = "stored at checkpoint time" if stored else "generated now"
    length = (f"<b>{figures['tokens']:g}</b> tokens · <b>{figures['words']:g}</b> words"
              f' · <span style="color:{MUTED}">{origin}</span>')
    scores = []
    if "reward" in figures:
        scores.append(f"reward <b>{figures['reward']:+.2f}</b>")
    if "logprob_sum" in figures:
        scores.append(f"log-prob under base <b>{figures['logprob_sum']:.1f}</b> ({figures['logprob_mean']:.2f}/token)")
    return f"{length}<br>{' · '.join(scores)}{' · ' if scores and note else ''}{note}"


def figures_tooltip(figures: dict) -> str:
    lines = [f"{name.removeprefix('reward/')}: {value:+.3f} (unweighted)"
             for name, value in figures.items() if name.startswith("reward/")]
    lines.append("log-prob: how likely the base model finds this exact response (sum over its tokens, "
                 "and per token). Far below the base's own answers means the policy drifted from it.")
    return "\n".join(lines)


# --- the background job -----------------------------------------------------------------------

class Relay(QObject):
    """Signals the background job emits from its thread; Qt queues them to the window's thread."""

    text = Signal(object, str)  # output key, text so far
    output = Signal(object, object, bool)  # output key, compare.Output, scored (figures complete)
    failed = Signal(object, str)  # output key, readable message
    status = Signal(str)


def fill_outputs(project_path: Path, cache: compare.ModelCache, prompt: Any, decoding: dict,
                 to_generate: list[tuple[tuple, int | None, str]], to_score: list[tuple[tuple, compare.Output]],
                 relay: Relay, cancel: threading.Event) -> None:
    """Generate the missing outputs (streaming), then score them all. Runs in a worker thread.

    to_generate: (key, state, state label); to_score: (key, output) already known. A state that
    fails (a checkpoint folder deleted, say) is reported for its own panes; the others go on.
    """
    db = store.connect(project_path)  # this thread's own connection
    try:
        ready = list(to_score)
        for key, state, label in to_generate:
            if cancel.is_set():
                return
            relay.status.emit(f"Generating: {label}…")
            try:
                outputs = compare.generate_outputs(cache, db, [state], prompt, decoding,
                                                   on_text=lambda _, text, key=key: relay.text.emit(key, text),
                                                   cancel=cancel)
            except Exception as exc:  # noqa: BLE001 - shown in the pane, never lost
                relay.failed.emit(key, describe_error(exc))
                continue
            if not outputs:  # cancelled mid-generation
                return
            relay.output.emit(key, outputs[0], False)
            ready.append((key, outputs[0]))
        if cancel.is_set() or not ready:
            return
        relay.status.emit("Scoring: reward and log-prob under the base…")
        try:
            scored = compare.score_outputs(cache, db, prompt, [output for _, output in ready])
        except Exception as exc:  # noqa: BLE001 - the texts stand; their figures say why they lack scores
            for key, _ in ready:
                relay.failed.emit(key, describe_error(exc))
            return
        if cancel.is_set():  # the panel moved on (maybe to another project): report nothing more
            return
        for (key, _), output in zip(ready, scored):
            relay.output.emit(key, output, True)
    finally:
        db.close()


# --- one pane ---------------------------------------------------------------------------------

class Pane(QFrame):
    """A model state (combo + checkpoint slider), its response, and the response's figures."""

    state_chosen = Signal()  # the user picked another state, with the combo or the slider
    remove_clicked = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.states: list[compare.StateInfo] = []
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setObjectName("comparePane")
        self.setStyleSheet("#comparePane { border: 1px solid #d9dce1; border-radius: 6px; background: white; }")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(6)

        header = QHBoxLayout()
        self.combo = QComboBox()
        self.combo.setToolTip("Model state: the base model or a checkpoint of a run")
        self.combo.setMinimumContentsLength(14)
        self.combo.currentIndexChanged.connect(self._on_combo)
        header.addWidget(self.combo, 1)
        self.role = hint_label("")
        header.addWidget(self.role)
        self.remove_button = QToolButton()
        self.remove_button.setIcon(icon("fa6s.xmark"))
        self.remove_button.setToolTip("Remove this pane")
        self.remove_button.setAutoRaise(True)
        self.remove_button.clicked.connect(self.remove_clicked)
        header.addWidget(self.remove_button)
        layout.addLayout(header)

        scrub = QHBoxLayout()
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setToolTip("Scrub through this run's checkpoints")
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.setPageStep(1)
        self.slider.valueChanged.connect(self._on_slider)
        scrub.addWidget(self.slider, 1)
        self.step_label = hint_label("")
        self.step_label.setWordWrap(False)
        scrub.addWidget(self.step_label)
        layout.addLayout(scrub)

        # Above the text, so the figures line up across panes whatever the texts' lengths.
        self.figures = QLabel()
        self.figures.setTextFormat(Qt.TextFormat.RichText)
        self.figures.setWordWrap(True)  # a long figures line must not set the pane's (and the tab's) minimum width
        self.figures.setStyleSheet("background: #f6f7f9; border-radius: 4px; padding: 4px 6px;")
        layout.addWidget(self.figures)

        self.browser = QTextBrowser()
        self.browser.setOpenLinks(False)
        self.browser.setFrameShape(QFrame.Shape.NoFrame)
        font = QFont(self.browser.font())
        font.setPointSizeF(font.pointSizeF() + 1.5)
        self.browser.setFont(font)
        self.browser.document().setDocumentMargin(6)
        layout.addWidget(self.browser, 1)

    @property
    def info(self) -> compare.StateInfo | None:
        index = self.combo.currentData()  # an index into self.states (separators have none)
        return self.states[index] if index is not None else None

    @property
    def state(self) -> int | None:
        return self.info.state if self.info is not None else compare.BASE

    def set_states(self, states: list[compare.StateInfo], state: int | None) -> None:
        """Fill the combo (a separator between runs) and select `state` (the base if it is gone)."""
        self.states = states
        self.combo.blockSignals(True)
        self.combo.clear()
        previous_run = None
        for index, info in enumerate(states):
            if info.run_id != previous_run and self.combo.count():
                self.combo.insertSeparator(self.combo.count())
            self.combo.addItem(info.label, index)
            previous_run = info.run_id
        self.combo.blockSignals(False)
        self.set_state(state)

    def set_state(self, state: int | None) -> None:
        states = [info.state for info in self.states]
        index = states.index(state) if state in states else 0
        self.combo.blockSignals(True)
        self.combo.setCurrentIndex(self.combo.findData(index))
        self.combo.blockSignals(False)
        self._sync_slider()

    def set_role(self, text: str, tooltip: str, removable: bool) -> None:
        self.role.setText(text)
        self.role.setToolTip(tooltip)
        self.remove_button.setEnabled(removable)

    def show_html(self, body: str, figures: str = "", tooltip: str = "") -> None:
        scroll = self.browser.verticalScrollBar().value()
        self.browser.setHtml(body)
        self.browser.verticalScrollBar().setValue(scroll)  # a streamed token must not jump the view
        self.figures.setText(figures)
        self.figures.setToolTip(tooltip)

    def _run_states(self) -> list[compare.StateInfo]:
        current = self.info
        if current is None or current.run_id is None:
            return []
        return [info for info in self.states if info.run_id == current.run_id]

    def _sync_slider(self) -> None:
        run_states = self._run_states()
        self.slider.blockSignals(True)
        self.slider.setEnabled(len(run_states) > 1)
        self.slider.setRange(0, max(0, len(run_states) - 1))
        current = self.state
        position = next((i for i, info in enumerate(run_states) if info.state == current), 0)
        self.slider.setValue(position)
        self.slider.blockSignals(False)
        if run_states:
            self.step_label.setText(f"step {run_states[position].step} · {position + 1} of {len(run_states)}")
        else:
            self.step_label.setText("no checkpoints")

    def _on_combo(self, _row: int) -> None:
        self._sync_slider()
        self.state_chosen.emit()

    def _on_slider(self, position: int) -> None:
        run_states = self._run_states()
        if 0 <= position < len(run_states):
            self.set_state(run_states[position].state)
            self.state_chosen.emit()


# --- grid mode --------------------------------------------------------------------------------

class GridModel(QAbstractTableModel):
    """Eval prompts (rows) against model states (columns): stored outputs, missing ones marked."""

    MISSING = "— not stored"

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.prompts: list[str] = []
        self.states: list[str] = []
        self.cells: list[list[str | None]] = []

    def set_grid(self, prompts: list[str], states: list[str], cells: list[list[str | None]]) -> None:
        self.beginResetModel()
        self.prompts, self.states, self.cells = prompts, states, cells
        self.endResetModel()

    def rowCount(self, parent: _Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.prompts)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else 1 + len(self.states)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role != Qt.ItemDataRole.DisplayRole or orientation != Qt.Orientation.Horizontal:
            return None
        return "Prompt" if section == 0 else self.states[section - 1]

    def text(self, row: int, column: int) -> str | None:
        return self.prompts[row] if column == 0 else self.cells[row][column - 1]

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        text = self.text(index.row(), index.column())
        if role == Qt.ItemDataRole.DisplayRole:
            if text is None:
                return self.MISSING
            return text if len(text) <= GRID_CELL_CHARS else text[:GRID_CELL_CHARS - 1] + "…"
        if role == Qt.ItemDataRole.ToolTipRole:
            return text
        if role == Qt.ItemDataRole.ForegroundRole and text is None:
            return QColor("#9ca3af")
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop
        if role == Qt.ItemDataRole.FontRole and index.column() == 0:
            font = QFont()
            font.setBold(True)
            return font
        return None


# --- the panel --------------------------------------------------------------------------------

class ComparePanel(QWidget):
    """Side-by-side outputs of model states on one prompt, or a grid of all eval prompts."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project_path: Path | None = None
        self.db = None
        self.cache: compare.ModelCache | None = None
        self.states: list[compare.StateInfo] = []
        self.eval_prompts: list[dict] = []
        self.custom_prompt: str | None = None
        self.outputs: dict[tuple, compare.Output] = {}  # by output_key; stored, generated or scored
        self.scored: set[tuple] = set()
        self.streaming: dict[tuple, str] = {}  # text so far of outputs being generated
        self.failed: dict[tuple, str] = {}  # not retried until refresh(): the error would repeat
        self.panes: list[Pane] = []
        self.relay = Relay()  # no parent: the running job keeps it alive, even past this panel
        self.relay.text.connect(self._on_text)
        self.relay.output.connect(self._on_output)
        self.relay.failed.connect(self._on_failed)
        self.relay.status.connect(self._set_status)
        self.job = None
        self.job_keys: list[tuple] = []
        self.cancel: threading.Event | None = None
        self.refill = False  # the view changed while a job ran: fill again when it ends
        self.fill_timer = QTimer(self)
        self.fill_timer.setSingleShot(True)
        self.fill_timer.setInterval(GENERATE_DELAY_MS)
        self.fill_timer.timeout.connect(self._start_fill)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(6, 6, 6, 6)
        self.stack = QStackedWidget()
        outer.addWidget(self.stack)
        self.no_project = EmptyState("fa6s.code-compare", "No project open",
                                     "Open a project to compare what its model states say.")
        self.stack.addWidget(self.no_project)
        self.content = QWidget()
        self.stack.addWidget(self.content)
        self._build_content()
        self.stack.setCurrentWidget(self.no_project)

    def _build_content(self) -> None:
        layout = QVBoxLayout(self.content)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)

        prompt_row = QHBoxLayout()
        prompt_row.addWidget(bold(QLabel("Prompt")))
        self.prompt_box = QComboBox()
        self.prompt_box.setToolTip("An eval prompt (outputs stored at every checkpoint show at once)")
        self.prompt_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.prompt_box.setMinimumContentsLength(24)
        self.prompt_box.currentIndexChanged.connect(self._update_view)
        prompt_row.addWidget(self.prompt_box, 2)
        self.custom_edit = QLineEdit()
        self.custom_edit.setPlaceholderText("…or type a new prompt and press Enter")
        self.custom_edit.setClearButtonEnabled(True)
        self.custom_edit.returnPressed.connect(self.generate_custom)
        self.custom_edit.textChanged.connect(lambda text: self.generate_button.setEnabled(bool(text.strip())))
        prompt_row.addWidget(self.custom_edit, 3)
        self.generate_button = QPushButton(icon("fa6s.play"), "Generate")
        self.generate_button.setToolTip("Ask every pane's model state this prompt")
        self.generate_button.setEnabled(False)
        self.generate_button.clicked.connect(self.generate_custom)
        prompt_row.addWidget(self.generate_button)
        layout.addLayout(prompt_row)

        settings_row = QHBoxLayout()
        self.max_tokens_box = self._spin(QSpinBox(), "Max tokens", settings_row, 1, 4096)
        self.max_tokens_box.setToolTip("Most new tokens each response may have")
        self.temperature_box = self._spin(QDoubleSpinBox(), "Temperature", settings_row, 0.0, 2.0, 0.1)
        self.temperature_box.setToolTip("0 is greedy: the seed and top-p then change nothing")
        self.top_p_box = self._spin(QDoubleSpinBox(), "Top-p", settings_row, 0.05, 1.0, 0.05)
        self.seed_box = self._spin(QSpinBox(), "Seed", settings_row, 0, 2**31 - 1)
        self.reset_button = QToolButton()
        self.reset_button.setIcon(icon("fa6s.rotate-left"))
        self.reset_button.setAutoRaise(True)
        self.reset_button.setToolTip("Back to the settings the checkpoints sampled with (stored outputs)")
        self.reset_button.clicked.connect(self.reset_decoding)
        settings_row.addWidget(self.reset_button)
        settings_row.addSpacing(6)
        self.status = hint_label("")
        # A run's long name ("Generating: ppo-lr1e-3-kl0.05, checkpoint 4 ...") cannot wrap inside a
        # word: the label takes the room left and no more (the whole text is in its tooltip).
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        settings_row.addWidget(self.status, 1)
        layout.addLayout(settings_row)

        # The pane buttons share the prompt's row: one row less, and the rows above stay narrow
        # enough for the centre of a 1600 px window with both docks open.
        prompt_view_row = QHBoxLayout()
        self.prompt_view = QLabel()
        self.prompt_view.setWordWrap(True)
        self.prompt_view.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.prompt_view.setStyleSheet("background: #f3f4f6; border-radius: 4px; padding: 6px 8px;")
        prompt_view_row.addWidget(self.prompt_view, 1)
        prompt_view_row.addStretch(0)  # holds the buttons right while the grid hides the prompt
        self.add_button = QPushButton(icon("fa6s.plus"), "Add pane")
        self.add_button.clicked.connect(self.add_pane)
        prompt_view_row.addWidget(self.add_button)
        self.grid_button = QPushButton(icon("fa6s.table-cells"), "Grid")
        self.grid_button.setCheckable(True)
        self.grid_button.setToolTip("All eval prompts (rows) against the panes' model states (columns), stored outputs")
        self.grid_button.toggled.connect(self.set_grid_mode)
        prompt_view_row.addWidget(self.grid_button)
        layout.addLayout(prompt_view_row)

        self.view_stack = QStackedWidget()
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setChildrenCollapsible(False)
        self.view_stack.addWidget(self.splitter)
        self.grid_model = GridModel(self)
        self.grid_view = self._make_grid_view()
        grid_box = QWidget()
        grid_layout = QVBoxLayout(grid_box)
        grid_layout.setContentsMargins(0, 0, 0, 0)
        grid_layout.addWidget(hint_label("Greedy outputs stored at checkpoint time, for every eval prompt. "
                                         "Double-click a row to compare it side by side."))
        grid_layout.addWidget(self.grid_view)
        self.grid_box = grid_box
        self.view_stack.addWidget(grid_box)
        layout.addWidget(self.view_stack, 1)

    def _spin(self, box, label: str, row: QHBoxLayout, low, high, step=None):
        box.setRange(low, high)
        if step is not None:
            box.setSingleStep(step)
            box.setDecimals(2)
        box.setKeyboardTracking(False)  # typing "128" is one change, not three
        box.valueChanged.connect(self._update_view)
        row.addWidget(QLabel(label))
        row.addWidget(box)
        row.addSpacing(8)
        return box

    def _make_grid_view(self) -> QTableView:
        view = QTableView()
        view.setModel(self.grid_model)
        view.setWordWrap(True)
        view.setAlternatingRowColors(True)
        view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        view.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        view.horizontalHeader().setHighlightSections(False)
        view.verticalHeader().setVisible(False)
        view.setStyleSheet("QTableView::item { padding: 4px 6px; }")
        view.doubleClicked.connect(self._on_grid_double_click)
        # Wrapped rows are as tall as their text at the columns' current widths: re-fit on resize.
        self.grid_fit_timer = QTimer(self)
        self.grid_fit_timer.setSingleShot(True)
        self.grid_fit_timer.setInterval(50)
        self.grid_fit_timer.timeout.connect(view.resizeRowsToContents)
        view.horizontalHeader().sectionResized.connect(self.grid_fit_timer.start)
        return view

    # --- the interface the main window uses ---

    def set_project(self, project_path: Path | str | None) -> None:
        """Read from this project from now on (None: no project)."""
        self.cancel_generation()
        if self.db is not None:
            self.db.close()
        self.project_path = Path(project_path) if project_path is not None else None
        self.db = store.connect(self.project_path) if self.project_path is not None else None
        self.cache = compare.ModelCache() if self.project_path is not None else None
        self.custom_prompt = None
        self.states = []
        self.outputs, self.scored, self.streaming, self.failed = {}, set(), {}, {}
        for pane in list(self.panes):
            self._drop_pane(pane)
        if self.db is None:
            self.stack.setCurrentWidget(self.no_project)
            return
        self.reset_decoding()
        self.refresh()
        for state in compare.default_states(self.states):
            self._add_pane(state)
        self.stack.setCurrentWidget(self.content)

    def refresh(self) -> None:
        """Re-read model states and eval prompts (after a checkpoint or an import)."""
        if self.db is None:
            return
        self.outputs = {key: output for key, output in self.outputs.items() if not output.stored}
        self.scored &= set(self.outputs)
        self.failed = {}
        self.states = compare.model_states(self.db)
        self.eval_prompts = store.eval_prompts(self.db)
        for pane in self.panes:
            pane.set_states(self.states, pane.state)
        self._fill_prompt_box()
        self._update_view()

    def cancel_generation(self) -> None:
        """Stop the running job at its next token (closing the window, switching project)."""
        self.fill_timer.stop()
        self.refill = False
        if self.cancel is not None:
            self.cancel.set()

    @property
    def busy(self) -> bool:
        return self.job is not None or self.fill_timer.isActive()

    # --- user actions ---

    def add_pane(self) -> Pane | None:
        """A new pane on the first state no pane shows yet (up to four panes)."""
        shown = {pane.state for pane in self.panes}
        unshown = [info.state for info in self.states if info.state not in shown]
        return self._add_pane(unshown[0] if unshown else self.panes[-1].state)

    def _add_pane(self, state: int | None) -> Pane | None:
        if len(self.panes) >= MAX_PANES:
            return None
        pane = Pane()
        pane.set_states(self.states, state)
        pane.state_chosen.connect(self._update_view)
        pane.remove_clicked.connect(lambda: self.remove_pane(pane))
        self.panes.append(pane)
        self.splitter.addWidget(pane)
        self.splitter.setSizes([1000] * len(self.panes))  # equal widths
        self._update_view()
        return pane

    def remove_pane(self, pane: Pane) -> None:
        if len(self.panes) > MIN_PANES and pane in self.panes:
            self._drop_pane(pane)
            self._update_view()

    def generate_custom(self) -> None:
        text = self.custom_edit.text().strip()
        if not text:
            return
        self.custom_prompt = text
        self._fill_prompt_box(select_custom=True)
        self._update_view()
        self._start_fill()  # the user asked: no settling delay

    def reset_decoding(self) -> None:
        decoding = compare.stored_decoding(self.db) if self.db is not None else compare.DEFAULT_DECODING
        boxes = (self.max_tokens_box, self.temperature_box, self.top_p_box, self.seed_box)
        for box, name in zip(boxes, compare.DECODING_KEYS):
            box.blockSignals(True)
            box.setValue(decoding[name])
            box.blockSignals(False)
        self._update_view()

    def set_grid_mode(self, on: bool) -> None:
        self.grid_button.setChecked(on)
        self.view_stack.setCurrentWidget(self.grid_box if on else self.splitter)
        # The grid shows stored outputs of every eval prompt: prompt and decoding controls do not apply.
        for widget in (self.prompt_box, self.custom_edit, self.max_tokens_box, self.temperature_box,
                       self.top_p_box, self.seed_box, self.reset_button):
            widget.setEnabled(not on)
        self.generate_button.setEnabled(not on and bool(self.custom_edit.text().strip()))
        self.prompt_view.setVisible(not on)
        self._update_view()

    # --- what is shown ---

    def current_prompt(self) -> tuple[Any, int | None]:
        """(prompt, its eval prompt id or None for the free-text prompt)."""
        data = self.prompt_box.currentData()
        if data == CUSTOM and self.custom_prompt:
            return [{"role": "user", "content": self.custom_prompt}], None
        for row in self.eval_prompts:
            if row["id"] == data:
                return row["prompt"], row["id"]
        return None, None

    def decoding(self) -> dict:
        return {"max_new_tokens": self.max_tokens_box.value(), "temperature": round(self.temperature_box.value(), 2),
                "top_p": round(self.top_p_box.value(), 2), "seed": self.seed_box.value()}

    def _fill_prompt_box(self, select_custom: bool = False) -> None:
        selected = CUSTOM if select_custom else self.prompt_box.currentData()
        self.prompt_box.blockSignals(True)
        self.prompt_box.clear()
        for row in self.eval_prompts:
            label = prompt_label(row["prompt"])
            self.prompt_box.addItem(one_line(label, 90), row["id"])
            self.prompt_box.setItemData(self.prompt_box.count() - 1, label, Qt.ItemDataRole.ToolTipRole)
        if self.custom_prompt:
            self.prompt_box.addItem(icon("fa6s.pen"), one_line(self.custom_prompt, 90), CUSTOM)
        index = self.prompt_box.findData(selected)
        self.prompt_box.setCurrentIndex(index if index >= 0 else 0)
        self.prompt_box.blockSignals(False)

    def _update_view(self) -> None:
        """Show what is known at once (generated earlier, or stored); start a job for the rest."""
        if self.db is None or not self.panes:
            return
        self._update_pane_roles()
        if self.view_stack.currentWidget() is self.grid_box:
            self._update_grid()
            return
        prompt, _ = self.current_prompt()
        self.prompt_view.setText(prompt_label(prompt) if prompt is not None else
                                 "No eval prompts in this project: type a prompt above.")
        self._render_panes()
        self.fill_timer.start()

    def _known_output(self, state: int | None) -> compare.Output | None:
        prompt, prompt_id = self.current_prompt()
        if prompt is None:
            return None
        key = output_key(self.project_path, state, prompt, self.decoding())
        if key not in self.outputs and prompt_id is not None:
            stored = compare.stored_outputs(self.db, state, [prompt_id], self.decoding())
            if prompt_id in stored:
                self.outputs[key] = stored[prompt_id]
        return self.outputs.get(key)

    def _render_panes(self) -> None:
        reference = None
        for position, pane in enumerate(self.panes):
            key = self.key_of(pane)
            output = self._known_output(pane.state)
            if output is None:
                self._render_missing(pane, key)
                continue
            if position == 0:
                reference = output.text
            notes = []
            if key in self.failed:
                notes.append(f'<span style="color:{DANGER}">reward and log-prob unavailable</span>')
            elif key not in self.scored:
                notes.append(f'<span style="color:{MUTED}">scoring…</span>')
            if position > 0 and output.text == reference:
                notes.append(f'<span style="color:{MUTED}">same text as the reference</span>')
            figures = figures_html(output.figures, output.stored, " · ".join(notes))
            body = diff_html(reference if position > 0 else None, output.text) if output.text else \
                message_html("(empty response)")
            tooltip = figures_tooltip(output.figures)
            pane.show_html(body, figures, f"{self.failed[key]}\n\n{tooltip}" if key in self.failed else tooltip)

    def key_of(self, pane: Pane) -> tuple | None:
        """The output a pane shows now (None without a prompt)."""
        prompt, _ = self.current_prompt()
        return output_key(self.project_path, pane.state, prompt, self.decoding()) if prompt is not None else None

    def _render_missing(self, pane: Pane, key: tuple | None) -> None:
        no_figures = f'<span style="color:{MUTED}">{{}}</span><br>&nbsp;'  # two lines, like figures_html
        if key is None:
            pane.show_html(message_html("No prompt to answer yet."), no_figures.format("no output"))
        elif key in self.failed:
            pane.show_html(message_html(f"Could not generate: {self.failed[key]}", DANGER),
                           no_figures.format("no output"))
        elif key in self.streaming:
            pane.show_html(f'<div style="white-space: pre-wrap">{html.escape(self.streaming[key])}▍</div>',
                           no_figures.format("generating…"))
        else:
            stored_prompt = self.current_prompt()[1] is not None
            pane.show_html(message_html("Not stored for these settings: generating…" if stored_prompt
                                        else "Generating…"), no_figures.format("waiting for the model…"))

    def _update_pane_roles(self) -> None:
        for position, pane in enumerate(self.panes):
            if position == 0:
                pane.set_role("reference", "The other panes highlight the words that differ from this one",
                              len(self.panes) > MIN_PANES)
            else:
                pane.set_role("", "", len(self.panes) > MIN_PANES)
        self.add_button.setEnabled(len(self.panes) < MAX_PANES)

    def _update_grid(self) -> None:
        states = list(dict.fromkeys(pane.state for pane in self.panes))
        labels = {info.state: info.label for info in self.states}
        prompt_ids = [row["id"] for row in self.eval_prompts]
        stored = {state: compare.stored_outputs(self.db, state, prompt_ids) for state in states}
        cells = [[stored[state][pid].text if pid in stored[state] else None for state in states]
                 for pid in prompt_ids]
        self.grid_model.set_grid([prompt_label(row["prompt"]) for row in self.eval_prompts],
                                 [labels.get(state, "?") for state in states], cells)
        header = self.grid_view.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        header.resizeSection(0, 240)
        self.grid_fit_timer.start()

    def _on_grid_double_click(self, index: QModelIndex) -> None:
        if 0 <= index.row() < len(self.eval_prompts):
            self.prompt_box.setCurrentIndex(self.prompt_box.findData(self.eval_prompts[index.row()]["id"]))
            self.set_grid_mode(False)

    def _drop_pane(self, pane: Pane) -> None:
        self.panes.remove(pane)
        pane.setParent(None)
        pane.deleteLater()

    # --- the background job ---

    def _start_fill(self) -> None:
        """Generate what the panes lack and score what is unscored, one job at a time."""
        self.fill_timer.stop()
        prompt, _ = self.current_prompt()
        if self.db is None or prompt is None or self.view_stack.currentWidget() is self.grid_box:
            return
        decoding = self.decoding()
        labels = {info.state: info.label for info in self.states}
        to_generate, to_score = [], []
        for state in dict.fromkeys(pane.state for pane in self.panes):
            key = output_key(self.project_path, state, prompt, decoding)
            output = self._known_output(state)
            if key in self.failed or key in self.scored:
                continue
            if output is None:
                to_generate.append((key, state, labels.get(state, "base")))
            else:
                to_score.append((key, output))
        keys = [key for key, *_ in to_generate] + [key for key, _ in to_score]
        if self.job is not None:
            if self.cancel.is_set() or not set(keys) <= set(self.job_keys):  # stop, then fill again
                self.cancel.set()
                self.refill = True
            return
        if not keys:
            self._set_status("")
            return
        self.cancel = threading.Event()
        self.job_keys = keys
        self.job = run_in_background(fill_outputs, self.project_path, self.cache, prompt, decoding,
                                     to_generate, to_score, self.relay, self.cancel,
                                     on_result=self._on_job_done, on_error=self._on_job_error)

    def _on_text(self, key: tuple, text: str) -> None:
        self.streaming[key] = text
        for pane in self.panes:  # only the panes streaming: this runs once per token
            if self.key_of(pane) == key and key not in self.outputs:
                self._render_missing(pane, key)

    def _on_output(self, key: tuple, output: compare.Output, scored: bool) -> None:
        self.streaming.pop(key, None)
        self.outputs[key] = output
        if scored:
            self.scored.add(key)
        self._render_panes()

    def _on_failed(self, key: tuple, message: str) -> None:
        self.streaming.pop(key, None)
        self.failed[key] = message
        self._render_panes()

    def _on_job_done(self, _result=None) -> None:
        self.job = None
        self.streaming.clear()
        self._set_status("")
        if self.refill:
            self.refill = False
            self._start_fill()
        self._render_panes()

    def _on_job_error(self, exc: BaseException) -> None:
        message = describe_error(exc)
        for key in self.job_keys:
            self.failed[key] = message
        self._on_job_done()
        self._set_status(message, DANGER)

    def _set_status(self, text: str, color: str = MUTED) -> None:
        self.status.setText(text)
        self.status.setToolTip(text)
        self.status.setStyleSheet(f"color: {color};")
