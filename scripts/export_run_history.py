"""Dump a project's runs as plain JSON for replay tests: the runs (config, status, parent checkpoint),
every metric per step, each checkpoint with its eval samples, the base samples, the eval prompts,
the comparisons and the labels. Nothing is interpreted: the advisor's replay tests read this file.

    .venv/bin/python scripts/export_run_history.py PROJECT_DIR OUT.json [--runs 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.core import labelling, store  # noqa: E402


def samples(db, checkpoint_id: int | None) -> list[dict]:
    return [{key: row[key] for key in ("prompt_id", "sample_index", "seed", "decoding", "text", "scores")}
            for row in store.samples(db, checkpoint_id)]


def history(db, run_ids: list[int] | None = None) -> dict:
    runs = []
    for run in store.list_runs(db):
        if run_ids is not None and run["id"] not in run_ids:
            continue
        metrics = store.run_metrics(db, run["id"])
        runs.append({
            **{key: run[key] for key in ("id", "name", "method", "status", "parent_checkpoint_id", "config")},
            "metrics": {name: [[step, value] for step, value in zip(*series)] for name, series in metrics.items()},
            "checkpoints": [{"id": c["id"], "step": c["step"], "eval_samples": samples(db, c["id"])}
                            for c in store.checkpoints(db, run["id"])],
        })
    return {
        "format": "alignment-studio run history v1",
        "reward_sources": store.get_setting(db, "reward_sources"),
        "risk_tolerance": store.get_setting(db, "risk_tolerance"),
        "eval_prompts": [{"id": p["id"], "prompt": p["prompt"]} for p in store.eval_prompts(db)],
        "base_samples": samples(db, None),
        "runs": runs,
        "comparisons": [labelling.get_comparison(db, i) for i in labelling.comparison_ids(db)],
        "labels": list(db.query("SELECT * FROM labels ORDER BY id")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", type=int, nargs="+", help="only these run ids (default: all)")
    args = parser.parse_args()
    with store.Project.open(args.project, read_only=True) as project:
        data = history(project.db, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")  # a stopped export leaves no half file
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, args.out)
    print(f"{args.out}: {len(data['runs'])} runs, {len(data['base_samples'])} base samples, "
          f"{len(data['labels'])} labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
