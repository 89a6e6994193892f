"""The project store: one folder, one SQLite file (WAL, foreign keys on), artefact folders.

A project folder looks like::

    my-project/
      studio.db          every table below
      runs/<id>/         checkpoints and caches of run <id>
      exports/           what the user exported
      .studio.lock       held (flock) by the one process that has the project open for writing

Functions here are small and take a sqlite-utils ``Database`` first, so a worker thread can pass its
own connection (a sqlite3 connection belongs to the thread that opened it).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from .errors import StudioError

DB_NAME = "studio.db"
LOCK_NAME = ".studio.lock"
RISK_TOLERANCES = ("low", "medium", "high")
RUN_STATUSES = ("queued", "running", "paused", "stopped", "completed", "failed", "interrupted")
LABEL_CHOICES = ("a", "b", "tie", "both_bad", "skip", "undo")  # "undo" rows point at the label they undo

migrations = Migrations("studio")


@migrations()
def m001_core_tables(db: Database) -> None:
    db["settings"].create({"key": str, "value": str}, pk="key")
    db["datasets"].create(
        {"id": int, "name": str, "kind": str, "source_file": str, "format": str,
         "row_count": int, "imported_at": float},
        pk="id", not_null={"name", "kind"},
    )
    db["prompts"].create(
        {"id": int, "dataset_id": int, "prompt": str, "is_eval": int},
        pk="id", foreign_keys=[("dataset_id", "datasets", "id")], not_null={"prompt"},
        defaults={"is_eval": 0},
    )
    db["pairs"].create(
        {"id": int, "dataset_id": int, "prompt": str, "chosen": str, "rejected": str,
         "created_at": float},
        pk="id", foreign_keys=[("dataset_id", "datasets", "id")],
        not_null={"prompt", "chosen", "rejected"},
    )
    db["runs"].create(
        {"id": int, "name": str, "method": str, "config": str, "status": str,
         "parent_checkpoint_id": int, "created_at": float, "started_at": float,
         "finished_at": float, "error": str},
        pk="id", not_null={"method", "config", "status"},
    )
    db["checkpoints"].create(
        {"id": int, "run_id": int, "step": int, "path": str, "created_at": float},
        pk="id", foreign_keys=[("run_id", "runs", "id")], not_null={"run_id", "step", "path"},
    )
    db["metrics"].create(
        {"run_id": int, "step": int, "name": str, "value": float, "time": float},
        foreign_keys=[("run_id", "runs", "id")], not_null={"run_id", "step", "name"},
    )
    db["metrics"].create_index(["run_id", "name", "step"])
    # checkpoint_id NULL means the base model (the project's base, with no adapter).
    db["samples"].create(
        {"id": int, "checkpoint_id": int, "prompt_id": int, "sample_index": int, "seed": int,
         "decoding": str, "text": str, "scores": str, "created_at": float},
        pk="id",
        foreign_keys=[("checkpoint_id", "checkpoints", "id"), ("prompt_id", "prompts", "id")],
        not_null={"prompt_id", "text"},
    )
    db["samples"].create_index(["checkpoint_id", "prompt_id"])


@migrations()
def m002_labelling(db: Database) -> None:
    """Comparisons shown to annotators and their labels (an undo is a new label row)."""
    db["comparisons"].create(
        {"id": int, "prompt": str, "prompt_id": int, "pair_id": int, "response_a": str,
         "response_b": str, "source_a": str, "source_b": str, "created_at": float},
        pk="id",
        foreign_keys=[("prompt_id", "prompts", "id"), ("pair_id", "pairs", "id")],
        not_null={"prompt", "response_a", "response_b"},
    )
    db["labels"].create(
        {"id": int, "comparison_id": int, "annotator": str, "choice": str, "edited_text": str,
         "undoes_label_id": int, "created_at": float},
        pk="id",
        foreign_keys=[("comparison_id", "comparisons", "id"), ("undoes_label_id", "labels", "id")],
        not_null={"comparison_id", "annotator", "choice"},
    )
    db["labels"].create_index(["comparison_id"])


class ProjectError(StudioError):
    """A project that cannot be created or opened, with a message meant for the user."""


class ProjectLockedError(ProjectError):
    pass


def connect(path: Path | str) -> Database:
    """A new connection to a project's database (one per thread)."""
    db = Database(Path(path) / DB_NAME)
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 10000")  # the window reads while a worker writes
    return db


