"""The reward editor's live preview: the sources as edited, scored on a few of the base model's greedy
answers to the eval prompts (per source and weighted total), refreshed shortly after each edit.

Scoring runs in the thread pool (a model source loads a model; a rule with a token unit needs the base
tokenizer), so typing never waits on it. An edit made while a scoring runs is scored when it ends.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from . import DANGER, hint_label
from ..workers import describe_error, run_in_background

PREVIEW_SAMPLES = 4
THROTTLE_MS = 500  # scoring starts this long after the last edit
SHOWN_CHARACTERS = 70
ANSWER_COLUMN_WIDTH = 170  # pixels


def preview_samples(db, count: int = PREVIEW_SAMPLES) -> list[tuple[object, str]]:
    """(prompt, the base's greedy answer) for the first `count` eval prompts that have one."""
    from studio.core import advisor, store

    answers = advisor.greedy_outputs(db, None)
    return [(p["prompt"], answers[p["id"]]) for p in store.eval_prompts(db) if p["id"] in answers][:count]


@lru_cache(maxsize=2)
def base_tokenizer(base_model_json: str):
    from studio.core.models import ModelSource, load_tokenizer, resolve_folder

    return load_tokenizer(resolve_folder(ModelSource.from_json(json.loads(base_model_json))))


def score_preview(sources: list[dict], samples: list[tuple[object, str]], project_path: Path,
                  base_model_json: str) -> tuple[list[str], list[list[float]], list[float]]:
    """(source names, per sample its unweighted score per source, per sample the weighted total)."""
    from studio.core import rewards

    reward = rewards.RewardFunction(sources, base_tokenizer(base_model_json), project_path)
    total, breakdown = reward([prompt for prompt, _ in samples], [text for _, text in samples])
    per_source = [[breakdown[name][row].item() for name in reward.names] for row in range(len(samples))]
    return reward.names, per_source, total.tolist()


class RewardPreview(QWidget):
    """A table: one row per sample answer, a column per source (its weight in the header), the total."""

    scored = Signal()  # a scoring ended (shown or failed)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = None
        self.samples: list[tuple[object, str]] = []
        self.sources: list[dict] = []
        self.scoring = False  # a scoring is under way in the pool
        self.stale = False  # the sources changed while it ran
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(THROTTLE_MS)
        self.timer.timeout.connect(self._score)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.caption = hint_label()
        self.caption.setWordWrap(True)
        layout.addWidget(self.caption)
        self.table = QTableWidget(0, 0)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setMaximumSectionSize(ANSWER_COLUMN_WIDTH)  # the whole answer is in its tooltip
        self.table.setMaximumHeight(150)
        layout.addWidget(self.table)
        self._show_caption()

    def set_project(self, project) -> None:
        self.project = project
        self.set_sources(self.sources)

    def set_sources(self, sources: list[dict]) -> None:
        """Score `sources` once the edits pause for THROTTLE_MS."""
        self.sources = [dict(s) for s in sources]
        self.timer.start()

    def _show_caption(self, text: str | None = None, color: str | None = None) -> None:
        if text is None:
            text = ("Preview: open a project to score its base model's answers." if self.project is None else
                    "Preview: no base answers to score yet (the advisor's base sampling stores them)."
                    if not self.samples else
                    f"Preview: these sources on the base model's answers to {len(self.samples)} eval prompts.")
        self.caption.setText(text)
        self.caption.setStyleSheet(f"color: {color};" if color else "")

    def _score(self) -> None:
        if self.scoring:
            self.stale = True
            return
        self.samples = preview_samples(self.project.db) if self.project is not None else []  # base sampling adds them
        if self.project is None or not self.samples or not self.sources:
            self.table.setRowCount(0)
            self._show_caption()
            return
        from studio.core import rewards, store

        problems = rewards.check_sources(self.sources, self.project.path)
        if problems:
            self.table.setRowCount(0)
            self._show_caption("Preview: " + "; ".join(problems), DANGER)
            return
        self.scoring, self.stale = True, False
        self._show_caption("Preview: scoring…")  # the previous scores stay until the new ones arrive
        base_model_json = json.dumps(store.get_setting(self.project.db, "base_model"), sort_keys=True)
        run_in_background(score_preview, self.sources, self.samples, self.project.path, base_model_json,
                          on_result=self._show_scores, on_error=self._failed)

    def _finished(self) -> bool:
        """End this scoring; True when its result is still the one to show."""
        self.scoring = False
        if self.stale:
            self._score()
            return False
        return True

    def _show_scores(self, result: tuple[list[str], list[list[float]], list[float]]) -> None:
        if self._finished():
            names, per_source, totals = result
            weights = [float(s.get("weight", 1.0)) for s in self.sources]
            self.table.setColumnCount(len(names) + 2)
            self.table.setHorizontalHeaderLabels(  # the total first: the dock is narrow, sources scroll
                ["Base answer", "Total"] + [f"{name} ×{weight:g}" for name, weight in zip(names, weights)])
            self.table.setRowCount(len(self.samples))
            for row, ((_, text), scores, total) in enumerate(zip(self.samples, per_source, totals)):
                answer = QTableWidgetItem(" ".join(text.split())[:SHOWN_CHARACTERS])
                answer.setToolTip(text)
                self.table.setItem(row, 0, answer)
                for column, value in enumerate([total, *scores], start=1):
                    self.table.setItem(row, column, QTableWidgetItem(f"{value:.3g}"))
            self._show_caption()
        self.scored.emit()

    def _failed(self, exc: BaseException) -> None:
        if self._finished():
            self._show_caption(f"Preview: {describe_error(exc)}", DANGER)
        self.scored.emit()
