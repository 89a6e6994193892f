"""Send a run's metrics to the experiment trackers people already watch: TensorBoard, Trackio, W&B.

`report_to` (a run setting; when a run leaves it unset, the project setting of the same name) lists
the trackers. Each receives every metric record under the store's names (TRL's) on the same step
axis, the run's config as hyper-parameters, and every checkpoint's greedy eval samples as a table
(TensorBoard has no table type: there they are a markdown table in its Text tab).

Trackers are optional extras (``pip install "alignment-studio[tensorboard]"``). One that is not
installed, or fails later (disk full, not logged in), is reported once in the run's log and dropped;
the run itself goes on. Where each writes:

* tensorboard: event files in ``runs/<id>/tensorboard`` (``tensorboard --logdir PROJECT/runs``);
* trackio: Trackio's local store (``~/.cache/huggingface/trackio``; ``trackio show``);
* wandb: W&B as the user configured it (``WANDB_MODE=offline`` needs no network); files in the
  run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import store
from .errors import StudioError

TRACKERS = {"tensorboard": "TensorBoard", "trackio": "Trackio", "wandb": "W&B"}
NOT_METRICS = ("step", "time")  # the record's axis fields, not values to plot


class TrackerError(StudioError):
    """A `report_to` value that names no tracker, with a message meant for the user."""


def parse_report_to(value) -> list[str]:
    """"tensorboard,trackio", a list of names, or "none" / "" -> the tracker names, in order."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(name).strip().lower() for name in names]
    names = [name for name in names if name and name != "none"]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise TrackerError(f"Unknown tracker(s) in report_to: {', '.join(unknown)} "
                           f"(expected any of {', '.join(TRACKERS)}, or none)")
    return list(dict.fromkeys(names))


def report_to(db, run_config: dict) -> list[str]:
    """The trackers a run reports to: its own `report_to`, else the project's setting."""
    own = run_config.get("report_to")
    return parse_report_to(own if own is not None else store.get_setting(db, "report_to", []))


@dataclass(frozen=True)
class RunInfo:
    """What a tracker is told about the run it follows."""

    project: str  # the studio project's name
    run_id: int
    run_name: str
    run_dir: Path
    config: dict
    start_step: int = 0  # > 0 when resuming: the tracker drops what it holds after this step

    @property
    def unique_id(self) -> str:
        """Stable across resumes of this run, distinct between projects that share a name."""
        folder = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:8]
        return f"studio-{folder}-{self.run_id}"


def _plain_text(prompt) -> str:
    if isinstance(prompt, list):  # conversational: the messages, one per line
        return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)
    return str(prompt)


def _hyperparameter(value):
    """Trackers take scalars and strings; lists and None are shown as their JSON."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


# --- the trackers: each opens in __init__ and raises whatever its library raises ----------------

class TensorBoard:
    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError names the missing package
        from torch.utils.tensorboard.summary import hparams

        # purge_step: events a killed run wrote after its last checkpoint are hidden on resume.
        # flush_secs: a dashboard open during the run sees each step within seconds.
        self.writer = SummaryWriter(run.run_dir / "tensorboard", flush_secs=5,
                                    purge_step=run.start_step + 1 if run.start_step else None)
        if not run.start_step:
            for summary in hparams({k: _hyperparameter(v) for k, v in run.config.items()}, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```json\n" + json.dumps(run.config, indent=2) + "\n```")

    def log(self, step: int, metrics: dict, walltime: float) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step, walltime=walltime)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("eval_samples", _markdown_table(rows), global_step=step)

    def close(self) -> None:
        self.writer.close()


def _markdown_table(rows: list[dict]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | completion |", "|---|---|"]
    lines += [f"| {cell(row['prompt'])} | {cell(row['completion'])} |" for row in rows]
    return "\n".join(lines)


class WandbLike:
    """Trackio copies W&B's API: `run.log(dict, step=)` and a `Table(columns, data)` type."""

    library = None  # the imported module: trackio or wandb
    run = None

    def log(self, step: int, metrics: dict, walltime: float) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        table = self.library.Table(columns=["prompt", "completion"],
                                   data=[[row["prompt"], row["completion"]] for row in rows])
        self.run.log({"eval_samples": table}, step=step)