@dataclass
class Project:
    path: Path
    db: Database
    read_only: bool = False
    _lock_fd: int | None = field(default=None, repr=False)

    @classmethod
    def create(cls, path: Path | str, name: str | None = None,
               base_model: dict | None = None) -> "Project":
        path = Path(path)
        if (path / DB_NAME).exists():
            raise ProjectError(f"{path} already holds a project ({DB_NAME} exists)")
        path.mkdir(parents=True, exist_ok=True)
        project = cls.open(path, _creating=True)
        with project.db.atomic():
            set_setting(project.db, "name", name or path.name)
            set_setting(project.db, "base_model", base_model or {"kind": "demo"})
            set_setting(project.db, "risk_tolerance", "medium")
        return project

    @classmethod
    def open(cls, path: Path | str, read_only: bool = False, _creating: bool = False) -> "Project":
        path = Path(path)
        if not path.is_dir():
            raise ProjectError(f"No project folder at {path}")
        if not _creating and not (path / DB_NAME).exists():
            raise ProjectError(f"{path} is not a studio project (no {DB_NAME}); create one with `studio init {path}`")
        lock_fd = None if read_only else _take_lock(path)
        try:
            db = connect(path)
            if not read_only:
                db.enable_wal()
                migrations.apply(db)
                # Runs marked running belong to a process that died (we hold the write lock now).
                db.execute("UPDATE runs SET status = 'interrupted' WHERE status IN ('running', 'paused')")
                db.conn.commit()
                for folder in ("runs", "exports"):
                    (path / folder).mkdir(exist_ok=True)
        except Exception:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(path=path.resolve(), db=db, read_only=read_only, _lock_fd=lock_fd)

    def connect(self) -> Database:
        """A fresh connection for another thread (the lock stays with this object)."""
        return connect(self.path)

    def run_dir(self, run_id: int) -> Path:
        return self.path / "runs" / str(run_id)

    @property
    def exports_dir(self) -> Path:
        return self.path / "exports"

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _take_lock(path: Path) -> int:
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ProjectLockedError(
            f"The project {path} is already open for writing in another studio process "
            f"(pid {holder}). Close it there first (or switch to that window)."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


# --- settings ---------------------------------------------------------------------------------

def get_setting(db: Database, key: str, default: Any = None) -> Any:
    rows = list(db.query("SELECT value FROM settings WHERE key = ?", [key]))
    return json.loads(rows[0]["value"]) if rows else default


def set_setting(db: Database, key: str, value: Any) -> None:
    if key == "risk_tolerance" and value not in RISK_TOLERANCES:
        raise ValueError(f"risk_tolerance must be one of {RISK_TOLERANCES}, not {value!r}")
    db["settings"].upsert({"key": key, "value": json.dumps(value)}, pk="key")


# --- datasets, prompts, pairs -----------------------------------------------------------------

def add_dataset(db: Database, name: str, kind: str, rows: list[dict], source_file: str = "",
                fmt: str = "", is_eval: bool = False) -> int:
    """Store a dataset and all its rows in one transaction: all or nothing.

    kind "prompts": rows have "prompt"; kind "preference": rows have "prompt", "chosen", "rejected".
    Values may be strings or conversational message lists; they are stored as JSON.
    """
    if kind not in ("prompts", "preference"):
        raise ValueError(f"unknown dataset kind {kind!r}")
    if is_eval and kind != "prompts":
        raise ValueError("only a prompts dataset can be the eval set")
    now = time.time()
    with db.atomic():
        dataset_id = db["datasets"].insert(
            {"name": name, "kind": kind, "source_file": source_file, "format": fmt,
             "row_count": len(rows), "imported_at": now}
        ).last_pk
        if kind == "prompts":
            db["prompts"].insert_all(
                ({"dataset_id": dataset_id, "prompt": json.dumps(r["prompt"]), "is_eval": int(is_eval)}
                 for r in rows), batch_size=500)
        else:
            db["pairs"].insert_all(
                ({"dataset_id": dataset_id, "prompt": json.dumps(r["prompt"]),
                  "chosen": json.dumps(r["chosen"]), "rejected": json.dumps(r["rejected"]),
                  "created_at": now} for r in rows), batch_size=500)
    return dataset_id


def datasets(db: Database) -> list[dict]:
    return list(db.query("SELECT * FROM datasets ORDER BY id"))


def prompts(db: Database, eval_only: bool = False, train_only: bool = False) -> list[dict]:
    where = " WHERE is_eval = 1" if eval_only else " WHERE is_eval = 0" if train_only else ""
    return [{**row, "prompt": json.loads(row["prompt"])}
            for row in db.query(f"SELECT id, dataset_id, prompt, is_eval FROM prompts{where} ORDER BY id")]


def eval_prompts(db: Database) -> list[dict]:
    return prompts(db, eval_only=True)


def eval_flags(db: Database) -> dict[int, bool]:
    """Prompt dataset id -> whether its prompts are evaluation prompts."""
    return {row["dataset_id"]: bool(row["is_eval"]) for row in db.query(
        "SELECT dataset_id, MAX(is_eval) AS is_eval FROM prompts GROUP BY dataset_id")}


def set_eval(db: Database, dataset_id: int, is_eval: bool) -> None:
    """Mark a prompt dataset as evaluation prompts (never trained on), or back to training prompts."""
    with db.atomic():
        db.execute("UPDATE prompts SET is_eval = ? WHERE dataset_id = ?", [int(is_eval), dataset_id])


def count_rows(db: Database, table: str, where: str = "") -> int:
    """Rows of `table` (pairs, prompts, ...), optionally under a WHERE clause written by the caller."""
    return db[table].count_where(where) if where else db[table].count


def pairs(db: Database, dataset_ids: Iterable[int] | None = None) -> list[dict]:
    sql, params = "SELECT * FROM pairs", []
    if dataset_ids is not None:
        ids = list(dataset_ids)
        sql += f" WHERE dataset_id IN ({','.join('?' * len(ids))})"
        params = ids
    return [{**row, **{k: json.loads(row[k]) for k in ("prompt", "chosen", "rejected")}}
            for row in db.query(sql + " ORDER BY id", params)]


def effective_labels(db: Database) -> list[dict]:
    """The labels that stand: not "undo" rows, and not undone by one. Oldest first."""
    return list(db.query(
        "SELECT * FROM labels WHERE choice != 'undo' AND id NOT IN "
        "(SELECT undoes_label_id FROM labels WHERE undoes_label_id IS NOT NULL) ORDER BY id"))


def labelled_pairs(db: Database) -> list[dict]:
    """Preference pairs made from labels: per comparison, its latest standing A or B label.

    An edited answer (the annotator improved the better side before saving) becomes the chosen text.
    """
    latest: dict[int, dict] = {}
    for label in effective_labels(db):
        latest[label["comparison_id"]] = label
    out = []
    for comparison_id, label in latest.items():
        if label["choice"] not in ("a", "b"):
            continue
        c = next(db.query("SELECT * FROM comparisons WHERE id = ?", [comparison_id]))
        better, worse = ("a", "b") if label["choice"] == "a" else ("b", "a")
        chosen = label["edited_text"] or c[f"response_{better}"]
        prompt = json.loads(c["prompt"])
        as_messages = isinstance(prompt, list)
        out.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}] if as_messages else chosen,
            "rejected": [{"role": "assistant", "content": c[f"response_{worse}"]}] if as_messages else c[f"response_{worse}"],
            "comparison_id": comparison_id, "label_id": label["id"], "annotator": label["annotator"],
            "labelled_at": label["created_at"],
            "chosen_source": json.loads(c[f"source_{better}"] or "{}"),
            "rejected_source": json.loads(c[f"source_{worse}"] or "{}"),
        })
    return out


