"""How long a short DPO run takes to reach its first step, in a child process as the window runs it.

A 4-step DPO run on the demo project (230 pairs) used to compute reference log-probs for every pair
before its first step; it now computes them for the 16 pairs 4 steps of 4 reach. This prints the
time to step 1, each long phase's last progress report, and the reference pass's share of the pairs.
`--smoke` does the same on the tiny random model (a test runs it).

    python bench/first_step.py [--smoke] [--project DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def make_project(smoke: bool, folder: Path) -> Path:
    from studio.core import demo, store

    if not smoke:
        return demo.ensure_demo_project(folder)
    from studio.core.tiny import build_tiny_model_folder

    model = build_tiny_model_folder(folder / "tiny-model")
    with store.Project.create(folder / "project", base_model={"kind": "folder", "path": str(model)}) as project:
        pair = {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi."}],
                "rejected": [{"role": "assistant", "content": "Hello there, how nice!"}]}
        store.add_dataset(project.db, "pairs", "preference", [pair] * 40)
    return folder / "project"


def main() -> None:
    from studio.core import dpo, runs, store
    from studio.core.run_process import RunProcess

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny random model, 40 pairs")
    parser.add_argument("--project", type=Path, help="where to make (or find) the demo project")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="first-step-") as tmp:
        path = make_project(args.smoke, args.project or Path(tmp) / "demo")
        db = store.connect(path)
        config = runs.make_config("dpo", {"max_steps": 4, "checkpoint_every": 4, "eval_max_new_tokens": 8})
        run_id = runs.create_run(db, config)
        pairs = len(dpo.training_pairs(config, db))
        db.close()
        started = time.monotonic()
        phases: dict[str, tuple[int, int, float]] = {}
        process = RunProcess(path, run_id, threads=args.threads)
        first_step = None
        for message in process.messages():
            if message[0] == "progress":
                phases[message[1]] = (message[2], message[3], time.monotonic() - started)
            elif message[0] == "metrics" and message[1]["step"] == 1:
                first_step = time.monotonic() - started
                process.stop_now()  # the figure is the wait for step 1; the rest is not measured
        # CPU seconds of the child: on a shared machine, what the wait would be on an idle core.
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        for phase, (done, total, at) in phases.items():
            print(f"{phase:<32} {done}/{total} done by {at:6.1f} s")
        reference = phases.get("Reference pass (pairs)", (0, 0, 0))[1]
        print(f"reference pass: {reference} of {pairs} pairs ({reference / pairs:.0%} of the full pass it replaces)")
        print(f"time to step 1: {first_step:.1f} s wall, {cpu.ru_utime + cpu.ru_stime:.1f} s of child CPU "
              f"({args.threads} thread(s))" if first_step else "the run never reached step 1")


if __name__ == "__main__":
    main()
