"""Our DPO engine against TRL 1.16.0's DPOTrainer: seconds per step, peak memory, step-1 agreement.

Both sides train the demo model (SmolLM2-135M-Instruct) in fp32 on the CPU with a LoRA adapter
(r=16, alpha=32, all linear layers, created right after seeding with the same seed: the same initial
adapter, with B=0, so the step-1 policy is the base model on both sides), on the same pairs, 4 per
optimizer step, in the same order (TRL reads them in our engine's order with a sequential sampler),
sigmoid loss, beta 0.1, lr 5e-5 linear, max_length 1024. TRL runs twice: with its defaults
(``trl``: gradient checkpointing on, reference log-probs recomputed at every step), and in its
fastest equal-work configuration (``trl-tuned``: no gradient checkpointing,
precompute_ref_log_probs=True, so it too computes them once before the first step). We compute them
once before the first step: the end-to-end figure (setup + one epoch) counts that.

Ours runs twice: 4 pairs per forward pass (batch_size=4), and 1 pair per forward pass with 4
accumulated (batch_size=1, gradient_accumulation_steps=4): the same pairs and the same loss per
step, less activation memory. Each configuration runs in its own process (TRL's in a venv this
script makes, bench/.venv-trl), so each peak RSS is that process's own. Wall seconds suffer when
other processes share the cores; CPU seconds per step are the steadier figure then.

    .venv/bin/python bench/dpo_vs_trl.py                 # 48 pairs: one epoch = 12 steps
    .venv/bin/python bench/dpo_vs_trl.py --pairs 8 --configs ours:4   # a quick look at one side
    .venv/bin/python bench/dpo_vs_trl.py --smoke                       # tiny random model, 2 steps: does it run?
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
TRL_VENV = ROOT / "bench" / ".venv-trl"
OUT = ROOT / "bench" / "out"
DEMO_PAIRS = ROOT / "resources" / "demo" / "preference_pairs.jsonl"
SEED, PAIRS_PER_STEP, LORA_R, LORA_ALPHA, MAX_LENGTH, BETA, LEARNING_RATE = 0, 4, 16, 32, 1024, 0.1, 5e-5


class StepClock:
    """Wall and CPU seconds of each step."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def start(self) -> None:
        self.wall_started, self.cpu_started = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall.append(time.perf_counter() - self.wall_started)
        self.cpu.append(time.process_time() - self.cpu_started)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def lora_a_checksum(model) -> float:
    """Sum of every LoRA A weight: equal on both sides when the initial adapters are the same."""
    return sum(float(p.detach().double().sum()) for name, p in model.named_parameters() if "lora_A" in name)


def result(setup_seconds: float, clock: StepClock, metrics: list[dict], checksum: float, **extra) -> dict:
    return {"setup_seconds": setup_seconds, "step_seconds": clock.wall, "step_cpu_seconds": clock.cpu,
            "metrics": metrics[:2], "lora_a_checksum": checksum, "peak_rss_mb": peak_rss_mb(), **extra}


# --- the pairs --------------------------------------------------------------------------------

def generated_pairs(count: int) -> list[dict]:
    """Stand-ins for the demo pairs: ~125 response tokens per side."""
    filler = "The answer depends on several factors that are worth explaining one by one in some detail. " * 6
    return [{"prompt": [{"role": "user", "content": f"Explain topic number {i} briefly."}],
             "chosen": [{"role": "assistant", "content": f"Topic {i} in short. " + filler}],
             "rejected": [{"role": "assistant", "content": f"Well, topic {i}! " + filler.upper()}]}
            for i in range(count)]


def load_pairs(count: int) -> list[dict]:
    if DEMO_PAIRS.exists():
        rows = [json.loads(line) for line in DEMO_PAIRS.read_text().splitlines() if line.strip()]
        if len(rows) >= count:
            return rows[:count]
    return generated_pairs(count)


def our_pair_order(pairs: list[dict], count: int, model_folder: str) -> list[int]:
    """The first `count` pair indices our engine visits, in its order (one epoch at most)."""
    from studio.core import dpo
    from studio.core.models import load_tokenizer

    tokenizer = load_tokenizer(Path(model_folder))
    lengths = [dpo.tokenize_pair(tokenizer, pair).length for pair in pairs]
    return dpo.epoch_order(lengths, PAIRS_PER_STEP * dpo.LENGTH_GROUP_STEPS, SEED, epoch=0)[:count]


# --- our side ---------------------------------------------------------------------------------