# --- runs, metrics, checkpoints, samples ------------------------------------------------------

def create_run(db: Database, method: str, config: dict, name: str | None = None,
               parent_checkpoint_id: int | None = None, status: str = "queued") -> int:
    run_id = db["runs"].insert(
        {"name": name or method.upper(), "method": method, "config": json.dumps(config),
         "status": status, "parent_checkpoint_id": parent_checkpoint_id, "created_at": time.time()}
    ).last_pk
    if name is None:
        db["runs"].update(run_id, {"name": f"{method.upper()} #{run_id}"})
    return run_id


def get_run(db: Database, run_id: int) -> dict:
    rows = list(db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
    if not rows:
        raise ProjectError(f"No run with id {run_id} in this project")
    return {**rows[0], "config": json.loads(rows[0]["config"])}


def list_runs(db: Database) -> list[dict]:
    return [{**row, "config": json.loads(row["config"])}
            for row in db.query("SELECT * FROM runs ORDER BY id")]


def set_run_status(db: Database, run_id: int, status: str, error: str | None = None) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    update: dict[str, Any] = {"status": status}
    if status == "running":
        if db["runs"].get(run_id)["started_at"] is None:  # the first start: a resume keeps it
            update["started_at"] = time.time()
        update["error"] = None
    elif status in ("stopped", "completed", "failed"):
        update["finished_at"] = time.time()
    if error is not None:
        update["error"] = error
    db["runs"].update(run_id, update)


def write_metrics(db: Database, run_id: int, records: list[dict]) -> None:
    """Write a batch of step records ({"step": n, "time": t, name: value, ...}) in one transaction."""
    rows = [{"run_id": run_id, "step": r["step"], "name": name, "value": float(value), "time": r["time"]}
            for r in records for name, value in r.items() if name not in ("step", "time")]
    with db.atomic():
        db["metrics"].insert_all(rows, batch_size=1000)


def delete_metrics_after(db: Database, run_id: int, step: int) -> None:
    with db.atomic():
        db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [run_id, step])


