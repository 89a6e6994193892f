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

import errno
import fcntl
import json
import os
import sqlite3
import stat
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


@migrations()
def m003_portable_checkpoints(db: Database) -> None:
    """Checkpoint paths relative to the project folder (a moved or copied project reads its own), and
    the identity of the base model every run and checkpoint was trained on."""
    db["runs"].add_column("base_identity", str)
    db["checkpoints"].add_column("base_identity", str)
    for row in list(db.query("SELECT id, run_id, path FROM checkpoints")):
        # Every checkpoint was written to runs/<run id>/ (wherever the project was then).
        db["checkpoints"].update(row["id"], {"path": f"runs/{row['run_id']}/{Path(row['path']).name}"})


@migrations()
def m004_reference_answers_and_feedback(db: Database) -> None:
    """A prompt's reference answer (TRL's prompt-completion rows), and unpaired feedback (TRL's unpaired
    preference rows: a completion labelled good or bad), kept whole for KTO-style use."""
    db["prompts"].add_column("reference", str)
    db["feedback"].create(
        {"id": int, "dataset_id": int, "prompt": str, "completion": str, "label": int},
        pk="id", foreign_keys=[("dataset_id", "datasets", "id")], not_null={"prompt", "completion", "label"},
    )


@migrations()
def m005_pair_tools(db: Database) -> None:
    """A preference pair's function schemas (TRL's 'tools' column), given to the chat template with it."""
    db["pairs"].add_column("tools", str)


class ProjectError(StudioError):
    """A project that cannot be created or opened, with a message meant for the user."""


class ProjectLockedError(ProjectError):
    pass


class DamagedProjectError(ProjectError):
    """A studio.db that is not a healthy database of this version; nothing is written to it."""


BACKUP_DIR = "backups"
BACKUPS_KEPT = 5


def recovery_advice(path: Path) -> str:
    backups = sorted((path / BACKUP_DIR).glob("*.db")) if (path / BACKUP_DIR).is_dir() else []
    if backups:
        db = path / DB_NAME  # the damaged database's journal must go too, or SQLite replays it onto the copy
        return (f"Nothing was changed. To recover, close Alignment Studio and put the newest backup in its "
                f"place: rm -f {db}-wal {db}-shm && cp {backups[-1]} {db}")
    return ("Nothing was changed. Restore studio.db from a backup of the folder; this project has "
            f"no backups of its own in {path / BACKUP_DIR}.")


def check_database_file(path: Path) -> None:
    """Refuse a studio.db that is empty or not a regular file, before SQLite sees it (an empty file
    would silently become a new database).

    Only stat: opening and closing the file would drop the POSIX locks this process's SQLite
    connections hold on it. SQLite itself refuses a file without its header (see connect)."""
    file = path / DB_NAME
    try:
        info = file.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise DamagedProjectError(f"{file} is not a regular file. {recovery_advice(path)}")
    if info.st_size == 0:
        raise DamagedProjectError(f"{file} is empty (0 bytes): the project's data is gone. {recovery_advice(path)}")


def integrity_problems(db: Database, full: bool = False) -> list[str]:
    """SQLite's own check: [] when healthy. quick_check skips index contents; integrity_check reads all."""
    pragma = "integrity_check" if full else "quick_check"
    try:
        rows = [row[0] for row in db.execute(f"PRAGMA {pragma}").fetchall()]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    return [] if rows == ["ok"] else rows


def unknown_migrations(db: Database) -> list[str]:
    """Migrations applied by a newer Alignment Studio that this version does not know."""
    known = {m.name for m in migrations._migrations}  # sqlite-utils has no public list of a set's names
    return [m.name for m in migrations.applied(db) if m.name not in known]


def _check_database(db: Database, path: Path) -> None:
    problems = integrity_problems(db)
    if problems:
        shown = "; ".join(problems[:3])
        raise DamagedProjectError(f"{path / DB_NAME} is damaged ({shown}). {recovery_advice(path)} "
                                  f"`studio check {path}` lists every problem.")
    newer = unknown_migrations(db)
    if newer:
        raise DamagedProjectError(
            f"{path / DB_NAME} was made by a newer Alignment Studio (it has changes {', '.join(newer)} "
            "this version does not know). Open it with that version, or upgrade this one.")


