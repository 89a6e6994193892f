"""Background work for the window: training runs in child processes followed from a QThread,
one-off jobs in a thread pool.

* :class:`RunWorker` follows one training run, which trains in a child process
  (``studio.core.run_process``: in the window's own process its GIL-holding C calls would freeze
  the window), and turns its messages into signals. It never touches a widget.
* :class:`RunQueue` runs queued runs one after another (one GPU), with reorder and cancel.
* :func:`run_in_background` runs a plain function in superqt's thread pool (model inspection, file
  previews, importing torch after the window is up) and delivers its result as a signal.
* :func:`describe_error` (from ``studio.core.errors``) turns an exception into a message a person
  can act on.

``studio.core.runs`` imports torch, so it is only imported inside functions: importing this module
stays cheap and the window appears fast.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Qt, Signal, Slot

from studio.core.errors import describe_error

# --- one-off jobs -----------------------------------------------------------------------------

def run_in_background(fn: Callable, *args: Any, on_result: Callable | None = None,
                      on_error: Callable[[BaseException], None] | None = None, **kwargs: Any):
    """Run ``fn(*args, **kwargs)`` in superqt's thread pool; the callbacks run in the GUI thread.

    Connect bound methods of QObjects (they are disconnected when the object is deleted) rather
    than lambdas that capture widgets. Returns the superqt worker.
    """
    from superqt.utils import create_worker

    # superqt re-raises a worker's exception in the GUI thread unless told not to: with on_error the
    # error is handled, and re-raising it would also send a traceback to the excepthook.
    worker = create_worker(fn, *args, _start_thread=False, _ignore_errors=on_error is not None, **kwargs)
    if on_result is not None:
        worker.returned.connect(on_result)
    if on_error is not None:
        worker.errored.connect(on_error)
    worker.start()
    return worker


def wait_for_background_jobs(msecs: int = 30000) -> bool:
    """Block until the pool's jobs end (at shutdown and in tests); False on a timeout."""
    from PySide6.QtCore import QThreadPool

    return QThreadPool.globalInstance().waitForDone(msecs)


def load_engines(methods: tuple[str, ...] = ("dpo", "ppo", "grpo", "rloo")) -> dict:
    """Import torch, the engines and the reward catalogue (slow: call it in the background).

    Returns {"device": (device, dtype), "engines": {method: module or error text},
    "train_fields": names of the settings every engine shares, "rewards": catalogue or {}}.
    """
    import dataclasses

    from studio.core import models, runs

    engines: dict[str, Any] = {}
    for method in methods:
        try:
            engines[method] = runs.engine_module(method)
        except Exception as exc:  # an engine being written, or a broken install
            engines[method] = describe_error(exc) if not isinstance(exc, ImportError) else (
                f"The {method.upper()} engine is not available in this installation ({exc}).")
    try:
        from studio.core import rewards

        catalogue = rewards.describe_sources()
    except Exception:
        catalogue = {}
    try:
        device = models.pick_device("auto")
    except Exception as exc:
        device = ("unknown", describe_error(exc))
    return {"device": device, "engines": engines, "rewards": catalogue,
            "train_fields": [f.name for f in dataclasses.fields(runs.TrainConfig)]}


# --- training runs ----------------------------------------------------------------------------

class RunWorker(QObject):
    """Follows one training run, which trains in a child process (``studio.core.run_process``).

    Create it in the GUI thread, move it to a QThread, start ``run``: it starts the child and turns
    its messages into signals. ``control.pause()``, ``resume()`` and ``stop()`` work from any thread;
    the run honours them between steps (a stop saves a checkpoint first).
    """

    # The child's messages, by kind, become these signals (each with the run id first).
    metrics = Signal(int, dict)  # run id, step record ({"step", "time", metric: value, ...})
    log = Signal(int, str)
    progress = Signal(int, str, int, int)  # run id, phase, done, total: a long phase before or between steps
    paused = Signal(int)  # the run is really waiting now (after the step in progress)
    resumed = Signal(int)
    finished = Signal(int, str)  # run id, final status: "completed" | "stopped"
    failed = Signal(int, str)  # run id, readable message (the run is marked failed in the store)
    done = Signal()  # after finished or failed: the thread may quit

    def __init__(self, project_path: Path | str, run_id: int) -> None:
        super().__init__()
        from studio.core.run_process import RunProcess

        self.project_path = Path(project_path)
        self.run_id = run_id
        # Leave one core to the window: torch spinning on every core starves the GUI thread.
        self.process = RunProcess(project_path, run_id, threads=max(1, (os.cpu_count() or 2) - 1))
        self.control = self.process.control

    @Slot()
    def run(self) -> None:
        try:
            for kind, *args in self.process.messages():
                getattr(self, kind).emit(self.run_id, *args)
        except Exception as exc:  # the child could not start: say so, the window stays usable
            from studio.core.run_process import mark_failed

            self.log.emit(self.run_id, "".join(traceback.format_exception(exc)).rstrip())
            mark_failed(self.project_path, self.run_id, f"{type(exc).__name__}: {exc}")
            self.failed.emit(self.run_id, describe_error(exc))
        finally:
            self.done.emit()