def run_ours(job: dict) -> dict:
    import torch

    from studio.core import dpo, runs, store
    from studio.core.cpu_linears import route_frozen_linears
    from studio.core.models import ModelSource, add_lora, load_model

    batch_size = job["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        project = store.Project.create(Path(tmp) / "project")
        store.add_dataset(project.db, "bench", "preference", job["pairs"])
        config = runs.make_config("dpo", {
            "seed": SEED, "max_steps": job["steps"], "batch_size": batch_size,
            "gradient_accumulation_steps": PAIRS_PER_STEP // batch_size, "learning_rate": LEARNING_RATE,
            "beta": BETA, "max_length": MAX_LENGTH, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA})
        model, tokenizer = load_model(ModelSource("folder", job["model_folder"]))
        torch.manual_seed(SEED)
        policy = add_lora(model, LORA_R, LORA_ALPHA, 0.0, "all-linear")
        route_frozen_linears(policy)  # as runs.train does
        checksum = lora_a_checksum(policy)
        setup_started = time.perf_counter()
        data = runs.gather_training_data(project.db, config)
        engine = dpo.Engine(config, policy, tokenizer, data, "cpu", Path(tmp))  # tokenize + reference pass
        setup_seconds = time.perf_counter() - setup_started
        clock, metrics = StepClock(), []
        for step in range(job["steps"]):
            clock.start()
            metrics.append(engine.train_step(step))
            clock.stop()
        order = [i for n in range(job["steps"] * PAIRS_PER_STEP // batch_size) for i in engine.batch_indices(n)]
        project.close()
    return result(setup_seconds, clock, metrics, checksum, order=order)


# --- TRL's side (runs in bench/.venv-trl) -----------------------------------------------------

def trainable_config(model_folder: str):
    """The folder's config, without a quantization_config: folders converted from GGUF by older
    versions of the studio still name the GGUF file they came from, and transformers' Trainer refuses
    to train a model it believes is GGUF-quantised (today's converted folders drop it)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def run_trl(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = StepClock()

    class TimeSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    tokenizer = AutoTokenizer.from_pretrained(job["model_folder"])
    model = AutoModelForCausalLM.from_pretrained(job["model_folder"], config=trainable_config(job["model_folder"]),
                                                 dtype=torch.float32)
    tuned = job["side"] == "trl-tuned"
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, seed=SEED, max_steps=job["steps"], per_device_train_batch_size=PAIRS_PER_STEP,
                         gradient_accumulation_steps=1, learning_rate=LEARNING_RATE, lr_scheduler_type="linear",
                         beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH, bf16=False, use_cpu=True,
                         gradient_checkpointing=not tuned, precompute_ref_log_probs=tuned,
                         train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                         report_to=[], disable_tqdm=True, dataloader_num_workers=0)
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        setup_started = time.perf_counter()
        # DPOTrainer seeds (set_seed) right before wrapping the model: the same RNG state as our side.
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(job["ordered_pairs"]),
                             processing_class=tokenizer, peft_config=lora, callbacks=[TimeSteps()])
        checksum = lora_a_checksum(trainer.model)
        setup_seconds = time.perf_counter() - setup_started
        trainer.train()
    metrics = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    return result(setup_seconds, clock, metrics, checksum)


# --- the comparison ---------------------------------------------------------------------------

def ensure_trl_venv() -> Path:
    """bench/.venv-trl: TRL 1.16.0 over this venv's own torch, transformers, peft and accelerate.

    The venv sees this one's packages through a .pth file, so pip installs only what TRL adds (TRL
    itself, datasets); both sides then run the very same torch build (PyPI's torch is a CUDA build)."""
    import site

    python = TRL_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", TRL_VENV], check=True)
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "studio-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "trl==1.16.0"], check=True)
    return python


def run_config(name: str, job: dict) -> dict:
    """Run one configuration ("ours:<batch_size>", "trl" or "trl-tuned") in its own process; its output
    goes to bench/out."""
    side, _, batch_size = name.partition(":")
    job = {**job, "side": side, "batch_size": int(batch_size or PAIRS_PER_STEP)}
    python = ensure_trl_venv() if side.startswith("trl") else Path(sys.executable)
    stem = OUT / name.replace(":", "-")
    job_file, result_file, log_file = (stem.with_suffix(suffix) for suffix in (".job.json", ".result.json", ".log"))
    job_file.write_text(json.dumps(job))
    load_before = os.getloadavg()[0]
    with open(log_file, "w") as log:
        subprocess.run([python, __file__, "--job", job_file, "--result", result_file], check=True,
                       stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    return {**json.loads(result_file.read_text()), "load_average": (load_before, os.getloadavg()[0])}


def run_child(job_file: Path, result_file: Path, run) -> None:
    """In a child process: one configuration, its job in, its result out, at the job's torch threads."""
    job = json.loads(job_file.read_text())
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    result_file.write_text(json.dumps(run(job)))


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def report(results: dict[str, dict], job: dict) -> str:
    names = list(results)

    def row(label: str, values, fmt: str = "{:12.2f}") -> str:
        return f"{label:38}" + "".join(fmt.format(v) for v in values)

    def median_after_warmup(r, key):
        return statistics.median(r[key][1:])

    def end_to_end(r):
        return r["setup_seconds"] + sum(r["step_seconds"])

    lines = [f"{job['steps']} steps x {PAIRS_PER_STEP} pairs ({len(job['pairs'])} pairs: one epoch), demo model, "
             f"CPU fp32, torch threads: {job['threads'] or 'default'}; trl: TRL's defaults, trl-tuned: "
             "no gradient checkpointing, precompute_ref_log_probs=True",
             row("", names, "{:>12}"),
             row("wall s/step (median of steps 2..N)", [median_after_warmup(r, "step_seconds") for r in results.values()]),
             row("CPU s/step (median of steps 2..N)", [median_after_warmup(r, "step_cpu_seconds") for r in results.values()]),
             row("setup s (ours: reference pass)", [r["setup_seconds"] for r in results.values()]),
             row("end-to-end s (setup + N steps)", [end_to_end(r) for r in results.values()]),
             row("peak RSS MB", [r["peak_rss_mb"] for r in results.values()], "{:12.0f}")]
    for step in (0, 1):
        for name in ("loss", "logps/chosen", "logps/rejected"):
            lines.append(row(f"step {step + 1} {name}", [r["metrics"][step][name] for r in results.values()],
                             "{:12.5f}"))
    lines.append(row("LoRA A checksum", [r["lora_a_checksum"] for r in results.values()], "{:12.6f}"))
    lines.append("load average (1 min) before/after: " + ", ".join(
        f"{n} {r['load_average'][0]:.1f}/{r['load_average'][1]:.1f}" for n, r in results.items()))
    for trl_name in ("trl", "trl-tuned"):
        trl = results.get(trl_name)
        for name, ours in results.items():
            if trl is None or name.startswith("trl"):
                continue
            lines.append(f"{trl_name} / {name}: wall s/step x{median_after_warmup(trl, 'step_seconds') / median_after_warmup(ours, 'step_seconds'):.2f}, "
                         f"CPU s/step x{median_after_warmup(trl, 'step_cpu_seconds') / median_after_warmup(ours, 'step_cpu_seconds'):.2f}, "
                         f"end-to-end x{end_to_end(trl) / end_to_end(ours):.2f}, "
                         f"peak RSS x{trl['peak_rss_mb'] / ours['peak_rss_mb']:.2f}; step-1 rel. diff: " + ", ".join(
                             f"{m} {relative_difference(ours['metrics'][0][m], trl['metrics'][0][m]):.1e}"
                             for m in ("loss", "logps/chosen", "logps/rejected")))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48, help="pairs to train on: one epoch of steps")
    parser.add_argument("--configs", default="ours:4,trl,trl-tuned",
                        help="what to run: ours:<pairs per forward pass>, trl, trl-tuned (comma-separated)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random model and 8 made-up pairs (2 steps): checks that the bench runs")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per side (default: torch's choice); 1 makes CPU seconds a steady "
                             "measure of work when other processes share the cores")
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
        model_folder = build_tiny_model_folder(Path(tempfile.mkdtemp(prefix="studio-bench-")) / "tiny")
        pairs = generated_pairs(2 * PAIRS_PER_STEP)
    else:
        model_folder, pairs = resolve_folder(ModelSource("demo")), load_pairs(args.pairs)
    OUT.mkdir(parents=True, exist_ok=True)
    steps = len(pairs) // PAIRS_PER_STEP
    order = our_pair_order(pairs, steps * PAIRS_PER_STEP, str(model_folder))
    job = {"pairs": pairs, "ordered_pairs": [pairs[i] for i in order], "steps": steps, "threads": args.threads,
           "model_folder": str(model_folder)}
    results = {}
    for name in args.configs.split(","):
        results[name] = run_config(name, job)
        assert name.startswith("trl") or results[name]["order"] == order, f"{name} did not visit the pairs in the expected order"
        print(f"{name} done", file=sys.stderr)
    print(report(results, job))
    (OUT / "report.json").write_text(json.dumps({"job": {k: v for k, v in job.items() if "pairs" not in k},
                                                 "results": results}, indent=1))


if __name__ == "__main__":
    main()
