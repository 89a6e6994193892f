"""Window actions for running past one machine: bundle a run, import (and follow) a bundle or a
TRL / OpenRLHF / verl output folder, and launch a run on N local GPUs through torchrun (shown with 2+ CUDA devices).

The work is ``studio.core.bundles``; this module only asks for folders, runs the imports in the
thread pool (each with its own database connection) and refreshes the runs list and charts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from PySide6.QtCore import QObject, QTimer
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QFileDialog, QInputDialog, QMenu

from .panels import show_message
from .workers import describe_error, run_in_background

FOLLOW_INTERVAL_MS = 2000


def import_once(project_path: Path, source: Path) -> tuple[int, str]:
    """(run id, status) after importing `source` once, on a connection of this thread."""
    from studio.core import bundles, store

    db = store.connect(project_path)
    try:
        run_id = bundles.import_run(db, project_path, source)
        return run_id, store.get_run(db, run_id)["status"]
    finally:
        db.close()


def bundle_name(run_id: int) -> str:
    return f"bundle-run-{run_id}-{time.strftime('%Y%m%d-%H%M%S')}"


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


class ScaleOutActions(QObject):
    """The "Past One Machine" submenu of the Run menu."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.window = window
        self.followed: dict[Path, QTimer] = {}  # source folder -> its import timer
        self.menu = QMenu("Past One &Machine", window)
        self.bundle_action = self._add("&Bundle Selected Run…", self.bundle_selected,
                                       "Write the selected run as a folder another machine can train")
        self.import_action = self._add("&Import Run or Bundle…", lambda: self.choose_import(follow=False),
                                       "Bring a bundle, or a TRL, OpenRLHF or verl output folder, back as a run")
        self.follow_action = self._add("&Follow Bundle…", lambda: self.choose_import(follow=True),
                                       "Import a bundle every few seconds while it trains, so its charts stay live")
        self.launch_action = self._add("&Launch on GPUs…", self.launch_on_gpus,
                                       "Train the selected run data-parallel on this machine's GPUs (torchrun)")
        self.launch_action.setVisible(False)  # until the engines report more than one CUDA device

    def _add(self, text: str, slot, tip: str) -> QAction:
        action = QAction(text, self.window)
        action.setStatusTip(tip)
        action.triggered.connect(lambda _checked=False: slot())
        self.menu.addAction(action)
        return action

    def show_gpu_launch(self, devices: int) -> None:
        self.launch_action.setVisible(devices > 1)
        self.gpu_count = devices

    def update_enabled(self) -> None:
        has_project = self.window.project is not None
        selected = has_project and len(self.window.runs_panel.selected_run_ids()) == 1
        for action in (self.import_action, self.follow_action):
            action.setEnabled(has_project)
        for action in (self.bundle_action, self.launch_action):
            action.setEnabled(selected)

    # -- bundle --

    def bundle_selected(self, out: Path | None = None, then=None) -> None:
        """Write the selected run as a bundle in the thread pool (it copies the model); `then(out)` after."""
        project, run_ids = self.window.project, self.window.runs_panel.selected_run_ids()
        if project is None or len(run_ids) != 1:
            return
        if out is None:
            chosen = QFileDialog.getExistingDirectory(self.window, "Folder to write the bundle in",
                                                      str(project.exports_dir))
            if not chosen:
                return
            out = Path(chosen) / bundle_name(run_ids[0])
        from studio.core import bundles

        self.window.statusBar().showMessage(f"Writing the bundle {out}…")
        run_in_background(bundles.make_bundle, project.path, run_ids[0], out,
                          on_result=lambda path: self._bundled(path, then),
                          on_error=lambda exc: show_message(self.window, "Bundle failed", describe_error(exc)))

    def _bundled(self, out: Path, then) -> None:
        self.window.statusBar().showMessage(f"Bundle written to {out}: studio run-bundle {out}", 10000)
        if then is not None:
            then(out)

    # -- import and follow --

    def choose_import(self, follow: bool) -> None:
        if self.window.project is None:
            return
        chosen = QFileDialog.getExistingDirectory(self.window, "Bundle, or TRL / OpenRLHF / verl output folder")
        if chosen:
            self.start_import(Path(chosen), follow)

    def start_import(self, source: Path, follow: bool) -> None:
        if follow and source not in self.followed:
            timer = QTimer(self)
            timer.setInterval(FOLLOW_INTERVAL_MS)
            timer.timeout.connect(lambda: self._import(source))
            self.followed[source] = timer
            timer.start()
        self._import(source)

    def _import(self, source: Path) -> None:
        project = self.window.project
        if project is None:
            self.stop_following(source)
            return
        run_in_background(import_once, project.path, source,
                          on_result=lambda result: self._imported(source, *result),
                          on_error=lambda exc: self._import_failed(source, exc))

    def _imported(self, source: Path, run_id: int, status: str) -> None:
        if status in ("completed", "stopped", "failed"):
            self.stop_following(source)
        self.window.runs_panel.refresh()
        selected = self.window.runs_panel.selected_run_ids()
        if run_id in selected:
            self.window.charts.show_runs(selected)  # redraw from the store
        self.window.statusBar().showMessage(f"Imported {source.name} as run {run_id} ({status})", 5000)

    def _import_failed(self, source: Path, exc: BaseException) -> None:
        self.stop_following(source)
        show_message(self.window, "Import failed", describe_error(exc))

    def stop_following(self, source: Path) -> None:
        timer = self.followed.pop(source, None)
        if timer is not None:
            timer.stop()

    # -- N GPUs --

    def launch_on_gpus(self) -> None:
        """Bundle the selected run into the project's exports, train it with torchrun on N GPUs, follow it."""
        most = max(getattr(self, "gpu_count", 2), 1)
        devices, ok = QInputDialog.getInt(self.window, "Launch on GPUs", "Processes (one per GPU):", most, 1, most)
        if ok and self.window.project is not None:
            out = self.window.project.exports_dir / bundle_name(self.window.runs_panel.selected_run_ids()[0])
            self.bundle_selected(out, then=lambda bundle: self.launch_bundle(bundle, devices))

    def launch_bundle(self, bundle: Path, devices: int) -> subprocess.Popen:
        """`torchrun --nproc_per_node DEVICES -m studio run-bundle BUNDLE` (log in the bundle), followed."""
        with open(bundle / "launch.log", "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        f"--nproc_per_node={devices}", "-m", "studio", "run-bundle", str(bundle)],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.start_import(bundle, follow=True)
        return process
