"""Data-parallel DPO on the CPU (gloo): 2 processes against 1 at the same global batch.

    .venv/bin/python bench/ddp_cpu.py                          # the demo model, 8 steps of 4 pairs (minutes)
    .venv/bin/python bench/ddp_cpu.py --model tiny --steps 12  # the tiny random model
    .venv/bin/python bench/ddp_cpu.py --smoke                  # tiny, 2 steps (a test runs it)

One bundle, copied twice: `studio run-bundle` in one process, and `torchrun --nproc_per_node 2 -m
studio run-bundle` (each process 1 torch thread). Prints the median seconds per step of each and the
ratio 2-process / 1-process (the reference), and the largest difference between their per-step
losses and reward margins, which should be float noise: the point of the data-parallel path is
equal results; on 2 shared cores little speed-up is expected.
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


def make_bundle(folder: Path, tiny: bool, steps: int) -> Path:
    from studio.core import bundles, runs, store

    if tiny:
        from studio.core.tiny import build_tiny_model_folder

        base = {"kind": "folder", "path": str(build_tiny_model_folder(folder / "tiny"))}
    else:
        base = {"kind": "demo"}
    project = store.Project.create(folder / "project", base_model=base)
    pairs = [json.loads(line) for line in (ROOT / "resources" / "demo" / "preference_pairs.jsonl").read_text().splitlines()]
    store.add_dataset(project.db, "pairs", "preference", pairs)
    config = runs.make_config("dpo", {"max_steps": steps, "checkpoint_every": 1000,
                                      "batch_size": 4, "max_length": 1024, "eval_max_new_tokens": 2})
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
    parser.add_argument("--model", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.steps = "tiny", 2
    with tempfile.TemporaryDirectory(prefix="ddp-cpu-") as tmp:
        bundle = make_bundle(Path(tmp), args.model == "tiny", args.steps)
        one = run(shutil.copytree(bundle, Path(tmp) / "one"), 1)
        two = run(shutil.copytree(bundle, Path(tmp) / "two"), 2)
    single = statistics.median(r["step_seconds"] for r in one)
    double = statistics.median(r["step_seconds"] for r in two)
    differences = {name: max(abs(a[name] - b[name]) for a, b in zip(one, two))
                   for name in ("loss", "rewards/margins", "grad_norm")}
    print(f"model: {'tiny random' if args.model == 'tiny' else 'demo'}, {len(one)} steps of 4 pairs, fp32, "
          "1 thread per process")
    print(f"1 process:   {single:.3f} s/step (median)  [reference]")
    print(f"2 processes: {double:.3f} s/step (median)  ratio {double / single:.2f}x of 1 process")
    print("largest per-step difference, 2 vs 1 process: " +
          ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))


if __name__ == "__main__":
    main()
