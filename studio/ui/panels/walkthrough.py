"""The walkthrough checklist: the demo's story (studio/core/story.py) as six steps, each ticked off
when the open project has its result, with where in the window to do it. Read-only: it opens its
own connection for each refresh, so it never holds the project's."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QFrame, QGridLayout, QLabel, QVBoxLayout, QWidget

from studio.core import store, story

from . import MUTED, OK, icon

WHERE = {
    "base": "Stage advisor tab → Sample the base. Many broken rules mean PPO first.",
    "ppo": "Run setup → method PPO → Start. The defaults are measured for this model size.",
    "advisor": "Stage advisor tab: the verdict quotes its numbers and names a checkpoint.",
    "label": "Stage advisor → Label pairs from that checkpoint, then the Label tab (keys A / B / T).",
    "dpo": "Stage advisor → Start DPO from that checkpoint.",
    "compare": "Compare tab: the base, the PPO checkpoint and the DPO checkpoint side by side.",
}
REFRESH_MS = 3000


class WalkthroughPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project_path: Path | None = None
        layout = QVBoxLayout(self)
        heading = QLabel("<b>Walkthrough: the idea in one sitting</b>")
        self.summary = QLabel()
        self.summary.setStyleSheet(f"color: {MUTED}")
        layout.addWidget(heading)
        layout.addWidget(self.summary)
        grid = QGridLayout()
        grid.setColumnStretch(2, 1)
        self.marks: dict[str, QLabel] = {}
        for row, (key, title) in enumerate(story.STAGES):
            mark = QLabel()
            number = QLabel(f"{row + 1}.")
            text = QLabel(f"<b>{title}</b><br><span style='color:{MUTED}'>{WHERE[key]}</span>")
            text.setWordWrap(True)
            grid.addWidget(mark, row, 0, Qt.AlignmentFlag.AlignTop)
            grid.addWidget(number, row, 1, Qt.AlignmentFlag.AlignTop)
            grid.addWidget(text, row, 2)
            self.marks[key] = mark
        layout.addLayout(grid)
        line = QFrame()
        line.setFrameShape(QFrame.Shape.HLine)
        layout.addWidget(line)
        headless = QLabel("Headless, the whole story in one command (Ctrl-C stops, the same command "
                          "continues): <code>studio demo DIR --story</code>")
        headless.setWordWrap(True)
        layout.addWidget(headless)
        layout.addStretch(1)
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.refresh)
        self.set_project(None)

    def set_project(self, project_path: Path | None) -> None:
        self.project_path = Path(project_path) if project_path else None
        self.refresh()
        if self.project_path is None:
            self.timer.stop()
        else:
            self.timer.start(REFRESH_MS)

    def status(self) -> dict[str, bool]:
        if self.project_path is None:
            return dict.fromkeys(self.marks, False)
        db = store.connect(self.project_path)
        try:
            return story.stage_status(db)
        finally:
            db.close()

    def refresh(self) -> None:
        done = self.status()
        for key, mark in self.marks.items():
            name, colour = ("fa6s.circle-check", OK) if done[key] else ("fa6r.circle", MUTED)
            mark.setPixmap(icon(name, colour).pixmap(18, 18))
            mark.setToolTip("done" if done[key] else "to do")
        count = sum(done.values())
        self.summary.setText("Open a project to follow the steps." if self.project_path is None
                             else f"{count} of {len(done)} steps done in this project.")