class Trackio(WandbLike):
    def __init__(self, run: RunInfo) -> None:
        import trackio

        self.library = trackio
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would interleave with our log
            self.run = trackio.init(project=run.project, name=f"{run.run_name} ({run.unique_id})",
                                    config=run.config, resume="allow", embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.library.finish()  # the module's: it also forgets the run, so exit does not finish it again


class Wandb(WandbLike):
    def __init__(self, run: RunInfo) -> None:
        import wandb

        self.library = wandb
        # login_timeout: a missing login fails after a short prompt instead of holding the run.
        self.run = wandb.init(project=run.project, name=run.run_name, id=run.unique_id, resume="allow",
                              config=run.config, dir=run.run_dir,
                              settings=wandb.Settings(login_timeout=10, silent=True))

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": Wandb}


# --- what a run talks to ------------------------------------------------------------------------

class Reporter:
    """Fans records out to the open trackers; a tracker that raises is reported once and dropped."""

    def __init__(self, names: list[str], run: RunInfo, log: Callable[[str], None]) -> None:
        self.trackers: dict[str, object] = {}
        self.log_line = log
        for name in names:
            try:
                self.trackers[name] = OPENERS[name](run)
            except ImportError as exc:
                log(f"{TRACKERS[name]} is not installed ({exc}); this run does not report to it. "
                    f'Install it with: pip install "alignment-studio[{name}]"')
            except Exception as exc:  # each library raises its own types
                self._report(name, exc)
        if self.trackers:
            log("Reporting metrics to " + ", ".join(TRACKERS[name] for name in self.trackers))

    def _report(self, name: str, exc: BaseException) -> None:
        self.log_line(f"{TRACKERS[name]} failed ({type(exc).__name__}: {exc}); "
                      "the run goes on without it")

    def _each(self, action: Callable[[object], None]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                action(tracker)
            except Exception as exc:
                del self.trackers[name]
                self._report(name, exc)
                with contextlib.suppress(Exception):
                    tracker.close()

    def log(self, record: dict) -> None:
        """One step record as the store gets it: {"step", "time", metric name: value, ...}."""
        metrics = {name: value for name, value in record.items() if name not in NOT_METRICS}
        self._each(lambda tracker: tracker.log(record["step"], metrics, record["time"]))

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """A checkpoint's eval samples: rows of {"prompt", "completion"}."""
        if rows:
            self._each(lambda tracker: tracker.log_samples(step, rows))

    def close(self) -> None:
        self._each(lambda tracker: tracker.close())
        self.trackers.clear()


class ReportingSink:
    """A run's sink that also sends what it records to trackers: each step's metrics, and each
    checkpoint's eval samples. The trackers open at the sink's first ``discard_after``, which every run
    calls once it knows the step it resumes from, and close with the run's final status."""

    FINAL = ("completed", "stopped", "failed")

    def __init__(self, sink, names: list[str], run: RunInfo, eval_prompts: list[dict],
                 log: Callable[[str], None]) -> None:
        self.sink, self.names, self.run, self.log_line = sink, names, run, log
        self.prompts = {row["id"]: _plain_text(row["prompt"]) for row in eval_prompts}
        self.reporter: Reporter | None = None

    @property
    def pending(self) -> list[dict]:
        return self.sink.pending

    @pending.setter
    def pending(self, records: list[dict]) -> None:
        self.sink.pending = records

    def discard_after(self, step: int) -> None:
        self.sink.discard_after(step)
        if self.reporter is None:
            self.reporter = Reporter(self.names, dataclasses.replace(self.run, start_step=step), self.log_line)

    def add(self, record: dict) -> None:
        self.sink.add(record)
        if self.reporter is not None:
            self.reporter.log(record)

    def checkpoint_saved(self, step: int, folder: Path, samples: list[dict], base_samples: list[dict] = ()) -> None:
        self.sink.checkpoint_saved(step, folder, samples, base_samples)
        if self.reporter is not None:
            self.reporter.log_samples(step, [{"prompt": self.prompts.get(s["prompt_id"], ""), "completion": s["text"]}
                                             for s in samples])

    def set_status(self, status: str, error: str | None = None) -> None:
        self.sink.set_status(status, error)
        if status in self.FINAL and self.reporter is not None:
            self.reporter.close()

    def flush(self) -> None:
        self.sink.flush()

    def last_checkpoint(self, log: Callable[[str], None]) -> Path | None:
        return self.sink.last_checkpoint(log)


def reporting(sink, names: list[str], run: RunInfo, eval_prompts: list[dict], log: Callable[[str], None]):
    """`sink` itself when no tracker is asked for, else a ReportingSink around it."""
    return ReportingSink(sink, names, run, eval_prompts, log) if names else sink


def project_run_sink(db, run_id: int, sink, run_dir: Path, eval_prompts: list[dict], log: Callable[[str], None]):
    """The sink of run `run_id` of the project `db`, reporting to the trackers its settings name."""
    run = store.get_run(db, run_id)
    info = RunInfo(project=store.get_setting(db, "name", "studio"), run_id=run_id, run_name=run["name"],
                   run_dir=Path(run_dir), config=run["config"])
    try:
        names = report_to(db, run["config"])
    except TrackerError as exc:  # a project setting edited by hand: report it, train anyway
        log(f"{exc}; this run reports to no tracker")
        names = []
    return reporting(sink, names, info, eval_prompts, log)
