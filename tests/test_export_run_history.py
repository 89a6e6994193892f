"""scripts/export_run_history.py: a plain, complete dump of a project's runs for replay tests."""

import json
import subprocess
import sys
from pathlib import Path

from studio.core import runs, store

ROOT = Path(__file__).resolve().parents[1]


def test_the_dump_holds_every_metric_checkpoint_and_eval_sample(project, make_toy_run, tmp_path):
    run_id = make_toy_run()
    runs.execute(project.path, run_id)
    expected_losses = store.run_metrics(project.db, run_id)["loss"][1]
    project.close()
    out = tmp_path / "history.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_run_history.py"), str(project.path),
                           str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["id"] == run_id and run["status"] == "completed"
    assert run["metrics"]["loss"] == [[step, loss] for step, loss in zip(range(1, 7), expected_losses)]
    assert [c["step"] for c in run["checkpoints"]] == [3, 6]
    assert all(len(c["eval_samples"]) == 4 for c in run["checkpoints"])
    assert len(data["eval_prompts"]) == 4 and data["labels"] == [] and data["base_samples"] == []
