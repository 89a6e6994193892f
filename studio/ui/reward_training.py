"""Run > Train a Reward Model from My Labels: trains ``rewards.train_reward_model`` in the thread pool,
its progress in the status bar, so a `trained_reward_model` reward source can be picked in the run setup.

The training opens its own database connection (read-only) and writes only its own folder under
``reward_models/``, so the window stays usable; Stop Reward Model Training ends it at the next step
and saves nothing.
"""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QInputDialog

from studio.core.progress import ProgressMeter

from .panels import show_message
from .workers import describe_error, run_in_background


class RewardTrainingActions(QObject):
    """The two Run menu actions (train, stop) and the one training that may be under way."""

    progress = Signal(str, int, int)  # emitted in the worker thread, shown in the GUI thread
    finished = Signal()

    def __init__(self, window) -> None:
        super().__init__(window)
        self.window = window
        self.stop_flag: threading.Event | None = None  # set while a training is under way
        self.meter = ProgressMeter()
        self.train_action = QAction("Train a &Reward Model from My Labels…", window)
        self.train_action.setStatusTip("Train a reward model on your labelled pairs; the run setup's reward "
                                       "sources can then use it as a trained_reward_model source")
        self.train_action.triggered.connect(lambda _checked=False: self.ask_and_train())
        self.stop_action = QAction("Stop Reward Model Training", window)
        self.stop_action.setStatusTip("End the reward model training at its next step; nothing is saved")
        self.stop_action.triggered.connect(lambda _checked=False: self.stop())
        self.progress.connect(self._show_progress)
        self.update_enabled()

    def update_enabled(self) -> None:
        training = self.stop_flag is not None
        self.train_action.setEnabled(self.window.project is not None and not training)
        self.stop_action.setEnabled(training)

    def ask_and_train(self) -> None:
        name, ok = QInputDialog.getText(self.window, "Train a Reward Model",
                                        "Name (a folder under the project's reward_models/):", text="from-labels")
        if ok and name.strip():
            self.train(name.strip())

    def train(self, name: str, epochs: int = 2):
        """Start training `name` in the background; returns the worker (None without a project)."""
        from studio.core import rewards

        if self.window.project is None or self.stop_flag is not None:
            return None
        self.stop_flag = threading.Event()
        self.update_enabled()
        self.window.statusBar().showMessage("Training the reward model: loading the base model…")
        settings = rewards.RewardModelTraining(name=name, epochs=epochs)
        return run_in_background(rewards.train_reward_model, self.window.project.path, settings,
                                 on_progress=self.progress.emit, stop=self.stop_flag,
                                 on_result=self._trained, on_error=self._failed)

    def stop(self) -> None:
        if self.stop_flag is not None:
            self.stop_flag.set()
            self.window.statusBar().showMessage("Stopping the reward model training at its next step…")

    def _show_progress(self, phase: str, done: int, total: int) -> None:
        if self.stop_flag is not None and not self.stop_flag.is_set():
            self.meter.update(phase, done, total)
            self.window.statusBar().showMessage(self.meter.text())

    def _done(self) -> None:
        self.stop_flag = None
        self.meter.clear()
        self.update_enabled()
        self.window.statusBar().clearMessage()
        self.finished.emit()

    def _trained(self, report: dict | None) -> None:
        self._done()
        if report is None:
            self.window.statusBar().showMessage("Reward model training stopped: nothing saved", 8000)
            return
        accuracy = report["heldout_accuracy"]
        measured = ("no pairs were held out to measure it" if accuracy is None else
                    f"it prefers the chosen answer in {accuracy:.0%} of {report['heldout_pairs']} held-out pairs")
        show_message(self.window, "Reward model trained",
                     f"Reward model '{report['name']}' trained on {report['train_pairs']} pairs; {measured}.\n\n"
                     f"Use it in a PPO run: add the reward source \"trained_reward_model\" with model "
                     f"'{report['name']}'.", level="info")

    def _failed(self, exc: BaseException) -> None:
        self._done()
        show_message(self.window, "Reward model training failed", describe_error(exc))
