"""User-facing errors: the base class of the core's own, and readable messages for any exception."""

import contextlib
import errno

OOM_ADVICE = (
    "Training ran out of memory. Try a smaller batch size, a shorter max length (prompt + response), "
    "or shorter responses (max_new_tokens for PPO); lowering the LoRA rank helps a little too. "
    "The run stopped; its last checkpoint is intact, so you can resume it after changing nothing, "
    "or start a new run from that checkpoint with smaller settings."
)

# Errors the core raises for people already carry a sentence for them (names, not classes, so this
# module imports nothing heavy).
USER_ERRORS = {"StudioError", "ConfigError", "ModelLoadError", "ProjectError", "DataImportError", "RewardError"}


class StudioError(Exception):
    """The base of every error whose message is meant for the user (the CLI prints it, the GUI shows it)."""


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


DISK_FULL_SIGNS = ("database or disk is full", "no space left on device", "iostream error", "file write failed")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(sign in str(exc).lower() for sign in DISK_FULL_SIGNS)


def describe_error(exc: BaseException, project: object = None) -> str:
    """A readable message for an exception, with a suggestion where one is known.

    `project`: the project folder the command worked on, named in messages about its files.
    """
    if is_out_of_memory(exc):
        return f"{OOM_ADVICE}\n\n({type(exc).__name__}: {_first_line(exc)})"
    if {cls.__name__ for cls in type(exc).__mro__} & USER_ERRORS:
        return str(exc)
    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or (f"{project}" if project else "the disk")
        return (f"The disk is full (writing {where}). Free some space and run the command again; what "
                f"was stored before is intact, since every write is all-or-nothing. ({_first_line(exc)})")
    if type(exc).__name__ == "SecurityError":  # jinja2's sandbox refused something a chat template did
        return (f"The chat template of the model {_base_model_path(project)} tried something the template "
                f"sandbox forbids ({exc}). Templates run in a sandbox so a model folder cannot run code: fix "
                "or replace its chat_template.jinja (or the chat_template in tokenizer_config.json).")
    if type(exc).__module__ == "sqlite3" and project:
        return (f"The project database {project}/studio.db cannot be used: {exc}. Run `studio check "
                f"{project}` for details; to recover, put a backup from {project}/backups/ in its place (and delete "
                "studio.db-wal and studio.db-shm).")
    if isinstance(exc, RecursionError):
        return f"Input nested too deeply to read ({exc})"
    if isinstance(exc, FileNotFoundError):
        return f"A file is missing: {exc.filename or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "The run was interrupted."
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _base_model_path(project: object) -> str:
    """The project's base model folder, for messages (read with plain sqlite3: this module stays light)."""
    import json
    import sqlite3
    from pathlib import Path

    try:
        with contextlib.closing(sqlite3.connect(f"file:{Path(str(project)) / 'studio.db'}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM settings WHERE key = 'base_model'").fetchone()
        return json.loads(row[0]).get("path") or "(the demo model)"
    except (TypeError, ValueError, AttributeError, sqlite3.Error):
        return "folder"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
