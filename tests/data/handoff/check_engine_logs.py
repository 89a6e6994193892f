"""Write logs with OpenRLHF 0.11.0's and verl 0.7.0's own loggers, then import them (run by hand).

    pip download openrlhf==0.11.0 verl==0.7.0 --no-deps -d wheels   # then unzip each wheel
    PYTHONPATH=. python tests/data/handoff/check_engine_logs.py OPENRLHF_ROOT VERL_ROOT

OPENRLHF_ROOT holds openrlhf/utils/logging_utils.py, VERL_ROOT verl/utils/tracking.py. Both modules
import only the standard library at the top, so they load without the engines' GPU dependencies.
The adapters are made as tests/test_import_engines.py makes them (the engines' save code needs
DeepSpeed / FSDP on GPUs); the logs here are the engines' own.
"""

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from studio.core import bundles, store
from studio.core.tiny import build_tiny_model_folder
from tests.test_import_engines import save_like_openrlhf, save_like_verl


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(openrlhf_root: Path, verl_root: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="engine-logs-"))
    base = build_tiny_model_folder(work / "base")
    project = store.Project.create(work / "project", base_model={"kind": "folder", "path": str(base)})

    logging_utils = load(openrlhf_root / "openrlhf/utils/logging_utils.py", "openrlhf_logging_utils")
    output = work / "openrlhf-output"
    args = SimpleNamespace(logger=SimpleNamespace(tensorboard_dir=str(output / "tensorboard"),
                                                  wandb=SimpleNamespace(run_name="ppo_1202T01:00")))
    logger = logging_utils.TensorboardLogger(args)
    for step in (1, 2, 3):
        logger.log_train(step, {"policy_loss": -0.1 * step, "actor_lr": 1e-5, "kl": 0.01 * step,
                                "rollout/reward_mean": 0.5 + step, "generated_samples": ("a sample", 0.5)})
    logger.close()
    save_like_openrlhf(base, output)
    run_id = bundles.import_run(project.db, project.path, output)
    report("OpenRLHF TensorboardLogger", project.db, run_id)

    os.environ["VERL_FILE_LOGGER_PATH"] = str(work / "verl-output" / "metrics.jsonl")
    os.environ["TENSORBOARD_DIR"] = str(work / "verl-output" / "tensorboard")
    (work / "verl-output").mkdir()
    tracking = load(verl_root / "verl/utils/tracking.py", "verl_tracking")
    logger = tracking.Tracking("studio", "run7", default_backend=["file", "tensorboard"])
    for step in (1, 2, 3):
        logger.log({"actor/pg_loss": -0.1 * step, "critic/score/mean": 0.2 * step, "actor/ppo_kl": 0.001}, step)
    for backend in logger.logger.values():
        backend.finish()
    save_like_verl(base, work / "verl-output" / "global_step_3" / "actor")
    (work / "verl-output" / "latest_checkpointed_iteration.txt").write_text("3")
    run_id = bundles.import_run(project.db, project.path, work / "verl-output")
    report("verl Tracking(file, tensorboard)", project.db, run_id)
    project.close()


def report(what: str, db, run_id: int) -> None:
    print(f"{what}: run {run_id}, status {store.get_run(db, run_id)['status']}, "
          f"checkpoints {[c['step'] for c in store.checkpoints(db, run_id)]}")
    for name, (steps, values) in sorted(store.run_metrics(db, run_id).items()):
        print(f"  {name}: steps {steps} values {[float(format(v, '.4g')) for v in values]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
