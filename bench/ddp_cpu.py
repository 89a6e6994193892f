"""Data-parallel training on the CPU (gloo): 2 processes against 1 at the same global batch.

    .venv/bin/python bench/ddp_cpu.py                          # DPO, the demo model, 8 steps of 4 pairs (minutes)
    .venv/bin/python bench/ddp_cpu.py --model tiny --steps 12  # the tiny random model
    .venv/bin/python bench/ddp_cpu.py --method ppo --model tiny  # PPO: 4 rollouts per step (2 per process)
    .venv/bin/python bench/ddp_cpu.py --smoke [--method ppo]   # tiny, 2 steps (a test runs both)

One bundle, copied twice: `studio run-bundle` in one process, and `torchrun --nproc_per_node 2 -m
studio run-bundle` (each process 1 torch thread). Prints the median seconds per step of each and the
ratio 2-process / 1-process (the reference), and the largest difference between three of their
per-step metrics, which should be float noise: the point of the data-parallel path is equal
results; on 2 shared cores little speed-up is expected. PPO, GRPO and RLOO (4 prompts per step;
GRPO/RLOO 2 completions each) split the sampling too: the bench prints the rollouts each process sampled.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


COMPARED = {"dpo": ("loss", "rewards/margins", "grad_norm"),
            "ppo": ("loss/policy_avg", "objective/scores", "objective/kl"),
            "grpo": ("loss", "reward", "kl"), "rloo": ("loss", "reward", "kl")}
SETTINGS = {"dpo": {"batch_size": 4, "max_length": 1024},
            "ppo": {"prompts_per_step": 4, "max_new_tokens": 24},
            "grpo": {"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 24},
            "rloo": {"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 24}}


def make_bundle(folder: Path, method: str, tiny: bool, steps: int) -> Path:
    from studio.core import bundles, runs, store

    if tiny:
        from studio.core.tiny import build_tiny_model_folder

        base = {"kind": "folder", "path": str(build_tiny_model_folder(folder / "tiny"))}
    else:
        base = {"kind": "demo"}
    project = store.Project.create(folder / "project", base_model=base)
    name, kind = ("preference_pairs", "preference") if method == "dpo" else ("prompts", "prompts")
    rows = [json.loads(line) for line in (ROOT / "resources" / "demo" / f"{name}.jsonl").read_text().splitlines()]
    store.add_dataset(project.db, name, kind, rows)
    config = runs.make_config(method, {"max_steps": steps, "checkpoint_every": 1000, "eval_max_new_tokens": 2,
                                       **SETTINGS[method]})
    run_id = runs.create_run(project.db, config)
    project.close()
    return bundles.make_bundle(folder / "project", run_id, folder / "bundle")


def run(bundle: Path, processes: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "studio"] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                 "-m", "studio"])
    subprocess.run([*launcher, "run-bundle", str(bundle)], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    from studio.core.bundles import read_jsonl

    return read_jsonl(bundle / "run" / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="--model tiny --steps 2")
    parser.add_argument("--method", choices=list(COMPARED), default="dpo")
    parser.add_argument("--model", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.steps = "tiny", 2
    with tempfile.TemporaryDirectory(prefix="ddp-cpu-") as tmp:
        bundle = make_bundle(Path(tmp), args.method, args.model == "tiny", args.steps)
        one = run(shutil.copytree(bundle, Path(tmp) / "one"), 1)
        two = run(shutil.copytree(bundle, Path(tmp) / "two"), 2)
    single = statistics.median(r["step_seconds"] for r in one)
    double = statistics.median(r["step_seconds"] for r in two)
    differences = {name: max(abs(a[name] - b[name]) for a, b in zip(one, two))
                   for name in COMPARED[args.method]}
    unit = "pairs" if args.method == "dpo" else "rollouts"
    print(f"{args.method}, model: {'tiny random' if args.model == 'tiny' else 'demo'}, {len(one)} steps of 4 {unit}, "
          "fp32, 1 thread per process")
    if args.method != "dpo":
        print(f"rollouts sampled per step by one process: {one[0]['rollouts_per_process']} (1 process), "
              f"{two[0]['rollouts_per_process']} (2 processes)")
    print(f"1 process:   {single:.3f} s/step (median)  [reference]")
    print(f"2 processes: {double:.3f} s/step (median)  ratio {double / single:.2f}x of 1 process")
    print("largest per-step difference, 2 vs 1 process: " +
          ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))


if __name__ == "__main__":
    main()
