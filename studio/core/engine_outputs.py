"""Runs trained by other engines, brought back into a project: TRL, OpenRLHF and verl output folders.

What each engine writes when it trains with LoRA, at the versions `export-job` pins (the source
files are named in docs/scale-out.md, "What the engines write"):

    TRL 1.16.0, output_dir/
      checkpoint-<N>/adapter_model.safetensors, adapter_config.json, trainer_state.json (log_history)
      adapter_model.safetensors, adapter_config.json      the final save_model
    OpenRLHF 0.11.0, --ckpt.output_dir/
      adapter_model.safetensors, adapter_config.json      the final save (PEFT save_pretrained),
      config.json, tokenizer files                        tokenizer files written last
      <--ckpt.path>/global_step<N>_hf/                    the same, every --ckpt.save_steps (--ckpt.save_hf)
      <--logger.tensorboard_dir>/<run name>/events.*      scalars train/<name>, eval/<name>
    verl 0.7.0, trainer.default_local_dir/
      global_step_<N>/actor/lora_adapter/adapter_model.safetensors, adapter_config.json
      latest_checkpointed_iteration.txt                   written after a checkpoint is whole
      metrics.jsonl (the file logger, {"step": N, "data": {...}}), TensorBoard events

Each reader finds the LoRA checkpoints that are whole and the metrics, renamed to the store's names
where the engine logs the same quantity (the tables below); the others keep the engine's name.
Every adapter is checked against the project's base model before anything is written, so a
refused folder leaves the project as it was. Importing again updates the same run.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import bundles, runs, store
from .bundles import BundleError
from .models import ModelSource, base_identity, linear_shapes

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")

# Engine metric -> store metric, only where both measure the same thing (docs/scale-out.md says why
# the others are kept under the engine's name).
OPENRLHF_METRICS = {
    "train/loss_mean": "loss",  # DPO: the mean over the step's micro-batches ("train/loss" is the last one's)
    "train/acc_mean": "rewards/accuracies",
    "train/lr": "learning_rate",
    "train/grad_norm": "grad_norm",
    "train/policy_loss": "loss/policy_avg",  # PPO
    "train/critic_loss": "loss/value_avg",
    "train/entropy_loss": "policy/entropy_avg",  # the entropy itself, which its loss term subtracts
    "train/actor_lr": "learning_rate",
    "train/actor_grad_norm": "grad_norm",
    "train/rollout/reward_mean": "objective/scores",
    "train/rollout/response_length_mean": "response_length_mean",
}
VERL_METRICS = {
    "actor/pg_loss": "loss/policy_avg",
    "critic/vf_loss": "loss/value_avg",
    "actor/pg_clipfrac": "policy/clipfrac_avg",
    "critic/vf_clipfrac": "val/clipfrac_avg",
    "actor/entropy": "policy/entropy_avg",
    "actor/lr": "learning_rate",
    "actor/grad_norm": "grad_norm",
    "actor/reward_kl_penalty_coeff": "kl_coef",
    "critic/score/mean": "objective/scores",  # the reward function's score, before the KL penalty
    "critic/rewards/mean": "objective/rlhf_reward",  # score minus the KL penalty, summed over tokens
    "response_length/mean": "response_length_mean",
}


@dataclass
class EngineOutput:
    """What one engine's output folder holds, as the import needs it."""

    engine: str  # "TRL", "OpenRLHF", "verl"
    checkpoints: dict[int, Path] = field(default_factory=dict)  # step -> whole adapter folder
    records: list[dict] = field(default_factory=list)  # {"step": N, metric: value, ...}, store names
    finished: bool | None = None  # None: the folder does not say whether training ended
    method: str = "dpo"  # the run's method when no studio_job.json says


def step_folders(root: Path, pattern: str) -> dict[int, Path]:
    """{N: folder} of the folders in `root` whose name matches `pattern` with N as its one group."""
    found = {}
    if root.is_dir():
        for path in root.iterdir():
            match = re.fullmatch(pattern, path.name)
            if match and path.is_dir():
                found[int(match[1])] = path
    return dict(sorted(found.items()))


def renamed(record: dict, names: dict[str, str]) -> dict:
    return {names.get(key, key): value for key, value in record.items()}


