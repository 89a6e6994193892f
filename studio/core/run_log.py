"""A run's log file (``runs/<id>/run.log``): the messages of its Log tab, kept for the next launch.

Torch-free, so the window reads it without importing the engines.
"""

from __future__ import annotations

import time
from pathlib import Path

LOG_FILE = "run.log"


def append_run_log(run_dir: Path, message: str) -> None:
    """Add a timestamped message (one line per line of text) to the run's log file."""
    stamp = f"{time.time():.3f}"
    with open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8") as log_file:
        log_file.writelines(f"{stamp}\t{line}\n" for line in message.splitlines() or [""])


def read_run_log(run_dir: Path) -> list[tuple[float, str]]:
    """(time, line) of every line of the run's log; [] when it has none. A torn last line is skipped."""
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stamp, _tab, text = line.partition("\t")
        try:
            entries.append((float(stamp), text))
        except ValueError:  # not a line this module wrote
            continue
    return entries
