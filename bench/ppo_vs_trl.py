"""Seconds per PPO step: TRL 0.29.1's PPOTrainer against the studio's engine, same work, same machine.

    .venv/bin/python bench/ppo_vs_trl.py [--steps 6] [--warmup 2] [--threads 1] [--skip-trl] [--rules-only]
    .venv/bin/python bench/ppo_vs_trl.py --smoke [--skip-trl]   # tiny random model, 2 steps: does it run?

Both sides: the demo model (SmolLM2-135M-Instruct, fp32), the same prompts, 8 prompts per step,
48 new tokens (sampled at temperature 0.7, top_p 1), 1 PPO epoch of 1 minibatch, LoRA r=16 on all
linear layers, the CPU. TRL runs in its own virtual environment (bench/.venv-trl029, created on first
use) in a subprocess; its reward and value models are copies of the base with a scalar head, as
TRL's example scripts use. The studio uses its value head on the policy's trunk (no value model: that
design is part of the speed-up) and is timed twice: with a rule reward (the demo preset: no filler
phrases, 15-60 words, a finished sentence), and with TRL's reward model (the same copy of the base
with a scalar head, as a `reward_model` source), so the reward work is equal too. Reported: the
median seconds per step after `warmup` steps, for each, and the ratios.

Both sides use `--threads` torch threads (default 1): on a CPU shared with other jobs, two threads
per process make a step up to ten times slower whenever a neighbour is busy (measured here), one
thread keeps the figures stable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "bench" / ".venv-trl029"
TRL_PACKAGES = ["trl==0.29.1", "transformers==5.24.0", "peft==0.21.2", "accelerate", "datasets"]
TORCH = "torch==2.13.0"  # the local CPU build; any other spec pulls a multi-GB CUDA build
PROMPTS_PER_STEP, NEW_TOKENS, TEMPERATURE, LORA_R, LORA_ALPHA, LEARNING_RATE = 8, 48, 0.7, 16, 32, 5e-5


def load_prompts(count: int) -> list:
    """The demo's PPO prompts (chat messages), or a built-in set if the file is missing."""
    path = ROOT / "resources" / "demo" / "prompts.jsonl"
    if path.exists():
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines()[:count]]
    topics = ["gravity", "photosynthesis", "inflation", "the water cycle", "vaccines", "tides", "compound interest", "rust"]
    return [[{"role": "user", "content": f"What is {topic}?"}] for topic in topics * (count // len(topics) + 1)][:count]


def steady_median(seconds: list[float], warmup: int) -> float:
    return statistics.median(seconds[warmup:])


# --- the studio side --------------------------------------------------------------------------

def run_studio(prompts: list, steps: int, reward_sources: list[dict] | None = None,
               model_folder: Path | None = None) -> list[dict]:
    """Per-step metrics of a PPO run through runs.execute on a fresh project on the demo model (or
    `model_folder`); reward: the demo rule preset unless `reward_sources` are given."""
    sys.path.insert(0, str(ROOT))
    from studio.core import rewards, runs, store

    with tempfile.TemporaryDirectory() as folder:
        base_model = {"kind": "folder", "path": str(model_folder)} if model_folder else {"kind": "demo"}
        project = store.Project.create(Path(folder) / "bench", base_model=base_model)
        store.add_dataset(project.db, "prompts", "prompts", [{"prompt": p} for p in prompts])
        config = runs.make_config("ppo", {
            "max_steps": steps, "checkpoint_every": steps, "prompts_per_step": PROMPTS_PER_STEP,
            "max_new_tokens": NEW_TOKENS, "temperature": TEMPERATURE, "top_p": 1.0, "ppo_epochs": 1,
            "num_minibatches": 1, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "learning_rate": LEARNING_RATE,
            "lora_target_modules": "all-linear", "device": "cpu",
            "reward_sources": reward_sources or rewards.demo_preset()})
        run_id = runs.create_run(project.db, config)
        records = []
        runs.execute(project.path, run_id, on_metrics=records.append)
        project.close()
    return records


def save_reward_model_copy(model_folder: Path, folder: Path) -> Path:
    """The base with a fresh one-output head, as a sequence-classification folder: TRL's reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_folder, num_labels=1, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_folder).save_pretrained(folder)
    return folder


# --- the TRL side (runs inside bench/.venv-trl029) ----------------------------------------------

def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    marker = TRL_VENV / ".installed"
    if not marker.exists():
        print(f"Creating {TRL_VENV} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", TORCH], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
        marker.write_text(" ".join([TORCH, *TRL_PACKAGES]))
    return python


def trl_worker(model_folder: str, prompts_file: str, steps: int, threads: int, out_file: str) -> None:
    """Train TRL's PPOTrainer for `steps` steps and write the wall time of each to `out_file`."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_folder, padding_side="left")  # as TRL's examples: prompts end together
    prompts = json.loads(Path(prompts_file).read_text())
    dataset = Dataset.from_dict({"input_ids": [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(model_folder, num_labels=1, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(model_folder, num_labels=1, dtype=torch.float32)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = PPOConfig(
            output_dir=output_dir, per_device_train_batch_size=PROMPTS_PER_STEP, gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=1, total_episodes=PROMPTS_PER_STEP * steps,
            response_length=NEW_TOKENS, temperature=TEMPERATURE, stop_token="eos", learning_rate=LEARNING_RATE,
            local_rollout_forward_batch_size=PROMPTS_PER_STEP, num_sample_generations=0, report_to="none",
            save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, seed=0)
        trainer = PPOTrainer(
            args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward_model,
            value_model=value_model, train_dataset=dataset,
            peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=[timer])
        trainer.train()
    seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    Path(out_file).write_text(json.dumps({"seconds": seconds, "torch": torch.__version__,
                                          "versions": package_versions(["trl", "transformers", "peft", "accelerate"])}))


def package_versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in names}


def run_trl(model_folder: Path, prompts: list, steps: int, threads: int) -> dict:
    python = ensure_trl_venv()
    with tempfile.TemporaryDirectory() as folder:
        prompts_file, out_file = Path(folder) / "prompts.json", Path(folder) / "trl.json"
        prompts_file.write_text(json.dumps(prompts))
        subprocess.run([python, __file__, "--trl-worker", str(model_folder), str(prompts_file), str(steps),
                        str(threads), str(out_file)], check=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "TRL_EXPERIMENTAL_SILENCE": "1"})
        return json.loads(out_file.read_text())


# --- the comparison ---------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    parser.add_argument("--skip-trl", action="store_true", help="time the studio only")
    parser.add_argument("--rules-only", action="store_true",
                        help="time the studio with the rule reward only, not also with a reward model")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random model, 2 steps, median of the second: checks that the bench runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 2, 1

    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)

    from studio.core.models import ModelSource, resolve_folder
    from studio.core.tiny import build_tiny_model_folder

    if args.smoke:
        model_folder = build_tiny_model_folder(Path(tempfile.mkdtemp(prefix="studio-bench-")) / "tiny")
    else:
        model_folder = resolve_folder(ModelSource("demo"))
    prompts = load_prompts(PROMPTS_PER_STEP * args.steps)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average at start {os.getloadavg()}", flush=True)
    print(f"{PROMPTS_PER_STEP} prompts/step, {NEW_TOKENS} new tokens, 1 PPO epoch, LoRA r={LORA_R} all-linear, "
          f"{args.steps} steps, median after {args.warmup}", flush=True)

    trl = None if args.skip_trl else run_trl(model_folder, prompts, args.steps, args.threads)
    if trl:
        print(f"TRL {trl['versions']['trl']} (torch {trl['torch']}, {trl['versions']}): "
              f"{[round(s, 2) for s in trl['seconds']]}", flush=True)
    results = {"the demo rule reward": run_studio(prompts, args.steps, model_folder=model_folder)}
    if not args.rules_only:
        with tempfile.TemporaryDirectory() as folder:
            reward_model = save_reward_model_copy(model_folder, Path(folder) / "reward-model")
            results["a reward model, copy of the base (as TRL)"] = run_studio(
                prompts, args.steps, [{"type": "reward_model", "path": str(reward_model)}], model_folder)
    theirs = steady_median(trl["seconds"], args.warmup) if trl else None
    print(f"\nload average now {os.getloadavg()}")
    if trl:
        print(f"TRL PPOTrainer: {theirs:.2f} s/step")
    for reward, records in results.items():
        ours = steady_median([r["step_seconds"] for r in records], args.warmup)
        split = {name: steady_median([r[f"time/{name}"] for r in records], args.warmup)
                 for name in ("generation", "scoring", "training")}
        length = statistics.mean(r["response_length_mean"] for r in records)
        print(f"\nstudio PPO with {reward}: {[round(r['step_seconds'], 2) for r in records]}")
        print(f"  {ours:.2f} s/step (generation {split['generation']:.2f}, scoring {split['scoring']:.2f}, "
              f"training {split['training']:.2f}; responses of {length:.1f} tokens on average)")
        if trl:
            print(f"  speed-up over TRL: {theirs / ours:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