def tensorboard_records(folder: Path) -> list[dict]:
    """The scalars of every TensorBoard event file under `folder`, one record per (step, tag)."""
    runs_with_events = sorted({path.parent for path in folder.rglob("events.out.tfevents.*")})
    if not runs_with_events:
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise BundleError(f"{runs_with_events[0]}: reading TensorBoard event files needs the tensorboard "
                          "package: pip install 'alignment-studio[tensorboard]'") from None
    records = []
    for run_folder in runs_with_events:  # a resumed run writes a second folder: later steps follow
        events = EventAccumulator(str(run_folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            records += [{"step": event.step, tag: event.value} for event in events.Scalars(tag)]
    return records


def verl_jsonl_records(path: Path) -> list[dict]:
    """verl's file logger: one {"step": N, "data": {metric: value}} per line (complete lines only)."""
    records = []
    for number, line in enumerate(bundles.read_jsonl(path), 1):
        if not (isinstance(line.get("step"), int) and isinstance(line.get("data"), dict)):
            raise BundleError(f"{path}, record {number}: not verl's file-logger format "
                              '{"step": N, "data": {...}}')
        records.append({"step": line["step"], **line["data"]})
    return records


def has_adapter(folder: Path) -> bool:
    return any((folder / name).exists() for name in (*ADAPTER_FILES, "adapter_model.bin"))


# --- the readers: each returns None when the folder is not its engine's -------------------------

def read_trl(folder: Path) -> EngineOutput | None:
    """TRL: the newest trainer_state.json (the folder's, else the last checkpoint's) and checkpoint-<N>/."""
    checkpoints = step_folders(folder, r"checkpoint-(\d+)")
    states = [p / "trainer_state.json" for p in [folder, *reversed(checkpoints.values())]
              if (p / "trainer_state.json").exists()]
    if not states:
        return None
    try:
        history = json.loads(states[0].read_text(encoding="utf-8"))["log_history"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{states[0]}: not a TRL trainer state with a log_history ({type(exc).__name__})") from None
    return EngineOutput(
        "TRL", {step: path for step, path in checkpoints.items() if (path / ADAPTER_FILES[0]).exists()},
        [entry for entry in history if "step" in entry and "train_runtime" not in entry],
        finished=(folder / ADAPTER_FILES[0]).exists())  # the trainer's final save_model


def read_openrlhf(folder: Path) -> EngineOutput | None:
    """OpenRLHF: the final adapter in --ckpt.output_dir, global_step<N>_hf/ under --ckpt.path (export-job
    puts it in output/checkpoints; the engine's defaults are ckpt/checkpoints_dpo and _ppo_ray beside
    the job), and TensorBoard scalars. A save is whole once its tokenizer files are written (last)."""
    roots = [folder, folder / "checkpoints", folder.parent / "ckpt" / "checkpoints_dpo",
             folder.parent / "ckpt" / "checkpoints_ppo_ray"]
    saves = {step: path for root in roots for step, path in step_folders(root, r"global_step(\d+)_hf").items()}
    if not saves and not has_adapter(folder):
        return None
    records = [renamed(record, OPENRLHF_METRICS) for record in tensorboard_records(folder)]
    output = EngineOutput("OpenRLHF", {step: path for step, path in sorted(saves.items())
                                       if (path / "tokenizer_config.json").exists()}, records)
    output.finished = has_adapter(folder) and (folder / "tokenizer_config.json").exists()
    if output.finished:  # the final save is the last step's model
        output.checkpoints[max([r["step"] for r in records] + list(output.checkpoints), default=1)] = folder
    output.method = "ppo" if any("loss/policy_avg" in r for r in records) else "dpo"
    return output


def read_verl(folder: Path) -> EngineOutput | None:
    """verl: global_step_<N>/actor/lora_adapter/ up to latest_checkpointed_iteration.txt (steps past it
    are still being written), the file logger's JSONL and TensorBoard scalars."""
    steps = step_folders(folder, r"global_step_(\d+)")
    latest = verl_latest_step(folder)
    if not steps and latest is None:
        return None
    latest = latest or 0
    whole = {step: path / "actor" / "lora_adapter" for step, path in steps.items() if step <= latest}
    # verl logs a failed LoRA save and goes on: such a step has no lora_adapter/ and is left out.
    adapters = {step: path for step, path in whole.items() if has_adapter(path)}
    if whole and not adapters:
        raise BundleError(f"{folder}: a verl output folder, but no checkpoint up to step {latest} "
                          "(latest_checkpointed_iteration.txt) has a LoRA adapter (global_step_<N>/actor/"
                          "lora_adapter/): verl saves one only when actor_rollout_ref.model.lora_rank > 0; "
                          "its FSDP shards need verl's model_merger")
    records = [record for path in sorted(folder.glob("*.jsonl")) for record in verl_jsonl_records(path)]
    records = [renamed(record, VERL_METRICS) for record in records + tensorboard_records(folder)]
    return EngineOutput("verl", adapters, records, method="ppo")


READERS = (read_trl, read_verl, read_openrlhf)
LOOKED_FOR = ("a run bundle (manifest.json)", "a TRL output folder (trainer_state.json)",
              "a verl output folder (global_step_<N>/, latest_checkpointed_iteration.txt)",
              "an OpenRLHF output folder (adapter_config.json, or global_step<N>_hf/ in it or its checkpoints/)")


def read_output(folder: Path) -> EngineOutput:
    for reader in READERS:
        output = reader(folder)
        if output is not None:
            return output
    raise BundleError(f"{folder} is none of the folders import-run reads; looked for " + "; ".join(LOOKED_FOR))


# --- checks before anything is written ------------------------------------------------------------

def check_adapter(adapter: Path, shapes: dict[str, tuple[int, int]], base: str) -> None:
    """Refuse an adapter that is damaged, not LoRA, or that does not fit the project's base model
    (`shapes`: its linear layers, from models.linear_shapes)."""
    weights, config_file = adapter / ADAPTER_FILES[0], adapter / ADAPTER_FILES[1]
    if not weights.exists() and (adapter / "adapter_model.bin").exists():
        raise BundleError(f"{adapter / 'adapter_model.bin'}: a pickle adapter (OpenRLHF writes one under "
                          "ZeRO-3 or tensor parallelism), which can run code when loaded; the studio loads "
                          "safetensors only. Save it with safetensors (PEFT's save_pretrained) or train with "
                          "--ds.zero_stage 2")
    problem = runs.safetensors_problem(weights)
    if problem:
        raise BundleError(problem)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{config_file} is missing (a save cut short?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{config_file} is not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise BundleError(f"{config_file}: peft_type {config.get('peft_type')!r}; the studio imports LoRA adapters only")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise BundleError(f"{config_file}: LoRA rank r = {rank!r}; it must be a whole number above 0")
    targets = config.get("target_modules")
    for target in targets if isinstance(targets, list) else []:
        if not any(name == target or name.endswith("." + target) for name in shapes):
            raise BundleError(f"{config_file}: target module {target!r} is no linear layer of the project's "
                              f"base model ({base}): the adapter was trained on another model")
    check_lora_shapes(weights, shapes, base, None if config.get("rank_pattern") else rank)


def check_lora_shapes(weights: Path, shapes: dict[str, tuple[int, int]], base: str, rank: int | None) -> None:
    """Every lora_A (r x in) and lora_B (out x r) weight must fit its linear layer of the base model."""
    from safetensors import safe_open

    found = 0
    try:
        tensors = safe_open(weights, "pt")
    except Exception as exc:  # safetensors' own error type: a header it cannot read
        raise BundleError(f"{weights} is damaged ({exc})") from None
    with tensors:
        for key in tensors.keys():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if not match:
                continue
            module, side = match[1], match[2]
            if module not in shapes:
                raise BundleError(f"{weights}: LoRA weights for {module}, which the project's base model ({base}) "
                                  "does not have: the adapter was trained on another model")
            out_features, in_features = shapes[module]
            shape = tuple(tensors.get_slice(key).get_shape())
            r = rank if rank is not None else shape[0 if side == "A" else 1]
            expected = (r, in_features) if side == "A" else (out_features, r)
            if shape != expected:
                raise BundleError(f"{weights}: {key} has shape {list(shape)}, but a rank-{r} adapter of that layer "
                                  f"of the project's base model ({base}) has {list(expected)}: the adapter was "
                                  "trained on another base model or with another rank than adapter_config.json's r")
            found += 1
    if not found:
        raise BundleError(f"{weights} holds no LoRA weights (no base_model.model.<layer>.lora_A/B.weight)")


def load_job(folder: Path) -> tuple[dict | None, Path | None]:
    """studio_job.json (written by export-job) beside or above the output folder, if any."""
    for path in (folder / "studio_job.json", folder.parent / "studio_job.json"):
        if path.exists():
            try:
                job = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BundleError(f"{path} is not valid JSON ({exc})") from None
            if not isinstance(job, dict) or not isinstance(job.get("config"), dict):
                raise BundleError(f"{path}: no run settings (\"config\"); export-job writes them")
            return job, path
    return None, None


def job_parent(job: dict, job_file: Path, project_path: Path, identity: dict) -> int | None:
    """The checkpoint the job's model/ started from (its adapters apply on top of it), after refusing
    a job exported from another base model, or from a checkpoint of another project."""
    recorded = job.get("base_identity")
    if recorded and recorded["hash"] != identity["hash"]:
        raise runs.BaseModelChangedError(
            f"{job_file}: the job was exported from a project whose base is {recorded['model']} (content "
            f"{recorded['hash']}), but this project's base is {identity['model']} (content {identity['hash']}). "
            "Its adapters only fit the base they were trained on: import it into a project with that base.")
    parent = job.get("parent_checkpoint_id")
    if parent is not None and Path(job.get("project", "")) != project_path.resolve():
        raise BundleError(f"{job_file}: the job's model is checkpoint {parent} of project {job.get('project')} "
                          "merged into the base, so its adapters only fit on top of that checkpoint: import it "
                          "into that project")
    return parent


# --- the import -------------------------------------------------------------------------------------

def import_engine_output(db, project_path: Path, folder: Path) -> int:
    """Bring an engine's output folder into the project as a run; returns its id (the same run on a
    second import). The run's settings are the studio job's when export-job wrote the job
    (studio_job.json beside or above the folder), else the method's defaults."""
    output = read_output(folder)
    if not output.checkpoints and not output.records:
        raise BundleError(f"{folder}: {output.engine} output with no whole checkpoint and no log yet: "
                          "nothing to import")
    source = ModelSource.from_json(store.get_setting(db, "base_model"))
    identity = base_identity(source)
    job, job_file = load_job(folder)
    parent = job_parent(job, job_file, project_path, identity) if job else None
    shapes = linear_shapes(source)
    for adapter in output.checkpoints.values():  # all of them before anything is written
        check_adapter(adapter, shapes, source.describe())

    config = {**(job["config"] if job else runs.make_config(output.method).to_json()), "parent_checkpoint_id": parent}
    name = f"{job['run_name'] if job else folder.name} ({output.engine})"
    run_id = bundles.imported_run(db, f"{output.engine.lower()}:{folder.resolve()}", config["method"], config,
                                   name, parent)
    bundles.replace_metrics(db, run_id, output.records)
    known = {c["step"] for c in store.checkpoints(db, run_id)}
    for step, adapter in output.checkpoints.items():
        if step in known:
            continue

        def copy_adapter(partial: Path, adapter=adapter) -> None:
            (partial / "adapter").mkdir(parents=True)
            for file_name in ADAPTER_FILES:
                shutil.copy2(adapter / file_name, partial / "adapter" / file_name)

        checkpoint = bundles.add_checkpoint_folder(project_path, run_id, f"checkpoint-{step}", copy_adapter)
        runs.SQLiteSink(db, run_id, identity).checkpoint_saved(step, checkpoint, [])
    finished = verl_finished(folder, job) if output.engine == "verl" else output.finished
    store.set_run_status(db, run_id, {True: "completed", False: "running", None: "stopped"}[finished])
    return run_id


def verl_finished(folder: Path, job: dict | None) -> bool | None:
    """verl saves at its last step: the run ended once that step's checkpoint is whole. Without the
    job's trainer.total_training_steps the folder does not say."""
    total = (job or {}).get("flags", {}).get("trainer.total_training_steps")
    if total is None:
        return None
    return (verl_latest_step(folder) or 0) >= int(total)


def verl_latest_step(folder: Path) -> int | None:
    """The step in latest_checkpointed_iteration.txt (verl writes it once that checkpoint is whole)."""
    path = folder / "latest_checkpointed_iteration.txt"
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise BundleError(f"{path}: expected a step number, found {text[:40]!r}")
    return int(text)
