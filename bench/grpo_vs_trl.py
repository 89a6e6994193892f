"""Our GRPO engine against TRL 1.16.0's GRPOTrainer: seconds per step and its split, peak memory.

Both sides train the demo model (SmolLM2-135M-Instruct) in fp32 on the CPU with a LoRA adapter (r=16,
alpha=32, all linear layers), on the same prompts (the demo's), 4 prompts x num_generations 4 = 16
completions per step, up to 48 new tokens at temperature 1, top_p 1; loss_type dapo, scale_rewards
group, one iteration per generation, beta 0.04 (a reference pass on both sides), lr 5e-5, and the same
reward: the studio's demo rule preset, which TRL calls as a reward function (so the reward work is
equal too). TRL reads the prompts in its own shuffled order, ours in ours: the same prompts, not the
same batches. Each side runs in its own process (TRL's in bench/.venv-trl, made by dpo_vs_trl.py's
`ensure_trl_venv`) with the same torch thread count, so each peak RSS is that process's own.

Wall seconds suffer when other processes share the cores; CPU seconds per step (one thread a side)
are the steadier figure then. The split: ours reports time/generation (sampling), time/scoring (rewards and the reference pass) and
time/training (forward, backward, optimizer step). TRL's is measured around its methods: generation
= ``_generate``, scoring = the rest of ``_generate_and_score_completions`` (rewards, reference
log-probs), training = the rest of the step.

    .venv/bin/python bench/grpo_vs_trl.py --steps 5 --threads 1   # medians of steps 2..5
    .venv/bin/python bench/grpo_vs_trl.py --smoke                  # tiny random model, 2 steps: does it run?
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # import studio from the checkout
sys.path.insert(0, str(ROOT / "bench"))
from dpo_vs_trl import ensure_trl_venv, run_child  # noqa: E402  (the same venv and child-process plumbing)
OUT = ROOT / "bench" / "out" / "grpo"
SEED, PROMPTS_PER_STEP, NUM_GENERATIONS, NEW_TOKENS, LORA_R, LORA_ALPHA = 0, 4, 4, 48, 16, 32
BETA, LEARNING_RATE, TEMPERATURE = 0.04, 5e-5, 1.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_prompts(count: int) -> list:
    """The demo's shaping prompts (chat messages), or made-up ones when the file is missing."""
    path = ROOT / "resources" / "demo" / "prompts.jsonl"
    if path.exists():
        rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        if len(rows) >= count:
            return rows[:count]
    return [[{"role": "user", "content": f"Explain topic number {i} briefly."}] for i in range(count)]


# --- our side ---------------------------------------------------------------------------------

def run_ours(job: dict) -> dict:
    import torch

    from studio.core import grpo, rewards, runs, store
    from studio.core.cpu_linears import route_frozen_linears
    from studio.core.models import ModelSource, add_lora, load_model

    with tempfile.TemporaryDirectory() as tmp:
        project = store.Project.create(Path(tmp) / "project")
        store.add_dataset(project.db, "bench", "prompts", [{"prompt": p} for p in job["prompts"]])
        config = runs.make_config("grpo", {
            "seed": SEED, "max_steps": job["steps"], "prompts_per_step": PROMPTS_PER_STEP,
            "num_generations": NUM_GENERATIONS, "max_completion_length": NEW_TOKENS, "temperature": TEMPERATURE,
            "beta": BETA, "loss_type": "dapo", "scale_rewards": "group", "learning_rate": LEARNING_RATE,
            "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "reward_sources": rewards.demo_preset()})
        model, tokenizer = load_model(ModelSource("folder", job["model_folder"]))
        torch.manual_seed(SEED)
        policy = add_lora(model, LORA_R, LORA_ALPHA, 0.0, "all-linear")
        route_frozen_linears(policy)  # as runs.train does
        data = runs.gather_training_data(project.db, config)
        engine = grpo.Engine(config, policy, tokenizer, data, "cpu", Path(tmp) / "runs" / "0")
        steps = []
        for step in range(job["steps"]):
            started, cpu_started = time.perf_counter(), time.process_time()
            record = engine.train_step(step)
            steps.append({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                          "generation": record["time/generation"],
                          "scoring": record["time/scoring"], "training": record["time/training"],
                          "reward": record["reward"], "completion_tokens": record["completions/mean_length"]})
        project.close()
    return {"steps": steps, "peak_rss_mb": peak_rss_mb()}


# --- TRL's side (runs in bench/.venv-trl) -----------------------------------------------------

def run_trl(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from dpo_vs_trl import trainable_config
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from studio.core import rewards

    reward_function = rewards.RewardFunction(rewards.demo_preset())

    def demo_preset(prompts, completions, **kwargs):  # the studio's rules, on the completions' text
        return reward_function(prompts, [c[-1]["content"] for c in completions])[0].tolist()

    phases = {"generation": 0.0, "generate_and_score": 0.0}
    steps = []

    def timed(function, phase):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[phase] += time.perf_counter() - started
        return wrapper

    class TimeSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            phases.update(generation=0.0, generate_and_score=0.0)
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            steps.append({"seconds": seconds, "cpu_seconds": time.process_time() - self.cpu_started,
                          "generation": phases["generation"],
                          "scoring": phases["generate_and_score"] - phases["generation"],
                          "training": seconds - phases["generate_and_score"]})

    tokenizer = AutoTokenizer.from_pretrained(job["model_folder"])
    model = AutoModelForCausalLM.from_pretrained(job["model_folder"], config=trainable_config(job["model_folder"]),
                                                 dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, seed=SEED, max_steps=job["steps"],
                          per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
                          num_generations=NUM_GENERATIONS, gradient_accumulation_steps=1,
                          max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, beta=BETA,
                          loss_type="dapo", scale_rewards="group", learning_rate=LEARNING_RATE,
                          lr_scheduler_type="linear", bf16=False, use_cpu=True, logging_steps=1,
                          save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=[demo_preset], args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in job["prompts"]]),
                              processing_class=tokenizer, peft_config=lora, callbacks=[TimeSteps()])
        trainer._generate = timed(trainer._generate, "generation")
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "generate_and_score")
        trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    for step, entry in zip(steps, logged):
        step.update(reward=entry["reward"], completion_tokens=entry["completions/mean_length"])
    return {"steps": steps, "peak_rss_mb": peak_rss_mb()}