class RunQueue(QObject):
    """Runs queued runs one after another in a background QThread.

    The queue holds run ids waiting to start; ``current`` is the one running (or paused). Worker
    signals are forwarded with the run id, so the window connects once, here.
    """

    queue_changed = Signal(list)  # run ids waiting, in order (the current run excluded)
    started = Signal(int)
    metrics = Signal(int, dict)
    log = Signal(int, str)
    progress = Signal(int, str, int, int)
    paused = Signal(int)
    resumed = Signal(int)
    finished = Signal(int, str)
    failed = Signal(int, str)
    cancelled = Signal(int)  # removed from the queue before it started (marked stopped)
    idle = Signal()  # nothing running and nothing waiting

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._project_path: Path | None = None
        self._queued: list[int] = []
        self._worker: RunWorker | None = None
        self._thread: QThread | None = None
        self._stopping_all = False

    # --- state ---
    @property
    def project_path(self) -> Path | None:
        return self._project_path

    def set_project(self, project_path: Path | str | None) -> None:
        if self.busy:
            raise RuntimeError("Stop the running run before switching projects")
        self._project_path = Path(project_path) if project_path else None
        if self._queued:
            self._queued = []
            self.queue_changed.emit([])

    @property
    def current(self) -> int | None:
        return self._worker.run_id if self._worker is not None else None

    @property
    def queued(self) -> list[int]:
        return list(self._queued)

    @property
    def busy(self) -> bool:
        return self._thread is not None or bool(self._queued)

    @property
    def is_paused(self) -> bool:
        return self._worker is not None and self._worker.control.paused

    @property
    def stopping_now(self) -> bool:
        return self._worker is not None and self._worker.process.stopping_now

    @property
    def stopping(self) -> bool:
        return self._worker is not None and (self._worker.control.stop_requested or self._worker.process.stopping_now)

    # --- the queue ---
    def enqueue(self, run_id: int) -> bool:
        """Queue a run (a new one, or a stopped/failed/interrupted one to resume); False if already there."""
        if self._project_path is None:
            raise RuntimeError("No project is open")
        if run_id == self.current or run_id in self._queued:
            return False
        self._stopping_all = False
        self._queued.append(run_id)
        self.queue_changed.emit(list(self._queued))
        self._start_next()
        return True

    def cancel(self, run_id: int) -> bool:
        """Take a waiting run out of the queue and mark it stopped; False if it is not waiting."""
        if run_id not in self._queued:
            return False
        self._queued.remove(run_id)
        self._set_status(run_id, "stopped")
        self.queue_changed.emit(list(self._queued))
        self.cancelled.emit(run_id)
        self._emit_idle_if_idle()
        return True

    def move(self, run_id: int, offset: int) -> bool:
        """Move a waiting run `offset` places (negative: earlier)."""
        if run_id not in self._queued:
            return False
        index = self._queued.index(run_id)
        new_index = max(0, min(len(self._queued) - 1, index + offset))
        if new_index == index:
            return False
        self._queued.insert(new_index, self._queued.pop(index))
        self.queue_changed.emit(list(self._queued))
        return True

    def reorder(self, run_ids: list[int]) -> None:
        """Set the order of the waiting runs (the same ids, in a new order)."""
        if sorted(run_ids) != sorted(self._queued):
            raise ValueError("reorder needs exactly the queued run ids")
        self._queued = list(run_ids)
        self.queue_changed.emit(list(self._queued))

    # --- the current run ---
    def pause(self) -> None:
        if self._worker is not None:
            self._worker.control.pause()

    def resume(self) -> None:
        if self._worker is not None:
            self._worker.control.resume()

    def stop(self) -> None:
        """Stop the current run at the next step boundary (a checkpoint is saved); the queue goes on."""
        if self._worker is not None:
            self._worker.control.stop()

    def stop_now(self) -> None:
        """End the current run's process now, in any phase; it resumes from its last checkpoint."""
        if self._worker is not None:
            self._worker.process.stop_now()

    def stop_all(self, now: bool = False) -> None:
        """Cancel every waiting run and stop the current one (closing the window, switching project):
        after its step with a checkpoint, or `now`."""
        self._stopping_all = True
        for run_id in list(self._queued):
            self.cancel(run_id)
        if now:
            self.stop_now()
        else:
            self.stop()
        self._emit_idle_if_idle()

    def wait(self, msecs: int = 60000) -> bool:
        """Block until the current run's thread ends (a last resort: signals wait meanwhile)."""
        thread = self._thread
        return thread is None or thread.wait(msecs)

    # --- internals ---
    def _start_next(self) -> None:
        if self._thread is not None or not self._queued or self._project_path is None:
            return
        run_id = self._queued.pop(0)
        self.queue_changed.emit(list(self._queued))
        worker = RunWorker(self._project_path, run_id)
        thread = QThread()
        thread.setObjectName(f"run-{run_id}")
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.done.connect(thread.quit, Qt.ConnectionType.DirectConnection)
        for name in ("metrics", "log", "progress", "paused", "resumed", "finished", "failed"):
            getattr(worker, name).connect(getattr(self, name))
        thread.finished.connect(self._on_thread_finished)
        self._worker, self._thread = worker, thread
        thread.start()
        self.started.emit(run_id)

    @Slot()
    def _on_thread_finished(self) -> None:
        worker, thread = self._worker, self._thread
        self._worker = self._thread = None
        if worker is not None:
            worker.deleteLater()
        if thread is not None:
            thread.deleteLater()
        if self._stopping_all:
            for run_id in list(self._queued):
                self.cancel(run_id)
        self._start_next()
        self._emit_idle_if_idle()

    def _emit_idle_if_idle(self) -> None:
        if not self.busy:
            self.idle.emit()

    def _set_status(self, run_id: int, status: str) -> None:
        if self._project_path is None:
            return
        from studio.core import store

        db = store.connect(self._project_path)
        try:
            store.set_run_status(db, run_id, status)
        finally:
            db.close()
