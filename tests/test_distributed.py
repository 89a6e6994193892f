"""Data-parallel training on the CPU (gloo): two processes (torchrun, accelerate launch) give, step by
step, what one process gives, also after a kill -9. DPO splits each batch's pairs; PPO, GRPO and RLOO
split each step's sampling and scoring (each process reports the rollouts it sampled) and the passes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.core import bundles, runs, store

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"tokens_per_second", "step_seconds", "memory/peak_mb", "time"}
SPLIT = "rollouts_per_process"  # the one metric that must differ: the most rollouts one process sampled
MAX_STEPS = 6


@pytest.fixture
def bundle(project, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Yes, {i}."}],
             "rejected": [{"role": "assistant", "content": f"No... {'really ' * (i % 3)}no."}]} for i in range(10)]
    store.add_dataset(project.db, "pairs", "preference", rows)
    # 10 pairs, 3 per batch, 2 batches per step: uneven shares, a step that crosses an epoch, accumulation.
    config = runs.make_config("dpo", {"max_steps": MAX_STEPS, "checkpoint_every": 2, "eval_max_new_tokens": 2,
                                      "learning_rate": 1e-3, "batch_size": 3, "gradient_accumulation_steps": 2})
    return bundles.make_bundle(project.path, runs.create_run(project.db, config), tmp_path / "bundle")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# --multi_gpu is accelerate's torchrun-style launcher; without it, a machine with no GPU gets one process.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
              "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]


def launch(bundle: Path, launcher: list[str]) -> subprocess.Popen:
    """`LAUNCHER -m studio run-bundle BUNDLE` in its own process group."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, "-m", "studio", "run-bundle", str(bundle)], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


def step_metrics(bundle: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING | {SPLIT} and not k.startswith("time/")}
            for record in bundles.read_jsonl(bundle / "run" / "metrics.jsonl")]


def assert_same_steps(actual: list[dict], expected: list[dict], steps: int = MAX_STEPS) -> None:
    assert [r["step"] for r in actual] == list(range(1, steps + 1))
    assert [r["step"] for r in expected] == list(range(1, steps + 1))
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), (got["step"], name)


def test_two_processes_equal_one_step_by_step_and_survive_kill_9(bundle, tmp_path):
    single, double, killed = (shutil.copytree(bundle, tmp_path / name) for name in ("one", "two", "killed"))
    assert bundles.run_bundle(single) == "completed"
    expected = step_metrics(single)
    assert expected[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference

    finish(launch(double, TORCHRUN))
    assert_same_steps(step_metrics(double), expected)
    status = json.loads((double / "run" / "status.json").read_text())
    assert (status["status"], status["processes"]) == ("completed", 2)

    process = launch(killed, ACCELERATE)
    deadline = time.monotonic() + 300
    while not bundles.read_jsonl(killed / "run" / "checkpoints.jsonl") and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # every rank and the launcher, mid-run
    process.wait()
    saved = [entry["step"] for entry in bundles.read_jsonl(killed / "run" / "checkpoints.jsonl")]
    assert saved and saved[-1] < MAX_STEPS
    finish(launch(killed, ACCELERATE))  # resumes from the last checkpoint on both ranks
    assert_same_steps(step_metrics(killed), expected)
    assert json.loads((killed / "run" / "status.json").read_text())["processes"] == 2
    assert [e["step"] for e in bundles.read_jsonl(killed / "run" / "checkpoints.jsonl")][-1] == MAX_STEPS


def split(bundle: Path) -> list[int]:
    return [record[SPLIT] for record in bundles.read_jsonl(bundle / "run" / "metrics.jsonl")]


def shaping_bundle(project, tmp_path, method: str, settings: dict) -> tuple[Path, Path]:
    """A run of `method` (3 steps unless `settings` say otherwise) on 7 prompts, trained in one process;
    (that bundle, a fresh copy)."""
    store.add_dataset(project.db, "prompts", "prompts", [{"prompt": f"Say {i}."} for i in range(7)])
    config = runs.make_config(method, {"max_steps": 3, "checkpoint_every": 3, "eval_max_new_tokens": 2,
                                       "learning_rate": 1e-3, "temperature": 1.0, **settings})
    bundle = bundles.make_bundle(project.path, runs.create_run(project.db, config), tmp_path / "bundle")
    single, double = (shutil.copytree(bundle, tmp_path / name) for name in ("one", "two"))
    assert bundles.run_bundle(single) == "completed"
    return single, double


def test_ppo_two_processes_equal_one_step_by_step_and_survive_kill_9(project, tmp_path):
    # 5 prompts per step over 2 ranks (3 + 2), 2 minibatches, 2 PPO epochs, rule rewards, normalised.
    steps = 4
    single, double = shaping_bundle(project, tmp_path, "ppo", {
        "prompts_per_step": 5, "num_minibatches": 2, "ppo_epochs": 2, "max_new_tokens": 6,
        "reward_normalization": True, "max_steps": steps, "checkpoint_every": 1})
    killed = shutil.copytree(double, tmp_path / "killed")
    finish(launch(double, TORCHRUN))
    expected = step_metrics(single)
    assert_same_steps(step_metrics(double), expected, steps=steps)
    assert json.loads((double / "run" / "status.json").read_text())["processes"] == 2
    assert (split(single), split(double)) == ([5] * steps, [3] * steps)  # rank 0 sampled 3 of the 5 rollouts
    assert abs(expected[-1]["objective/kl"]) > 1e-6  # the policy moved: not a comparison of untrained copies

    # Killed after a trained checkpoint: value head, KL controller, reward normaliser and RNG resume on both ranks.
    process = launch(killed, TORCHRUN)
    deadline = time.monotonic() + 300
    while (not any(e["step"] >= 1 for e in bundles.read_jsonl(killed / "run" / "checkpoints.jsonl"))
           and time.monotonic() < deadline):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = [entry["step"] for entry in bundles.read_jsonl(killed / "run" / "checkpoints.jsonl")]
    assert 1 <= saved[-1] < steps
    finish(launch(killed, TORCHRUN))
    assert_same_steps(step_metrics(killed), expected, steps=steps)


@pytest.mark.parametrize("method, settings", [
    ("grpo", {"scale_rewards": "batch", "loss_type": "grpo"}),
    ("rloo", {"normalize_advantages": True}),
])
def test_critic_free_two_processes_equal_one_step_by_step(project, tmp_path, method, settings):
    # 3 prompts x 2 completions: whole groups per rank (2 groups + 1), batch-wide reward scaling or
    # advantage normalisation, 2 chunks of 3 rows, 2 optimizer steps per batch, the KL to the reference.
    single, double = shaping_bundle(project, tmp_path, method, {
        "prompts_per_step": 3, "num_generations": 2, "max_completion_length": 6, "num_minibatches": 2,
        "num_iterations": 2, "learning_rate": 1e-2, **settings})
    finish(launch(double, TORCHRUN))
    expected = step_metrics(single)
    assert_same_steps(step_metrics(double), expected, steps=3)
    assert (split(single), split(double)) == ([6] * 3, [4] * 3)
    assert any(record["reward_std"] > 0 for record in expected)  # advantages that are not all 0
    assert abs(expected[-1]["kl"]) > 1e-6  # the policy moved (RLOO's k1 estimate can be negative)
