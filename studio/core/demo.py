"""The demo project: the embedded SmolLM2 model plus the bundled prompts and preference pairs."""

from __future__ import annotations

from pathlib import Path

from . import store

RESOURCES = Path(__file__).resolve().parents[2] / "resources" / "demo"
DEFAULT_DEMO_PROJECT = Path(__file__).resolve().parents[2] / "projects" / "demo"

# (file, dataset kind, is the eval set)
DEMO_FILES = (
    ("eval_prompts.jsonl", "prompts", True),
    ("prompts.jsonl", "prompts", False),
    ("preference_pairs.jsonl", "preference", False),
)


def ensure_demo_project(path: Path | str = DEFAULT_DEMO_PROJECT) -> Path:
    """Create the demo project at `path` the first time; later calls just return the path."""
    from .datasets import import_file

    path = Path(path)
    if (path / store.DB_NAME).exists():
        return path
    with store.Project.create(path, name="Demo: concise answers", base_model={"kind": "demo"}) as project:
        for file_name, kind, is_eval in DEMO_FILES:
            import_file(project.db, RESOURCES / file_name, name=file_name.removesuffix(".jsonl"),
                        kind=kind, as_eval=is_eval)
    return path
