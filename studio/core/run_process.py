"""A training run in a child process, so the process that launched it (the window) never waits on it.

A run in a thread of the window's own process shares the GIL with the event loop, and some of its
C calls hold the GIL for 100 ms or more (first imports, building a tokenizer, ``torch.save`` at a
checkpoint): the window freezes that long. A run in its own process cannot freeze the window.

The child runs :func:`studio.core.runs.execute` and reports over a pipe, as small tuples:

    ("metrics", record)   ("log", text)   ("paused",)   ("resumed",)
    ("progress", phase, done, total)   -- a long phase: model load, reference pass, eval samples
    ("finished", status)  or  ("failed", readable message)   -- always the last one

It is started with "spawn" (a fresh interpreter: forking a process that has Qt and torch threads
is unsafe). Pause, resume and stop go the other way through two shared flags (``RunControl`` built
on multiprocessing events). The child watches its parent: if the parent dies, the run stops at the
next step boundary and saves a checkpoint, as if it had been asked to.

Stop has two strengths: ``control.stop()`` stops after the step in progress and saves a checkpoint;
:meth:`RunProcess.stop_now` ends the child at once, in any phase (model load, reference pass, eval
sampling), and the run is marked stopped: it resumes from its last registered checkpoint (every
file is written aside and renamed into place, so nothing half-written is ever read back).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from pathlib import Path
from typing import Iterator

from . import runs, store
from .errors import describe_error

SPAWN = multiprocessing.get_context("spawn")


class RunProcess:
    """Run `run_id` of a project in a child process with `threads` torch threads.

    ``control`` takes pause / resume / stop from any thread of this process. Iterate
    :meth:`messages` (in a background thread: it blocks) to start the child and follow it.
    """

    def __init__(self, project_path: Path | str, run_id: int, threads: int = 1) -> None:
        self.project_path, self.run_id = Path(project_path), run_id
        self.control = runs.RunControl(SPAWN.Event)
        self._stopped_now = False
        self._receiver, self._sender = SPAWN.Pipe(duplex=False)
        # The engine registry travels along, so engines registered at run time are found there too.
        self._process = SPAWN.Process(
            target=_child_main, name=f"studio-run-{run_id}", daemon=True,
            args=(str(self.project_path), run_id, self.control.stop_flag, self.control.run_flag,
                  self._sender, dict(runs.ENGINE_MODULES), threads, os.getpid()))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def stopping_now(self) -> bool:
        return self._stopped_now

    def stop_now(self) -> None:
        """End the child now (from any thread); :meth:`messages` then reports the run stopped."""
        self._stopped_now = True
        if self._process.pid is not None and self._process.exitcode is None:
            self._process.kill()

    def messages(self) -> Iterator[tuple]:
        """Start the child and yield its messages until it ends; the last is "finished" or "failed"."""
        self._process.start()
        self._sender.close()  # only the child writes now, so end-of-file below means it has ended
        final = None
        while True:
            try:
                message = self._receiver.recv()
            except EOFError:
                break
            if message[0] in ("finished", "failed"):
                final = message
            yield message
        self._process.join()
        self._receiver.close()
        if final is None and self._stopped_now:
            step = mark_stopped_now(self.project_path, self.run_id)
            yield ("log", f"Stopped now; resuming continues from the last checkpoint (step {step})")
            yield ("finished", "stopped")
        elif final is None:  # killed, or crashed below Python: the store still says "running"
            text = f"The training process ended unexpectedly (exit code {self._process.exitcode})."
            mark_failed(self.project_path, self.run_id, text)
            yield ("failed", text + " Its last checkpoint is intact: resume the run to continue from it.")


def mark_stopped_now(project_path: Path | str, run_id: int) -> int:
    """Mark a run whose child was ended on request stopped; returns the step it will resume from."""
    db = store.connect(project_path)
    try:
        store.set_run_status(db, run_id, "stopped")
        checkpoints = store.checkpoints(db, run_id)
        return checkpoints[-1]["step"] if checkpoints else 0
    finally:
        db.close()


def mark_failed(project_path: Path | str, run_id: int, error: str) -> None:
    """Mark a run failed unless it already is (``execute`` marks the failures it sees itself)."""
    db = store.connect(project_path)
    try:
        if store.get_run(db, run_id)["status"] != "failed":
            store.set_run_status(db, run_id, "failed", error=error)
    finally:
        db.close()


class _ChildControl(runs.RunControl):
    """The parent's flags as the child sees them: it says when the run really waits, and it stops
    the run when the parent has died."""

    def __init__(self, stop_flag, run_flag, send, parent_pid: int) -> None:
        self.stop_flag, self.run_flag = stop_flag, run_flag
        self._send, self._parent_pid = send, parent_pid

    def _orphaned(self) -> bool:
        return os.getppid() != self._parent_pid

    @property
    def stop_requested(self) -> bool:
        return self.stop_flag.is_set() or self._orphaned()

    def wait_while_paused(self) -> None:
        self._send(("paused",))
        while not self.run_flag.wait(timeout=1.0):
            if self._orphaned():
                return
        self._send(("resumed",))


def _child_main(project_path: str, run_id: int, stop_flag, run_flag, sender, engine_modules: dict,
                threads: int, parent_pid: int) -> None:
    # Ctrl+C in a terminal reaches the whole process group: the parent decides, and stops the run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def send(message: tuple) -> None:
        try:
            sender.send(message)
        except OSError:  # the parent has gone: the run goes on to its stop and checkpoint
            pass

    try:
        import torch

        torch.set_num_threads(threads)
        runs.ENGINE_MODULES.update(engine_modules)
        control = _ChildControl(stop_flag, run_flag, send, parent_pid)
        status = runs.execute(project_path, run_id, control,
                              on_metrics=lambda record: send(("metrics", record)),
                              on_log=lambda text: send(("log", text)),
                              on_progress=lambda phase, done, total: send(("progress", phase, done, total)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        send(("log", "".join(traceback.format_exception(exc)).rstrip()))
        mark_failed(project_path, run_id, f"{type(exc).__name__}: {exc}")
        send(("failed", describe_error(exc)))
    else:
        send(("finished", status))
    finally:
        sender.close()
