"""The exported TRL DPO job trains a tiny model on the CPU with 2 processes and comes back as a run.

Runs only where the `trl` command (TRL 1.16.0) is installed: `pip install trl==1.16.0`.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from studio.core import bundles, handoff, runs, store
from tests.test_trl_formats import tools_project  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(shutil.which("trl") is None, reason="TRL is not installed (pip install trl==1.16.0)")

CPU_ACCELERATE = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
gpu_ids: all
rdzv_backend: static
same_network: true
use_cpu: false
"""


def test_exported_trl_job_trains_with_two_processes_and_imports_back(project, tmp_path):
    store.add_dataset(project.db, "pairs", "preference", [
        {"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": "No, no."}]} for i in range(8)])
    config = runs.make_config("dpo", {"max_steps": 4, "checkpoint_every": 2, "batch_size": 4, "learning_rate": 1e-3})
    script = handoff.export_job(project.path, runs.create_run(project.db, config), "trl", tmp_path / "job")
    (tmp_path / "cpu.yaml").write_text(CPU_ACCELERATE)
    env = {**os.environ, "ACCELERATE_CONFIG": str(tmp_path / "cpu.yaml"), "NUM_PROCESSES": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(script), "--use_cpu", "true", "--bf16", "false"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    output = script.parent / "output"
    # One RNG state per process: two processes trained.
    assert {p.name for p in (output / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    run_id = bundles.import_run(project.db, project.path, output)
    metrics = store.run_metrics(project.db, run_id)
    assert metrics["loss"][0] == [1, 2, 3, 4] and metrics["loss"][1][0] == pytest.approx(0.6931, abs=1e-3)
    assert [c["step"] for c in store.checkpoints(project.db, run_id)] == [2, 4]
    assert store.get_run(project.db, run_id)["config"]["beta"] == json.loads(
        (script.parent / "studio_job.json").read_text())["config"]["beta"]
    assert Path(store.checkpoints(project.db, run_id)[-1]["path"], "adapter", "adapter_model.safetensors").exists()


def test_trl_trains_on_a_tool_pair_tokenized_as_the_studio_tokenizes_it(tools_project, tmp_path):
    """TRL's DPOTrainer renders the exported pair with its tools: with the adapter's B at zero, its step-1
    log-prob of the chosen side is the base model's, as in the studio's own run of the same pair."""
    project = tools_project
    config = runs.make_config("dpo", {"max_steps": 1, "batch_size": 1, "checkpoint_every": 1, "eval_max_new_tokens": 2})
    ours = runs.create_run(project.db, config)
    assert runs.execute(project.path, ours) == "completed"
    script = handoff.export_job(project.path, runs.create_run(project.db, config), "trl", tmp_path / "job")
    (tmp_path / "cpu.yaml").write_text(CPU_ACCELERATE.replace("num_processes: 2", "num_processes: 1")
                                       .replace("MULTI_GPU", "'NO'"))
    env = {**os.environ, "ACCELERATE_CONFIG": str(tmp_path / "cpu.yaml"), "NUM_PROCESSES": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(script), "--use_cpu", "true", "--bf16", "false"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    trl_run = bundles.import_run(project.db, project.path, script.parent / "output")
    ours_chosen = store.run_metrics(project.db, ours)["logps/chosen"][1][0]
    assert store.run_metrics(project.db, trl_run)["logps/chosen"][1][0] == pytest.approx(ours_chosen, rel=1e-4)