def run_metrics(db: Database, run_id: int) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values), ordered by step."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in db.query("SELECT name, step, value FROM metrics WHERE run_id = ? ORDER BY name, step", [run_id]):
        steps, values = out.setdefault(row["name"], ([], []))
        steps.append(row["step"])
        values.append(row["value"])
    return out


def step_times(db: Database, run_id: int) -> dict[int, float]:
    """Step -> when its record was written (the wall-time axis)."""
    return {row["step"]: row["time"] for row in db.query(
        "SELECT step, MIN(time) AS time FROM metrics WHERE run_id = ? GROUP BY step", [run_id])}


def metric_names(db: Database, run_id: int) -> list[str]:
    return [row["name"] for row in db.query(
        "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", [run_id])]


def latest_metrics(db: Database) -> dict[int, tuple[int, dict[str, float]]]:
    """Run id -> (its last step, that step's metrics), for every run with metrics."""
    out: dict[int, tuple[int, dict[str, float]]] = {}
    for row in db.query("SELECT m.run_id, m.step, m.name, m.value FROM metrics m JOIN (SELECT run_id, MAX(step) AS step "
                        "FROM metrics GROUP BY run_id) last ON m.run_id = last.run_id AND m.step = last.step"):
        out.setdefault(row["run_id"], (row["step"], {}))[1][row["name"]] = row["value"]
    return out


def add_checkpoint(db: Database, run_id: int, step: int, path: str) -> int:
    return db["checkpoints"].insert(
        {"run_id": run_id, "step": step, "path": path, "created_at": time.time()}).last_pk


def checkpoints(db: Database, run_id: int | None = None) -> list[dict]:
    if run_id is None:
        return list(db.query("SELECT * FROM checkpoints ORDER BY run_id, step"))
    return list(db.query("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step", [run_id]))


def get_checkpoint(db: Database, checkpoint_id: int) -> dict:
    rows = list(db.query("SELECT * FROM checkpoints WHERE id = ?", [checkpoint_id]))
    if not rows:
        raise ProjectError(f"No checkpoint with id {checkpoint_id} in this project")
    return rows[0]


def add_samples(db: Database, rows: list[dict]) -> None:
    """rows: checkpoint_id (None for the base), prompt_id, sample_index, seed, decoding, text, scores."""
    now = time.time()
    with db.atomic():
        db["samples"].insert_all(
            ({**r, "decoding": json.dumps(r.get("decoding") or {}),
              "scores": json.dumps(r.get("scores") or {}), "created_at": now} for r in rows),
            batch_size=500)


def samples(db: Database, checkpoint_id: int | None) -> list[dict]:
    where = "checkpoint_id IS NULL" if checkpoint_id is None else "checkpoint_id = ?"
    params = [] if checkpoint_id is None else [checkpoint_id]
    return [{**row, "decoding": json.loads(row["decoding"]), "scores": json.loads(row["scores"])}
            for row in db.query(f"SELECT * FROM samples WHERE {where} ORDER BY prompt_id, sample_index", params)]