# --- the comparison ---------------------------------------------------------------------------

def run_side(side: str, job: dict) -> dict:
    """One side in its own process (TRL's in its venv); returns its result."""

    python = ensure_trl_venv() if side == "trl" else Path(sys.executable)
    OUT.mkdir(parents=True, exist_ok=True)
    job_file, result_file, log_file = (OUT / f"{side}{suffix}" for suffix in (".job.json", ".result.json", ".log"))
    job_file.write_text(json.dumps({**job, "side": side}))
    load_before = os.getloadavg()[0]
    with open(log_file, "w") as log:
        subprocess.run([python, __file__, "--job", job_file, "--result", result_file], check=True,
                       stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    return {**json.loads(result_file.read_text()), "load_average": (load_before, os.getloadavg()[0])}


def report(results: dict[str, dict], job: dict) -> str:
    def median(result, key):
        values = [step[key] for step in result["steps"][1:]] or [result["steps"][0][key]]
        return statistics.median(values)

    def row(label, values, fmt="{:12.2f}"):
        return f"{label:36}" + "".join(fmt.format(v) for v in values)

    names = list(results)
    lines = [f"{job['steps']} steps x {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} generations, {NEW_TOKENS} new "
             f"tokens, {Path(job['model_folder']).name}, CPU fp32, torch threads {job['threads'] or 'default'}",
             row("", names, "{:>12}")]
    for key in ("seconds", "cpu_seconds", "generation", "scoring", "training", "completion_tokens", "reward"):
        lines.append(row(f"{key} (median of steps 2..N)", [median(r, key) for r in results.values()]))
    lines.append(row("peak RSS MB", [r["peak_rss_mb"] for r in results.values()], "{:12.0f}"))
    lines.append("load average (1 min) before/after: " + ", ".join(
        f"{n} {r['load_average'][0]:.1f}/{r['load_average'][1]:.1f}" for n, r in results.items()))
    if {"ours", "trl"} <= results.keys():
        ours, trl = results["ours"], results["trl"]
        lines.append(f"TRL / ours: s/step x{median(trl, 'seconds') / median(ours, 'seconds'):.2f} (goal: 2), "
                     f"CPU s/step x{median(trl, 'cpu_seconds') / median(ours, 'cpu_seconds'):.2f}, "
                     f"per generated token x{(median(trl, 'seconds') / median(trl, 'completion_tokens')) / (median(ours, 'seconds') / median(ours, 'completion_tokens')):.2f}, "
                     f"peak RSS x{trl['peak_rss_mb'] / ours['peak_rss_mb']:.2f} (goal: at least 1)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sides", default="ours,trl", help="ours, trl (comma-separated)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 2 steps: checks that the bench runs")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.job:
        run_child(args.job, args.result, run_ours if json.loads(args.job.read_text())["side"] == "ours" else run_trl)
        return

    from studio.core.models import ModelSource, resolve_folder
    from studio.core.tiny import build_tiny_model_folder

    global OUT
    if args.smoke:  # its own folder: a smoke run may go on beside a real one
        OUT = OUT / "smoke"
        model_folder, steps = build_tiny_model_folder(Path(tempfile.mkdtemp(prefix="studio-bench-")) / "tiny"), 2
    else:
        model_folder, steps = resolve_folder(ModelSource("demo")), args.steps
    job = {"prompts": load_prompts(PROMPTS_PER_STEP * steps), "steps": steps, "threads": args.threads,
           "model_folder": str(model_folder)}
    results = {}
    for side in args.sides.split(","):
        results[side] = run_side(side, job)
        print(f"{side} done", file=sys.stderr)
    text = report(results, job)
    print(text)
    (OUT / "report.json").write_text(json.dumps({"job": {k: v for k, v in job.items() if k != "prompts"},
                                                 "results": results, "report": text}, indent=1))


if __name__ == "__main__":
    main()
