"""`studio check`: everything a project's health depends on, as a list of problems ([] = healthy)."""

from __future__ import annotations

from pathlib import Path

from . import store


def check_project(path: Path | str) -> list[str]:
    """The full SQLite integrity check, migrations this version does not know, and every registered
    checkpoint's files. Reads only; works on a damaged project that Project.open refuses."""
    path = Path(path)
    if not (path / store.DB_NAME).exists():
        return [f"{path} is not a studio project (no {store.DB_NAME})"]
    try:
        db = store.connect(path)
    except store.DamagedProjectError as exc:
        return [str(exc)]
    try:
        problems = [f"{path / store.DB_NAME}: {p}" for p in store.integrity_problems(db, full=True)]
        if problems:
            return problems + [store.recovery_advice(path)]
        newer = store.unknown_migrations(db)
        if newer:
            problems.append(f"made by a newer Alignment Studio (unknown changes: {', '.join(newer)})")
        problems += _checkpoint_problems(db)
    finally:
        db.close()
    return problems


def _checkpoint_problems(db) -> list[str]:
    from .runs import verify_checkpoint  # torch-free, but runs.py is the checkpoint format's home

    problems = []
    for checkpoint in store.checkpoints(db):
        problem = verify_checkpoint(store.checkpoint_folder(db, checkpoint))
        if problem:
            problems.append(f"checkpoint {checkpoint['id']} (run {checkpoint['run_id']}, step "
                            f"{checkpoint['step']}): {problem}")
    return problems