def backup(db: Database, target: Path | str) -> Path:
    """A consistent copy of a live database through SQLite's online backup API, written atomically."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    copy = sqlite3.connect(partial)
    try:
        db.conn.backup(copy)
    finally:
        copy.close()
    fsync_path(partial)
    os.replace(partial, target)
    fsync_path(target.parent)
    return target


def rotating_backup(db: Database, path: Path, reason: str) -> Path:
    """A backup in <project>/backups/, keeping the newest BACKUPS_KEPT."""
    folder = path / BACKUP_DIR
    folder.mkdir(exist_ok=True)
    made = backup(db, folder / f"studio-{time.strftime('%Y%m%d-%H%M%S')}-{reason}.db")
    for old in sorted(folder.glob("studio-*.db"))[:-BACKUPS_KEPT]:
        old.unlink()
    return made


def daily_backup(project: "Project") -> Path | None:
    """The window calls this while a project is open: a rotating backup when the last is a day old."""
    newest = max((f.stat().st_mtime for f in (project.path / BACKUP_DIR).glob("studio-*.db")), default=0.0)
    if project.read_only or time.time() - newest < 24 * 3600:
        return None
    return rotating_backup(project.db, project.path, "daily")


def fsync_path(path: Path | str) -> None:
    """Flush a file or folder to the disk (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, then `folder` itself."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def project_dir(db: Database) -> Path:
    """The folder of the project a connection belongs to."""
    for row in db.execute("PRAGMA database_list").fetchall():
        if row[1] == "main":
            return Path(row[2]).parent
    raise ProjectError("not a project database")


def connect(path: Path | str) -> Database:
    """A new connection to a project's database (one per thread)."""
    check_database_file(Path(path))
    db = Database(Path(path) / DB_NAME)
    try:
        db.execute("PRAGMA busy_timeout = 10000")  # the window reads while a worker writes
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads (and checks) the header
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")  # a commit is durable when it returns (some builds default WAL to NORMAL)
    except sqlite3.DatabaseError as exc:
        db.close()
        if isinstance(exc, sqlite3.OperationalError):  # locked, disk I/O: not a statement about the file
            raise
        raise DamagedProjectError(f"{Path(path) / DB_NAME} is not an SQLite database ({exc}); it may have been "
                                  f"overwritten. {recovery_advice(Path(path))}") from None
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
        db = None
        try:
            db = connect(path)
            _check_database(db, path)
            if not read_only:
                db.enable_wal()
                if not _creating and migrations.pending(db):
                    rotating_backup(db, path, "before-upgrade")
                migrations.apply(db)
                _mark_orphaned_runs(db, path)
                for folder in ("runs", "exports"):
                    (path / folder).mkdir(exist_ok=True)
        except Exception:
            if db is not None:
                db.close()
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


def _mark_orphaned_runs(db: Database, path: Path) -> None:
    """Runs marked running whose run lock nobody holds belong to a process that died."""
    for row in list(db.query("SELECT id FROM runs WHERE status IN ('running', 'paused')")):
        lock = path / "runs" / str(row["id"]) / RUN_LOCK_NAME
        if lock.exists() and lock_holder(lock) is not None:
            continue  # still trained by a process that outlived the window that started it
        db.execute("UPDATE runs SET status = 'interrupted' WHERE id = ?", [row["id"]])
    db.conn.commit()


RUN_LOCK_NAME = ".run.lock"


def take_lock(file: Path, busy_message: str) -> int:
    """An exclusive flock on `file`, holding our pid. busy_message may use {pid} (the holder's).

    The file is opened without following links and must be a regular file: a project received from
    someone else could otherwise plant a link that makes us truncate one of the user's files.
    """
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ProjectError(f"{file} is a symbolic link; a lock file must be a regular file. "
                               "Delete it and try again.") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ProjectError(f"{file} is not a regular file; delete it and try again.")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ProjectLockedError(busy_message.format(pid=holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def lock_holder(file: Path) -> str | None:
    """The pid written in a lock file someone holds now, or None when it is free."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        return None
    finally:
        os.close(fd)


def _take_lock(path: Path) -> int:
    return take_lock(path / LOCK_NAME,
                     f"The project {path} is already open for writing in another studio process "
                     "(pid {pid}). Close it there first (or switch to that window).")


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
                fmt: str = "", is_eval: bool = False, feedback: list[dict] = ()) -> int:
    """Store a dataset and all its rows in one transaction: all or nothing.

    kind "prompts": rows have "prompt" (and may have a "reference" answer); kind "preference": rows have
    "prompt", "chosen", "rejected" (and may have "tools", function schemas), and `feedback` may hold the
    unpaired rows ("prompt", "completion", "label") they were paired from. Values may be strings or
    conversational message lists; they are stored as JSON.
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
                ({"dataset_id": dataset_id, "prompt": json.dumps(r["prompt"]), "is_eval": int(is_eval),
                  "reference": json.dumps(r["reference"]) if "reference" in r else None}
                 for r in rows), batch_size=500)
        else:
            db["pairs"].insert_all(
                ({"dataset_id": dataset_id, "prompt": json.dumps(r["prompt"]),
                  "chosen": json.dumps(r["chosen"]), "rejected": json.dumps(r["rejected"]),
                  "tools": json.dumps(r["tools"]) if r.get("tools") else None,
                  "created_at": now} for r in rows), batch_size=500)
        if feedback:
            db["feedback"].insert_all(
                ({"dataset_id": dataset_id, "prompt": json.dumps(r["prompt"]),
                  "completion": json.dumps(r["completion"]), "label": int(r["label"])} for r in feedback),
                batch_size=500)
    return dataset_id


def feedback(db: Database) -> list[dict]:
    """Unpaired feedback rows: prompt, completion, label (True: good)."""
    return [{**row, "prompt": json.loads(row["prompt"]), "completion": json.loads(row["completion"]),
             "label": bool(row["label"])}
            for row in db.query("SELECT id, dataset_id, prompt, completion, label FROM feedback ORDER BY id")]


def reference_answers(db: Database) -> dict[int, Any]:
    """Prompt id -> its reference answer, for the prompts that came with one."""
    return {row["id"]: json.loads(row["reference"])
            for row in db.query("SELECT id, reference FROM prompts WHERE reference IS NOT NULL ORDER BY id")}


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
    return [{**row, **{k: json.loads(row[k]) for k in ("prompt", "chosen", "rejected")},
             "tools": json.loads(row["tools"]) if row["tools"] else None}
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
               parent_checkpoint_id: int | None = None, status: str = "queued",
               base_identity: dict | None = None) -> int:
    row = {"name": name or method.upper(), "method": method, "config": json.dumps(config),
           "status": status, "parent_checkpoint_id": parent_checkpoint_id, "created_at": time.time()}
    if base_identity:
        row["base_identity"] = json.dumps(base_identity)
    run_id = db["runs"].insert(row).last_pk
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


def add_checkpoint(db: Database, run_id: int, step: int, path: str, base_identity: dict | None = None) -> int:
    """Register a checkpoint folder; a path inside the project is stored relative to it, so it moves with it."""
    try:
        stored = Path(path).resolve().relative_to(project_dir(db).resolve()).as_posix()
    except ValueError:
        stored = str(path)  # outside the project (an external folder): kept as given
    return db["checkpoints"].insert(
        {"run_id": run_id, "step": step, "path": stored,
         "base_identity": json.dumps(base_identity) if base_identity else None,
         "created_at": time.time()}).last_pk


def checkpoint_folder(db: Database, checkpoint: dict) -> Path:
    """Where a registered checkpoint lives now (rows from before relative paths are read as they are)."""
    path = Path(checkpoint["path"])
    return path if path.is_absolute() else project_dir(db) / path


def delete_checkpoints_after(db: Database, run_id: int, step: int) -> None:
    """Forget a run's checkpoints after `step` (and their samples): a resume writes them again."""
    with db.atomic():
        db.execute("DELETE FROM samples WHERE checkpoint_id IN "
                   "(SELECT id FROM checkpoints WHERE run_id = ? AND step > ?)", [run_id, step])
        db.execute("DELETE FROM checkpoints WHERE run_id = ? AND step > ?", [run_id, step])


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
