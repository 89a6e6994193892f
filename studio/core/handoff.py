"""Hand-off: a run exported as a job for the engines people use at scale (TRL, OpenRLHF, verl).

`export_job` writes a folder with the run's data in the engine's format, a launch script whose
flags are the run's settings mapped to the engine's own, and studio_job.json (the run's settings,
read back by `studio import-run`). Every setting of the run is either mapped (the script header
lists setting -> flag = value) or listed as having no equivalent there; none is dropped silently.
The flags were checked against each engine's parser / Hydra config at the pinned version (the
lists are in tests/data/handoff/, with the version and commit they came from).

Rule rewards become a Python file the engine loads (verl's `compute_score`, OpenRLHF's
`reward_func`), scoring with the studio's own reward code, so the workers need the studio package.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import runs, store
from .bundles import copy_reward_models, new_folder
from .errors import StudioError
from .models import base_identity, resolve_folder

PINNED = {"trl": "trl==1.16.0", "openrlhf": "openrlhf==0.11.0", "verl": "verl==0.7.0"}
ENGINES = tuple(PINNED)
SCHEDULERS = runs.SCHEDULERS  # studio name -> transformers name, which all three engines take


class HandoffError(StudioError):
    """A run that cannot be exported to the chosen engine, with the reason."""


@dataclass
class Job:
    """What an export writes: a command with its mapped flags, files, and what has no equivalent."""

    engine: str
    command: list[str]  # the launch command before the mapped flags
    flags: dict[str, object] = field(default_factory=dict)  # engine flag / override -> value
    mapping: list[tuple[str, str]] = field(default_factory=list)  # (studio setting, engine flag)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (studio setting, why)
    preamble: list[str] = field(default_factory=list)  # shell lines before the command
    extra_args: list[str] = field(default_factory=list)  # "flag value" after the mapped flags (computed at launch)

    def map(self, setting: str, flag: str, value) -> None:
        self.flags[flag] = value
        self.mapping.append((setting, flag))

    def skip(self, setting: str, why: str) -> None:
        self.unmapped.append((setting, why))


# --- the data -------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def preference_rows(data: runs.TrainingData) -> list[dict]:
    """TRL's preference rows; a pair's tools as JSON text, which TRL's DPOTrainer parses (a column of
    schemas that differ from row to row would not load as one Arrow type)."""
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
             **({"tools": json.dumps(p["tools"], ensure_ascii=False)} if p.get("tools") else {})} for p in data.pairs]


def as_messages(prompt) -> list[dict]:
    """verl and OpenRLHF's chat path take message lists: plain text becomes one user message."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def write_reward_function(out: Path, config, data: runs.TrainingData) -> Path:
    """reward_fn.py: the run's reward sources, scored by the studio's RewardFunction."""
    sources = copy_reward_models(config.reward_sources, data.reward_root, out)
    (out / "reward_sources.json").write_text(json.dumps(sources, indent=2))
    path = out / "reward_fn.py"
    path.write_text(REWARD_FILE)
    return path


REWARD_FILE = '''"""The studio run's reward sources (reward_sources.json), scored by the studio's own code.

verl calls compute_score once per response; OpenRLHF calls reward_func once per batch.
Needs the studio package on the workers: pip install alignment-studio.
"""
import json
import os
from pathlib import Path

from studio.core.models import load_tokenizer
from studio.core.rewards import RewardFunction

HERE = Path(__file__).resolve().parent
_function = None


def _reward_function() -> RewardFunction:
    global _function
    if _function is None:
        sources = json.loads((HERE / "reward_sources.json").read_text())
        tokenizer = load_tokenizer(Path(os.environ.get("STUDIO_TOKENIZER", HERE / "model")))
        _function = RewardFunction(sources, tokenizer, HERE)
    return _function


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    prompt = json.loads(extra_info["prompt"]) if extra_info and "prompt" in extra_info else ""
    total, _ = _reward_function()([prompt], [solution_str])
    return float(total[0])


def reward_func(queries, prompts, labels, **kwargs):
    responses = [query[len(prompt):] for query, prompt in zip(queries, prompts)]
    total, breakdown = _reward_function()(list(prompts), responses)
    return {"rewards": total, "scores": total,
            "extra_logs": {f"reward/{name}": values for name, values in breakdown.items()}}
'''


# --- the mappings ---------------------------------------------------------------------------------

def map_common_studio_only(job: Job) -> None:
    job.skip("eval_max_new_tokens", "the studio's greedy eval samples at checkpoints; the engine has its own eval")
    job.skip("device", "the launcher places the processes on GPUs")
    job.skip("report_to", "the engine logs to its own trackers (TRL: report_to; OpenRLHF: --use_wandb, "
                          "--use_tensorboard; verl: trainer.logger); `studio import-run` brings the log back")


def trl_dpo(config, data: runs.TrainingData, model: str) -> Job:
    job = Job("trl", ["trl", "dpo", "--config", "dpo.yaml"])
    job.flags.update({"model_name_or_path": model, "output_dir": "output", "use_peft": True, "logging_steps": 1,
                      "report_to": "none", "save_strategy": "steps", "precompute_ref_log_probs": True,
                      "datasets": [{"path": "json", "data_files": ["data/train.jsonl"], "split": "train"}]})
    job.mapping.append(("dataset_ids, include_labels", "datasets (data/train.jsonl: the pairs the run trains on)"))
    for setting, flag in (("seed", "seed"), ("max_steps", "max_steps"), ("learning_rate", "learning_rate"),
                          ("warmup_steps", "warmup_steps"), ("weight_decay", "weight_decay"),
                          ("max_grad_norm", "max_grad_norm"), ("lora_r", "lora_r"), ("lora_alpha", "lora_alpha"),
                          ("lora_dropout", "lora_dropout"), ("beta", "beta"), ("loss_type", "loss_type"),
                          ("label_smoothing", "label_smoothing"), ("max_length", "max_length"),
                          ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                          ("ref_batch_size", "precompute_ref_batch_size"), ("checkpoint_every", "save_steps")):
        job.map(setting, flag, getattr(config, setting))
    job.map("lr_scheduler", "lr_scheduler_type", SCHEDULERS[config.lr_scheduler])
    job.map("lora_target_modules", "lora_target_modules", config.lora_target_modules)
    job.mapping.append(("batch_size", "per_device_train_batch_size = batch_size / NUM_PROCESSES (set at launch)"))
    job.preamble += [f"BATCH_SIZE={config.batch_size}  # pairs per forward pass over all processes",
                     'if (( BATCH_SIZE % NUM_PROCESSES )); then',
                     '  echo "batch_size $BATCH_SIZE does not split over $NUM_PROCESSES processes" >&2; exit 2',
                     'fi']
    job.extra_args += ['--accelerate_config "$ACCELERATE_CONFIG"', '--num_processes "$NUM_PROCESSES"',
                       '--per_device_train_batch_size "$((BATCH_SIZE / NUM_PROCESSES))"']
    if config.max_prompt_length is not None:
        job.skip("max_prompt_length", "TRL 1.16 has no prompt-length limit; only max_length, which cuts from the end")
    job.skip("max_length (skip rule)", "the studio skips pairs longer than max_length; TRL truncates them")
    map_common_studio_only(job)
    return job


def openrlhf_common(job: Job, config, prefix: str, model_flag: str, model: str) -> None:
    """Settings OpenRLHF's DPO and PPO scripts share (PPO puts the optimizer under --actor.)."""
    job.flags[model_flag] = model
    # Everything `studio import-run JOB/output/` reads goes under output/: the final adapter, the
    # adapters of the checkpoints (global_step<N>_hf/), the TensorBoard scalars.
    job.flags.update({"--ckpt.output_dir": "output", "--ckpt.path": "output/checkpoints", "--ckpt.save_hf": True,
                      "--logger.logging_steps": 1, "--logger.tensorboard_dir": "output/tensorboard",
                      "--ds.zero_stage": 2, "--ds.param_dtype": "bf16"})
    job.map("seed", "--train.seed", config.seed)
    job.map("learning_rate", f"--{prefix}adam.lr", config.learning_rate)
    job.map("weight_decay", f"--{prefix}adam.weight_decay", config.weight_decay)
    job.map("lr_scheduler", f"--{prefix}lr_scheduler", SCHEDULERS[config.lr_scheduler])
    job.map("warmup_steps", f"--{prefix}lr_warmup_ratio", config.warmup_steps / config.max_steps)
    job.map("max_grad_norm", f"--{prefix}max_norm", config.max_grad_norm)
    job.map("lora_r", "--ds.lora.rank", config.lora_r)
    job.map("lora_alpha", "--ds.lora.alpha", config.lora_alpha)
    job.map("lora_dropout", "--ds.lora.dropout", config.lora_dropout)
    targets = config.lora_target_modules
    job.map("lora_target_modules", "--ds.lora.target_modules", targets if isinstance(targets, str) else " ".join(targets))
    job.map("checkpoint_every", "--ckpt.save_steps", config.checkpoint_every)
    map_common_studio_only(job)


def openrlhf_dpo(config, data: runs.TrainingData, model: str) -> Job:
    if config.loss_type not in ("sigmoid", "ipo"):
        raise HandoffError(f"OpenRLHF 0.11 has no {config.loss_type!r} DPO loss (it has sigmoid and IPO); "
                           "export this run with --engine trl")
    if any(pair.get("tools") for pair in data.pairs):
        raise HandoffError("OpenRLHF 0.11's preference data has no tools: its chat template call leaves out the "
                           "pairs' function schemas. Export this run with --engine trl, whose DPOTrainer renders "
                           "each pair with its tools")
    job = Job("openrlhf", ["deepspeed", "--num_gpus", '"$NUM_GPUS"', "--module", "openrlhf.cli.train_dpo"])
    openrlhf_common(job, config, "", "--model.model_name_or_path", model)
    job.flags.update({"--data.dataset": "data/train.jsonl", "--data.prompt_key": "prompt",
                      "--data.chosen_key": "chosen", "--data.rejected_key": "rejected"})
    job.mapping.append(("dataset_ids, include_labels", "--data.dataset (data/train.jsonl)"))
    if data.pairs and isinstance(data.pairs[0]["prompt"], list):
        job.flags["--data.apply_chat_template"] = True
    global_batch = config.batch_size * config.gradient_accumulation_steps
    job.map("batch_size x gradient_accumulation_steps", "--train.batch_size", global_batch)
    job.map("batch_size (memory only)", "--train.micro_batch_size", 1)  # per GPU; OpenRLHF derives accumulation
    epochs = math.ceil(config.max_steps * global_batch / max(len(data.pairs), 1))
    job.map("max_steps", "--train.max_epochs", epochs)
    job.skip("max_steps (exact)", f"OpenRLHF counts epochs: {epochs} epoch(s) of {len(data.pairs)} pairs "
                                  f"is at least {config.max_steps} steps")
    job.map("beta", "--model.beta", config.beta)
    if config.loss_type == "ipo":
        job.map("loss_type", "--model.ipo_enable", True)
    else:
        job.mapping.append(("loss_type", "sigmoid: OpenRLHF's default"))
    job.skip("label_smoothing", "only the robust loss uses it, and OpenRLHF has no robust DPO")
    job.map("max_length", "--data.max_len", config.max_length)
    if config.max_prompt_length is not None:
        job.skip("max_prompt_length", "OpenRLHF has only --data.max_len (prompt + response)")
    job.skip("ref_batch_size", "OpenRLHF computes reference log-probs with each batch")
    return job


def openrlhf_ppo(config, data: runs.TrainingData, model: str) -> Job:
    job = Job("openrlhf", ["ray", "job", "submit", "--address", '"$RAY_ADDRESS"',
                           "--runtime-env-json", "'{\"working_dir\": \".\"}'", "--",
                           "python3", "-m", "openrlhf.cli.train_ppo_ray"])
    openrlhf_common(job, config, "actor.", "--actor.model_name_or_path", model)
    job.flags.update({"--data.prompt_dataset": "data/prompts.jsonl", "--data.input_key": "prompt",
                      "--data.apply_chat_template": True, "--reward.remote_url": "reward_fn.py",
                      "--actor.num_gpus_per_node": '"$NUM_GPUS"', "--ref.num_gpus_per_node": '"$NUM_GPUS"',
                      "--critic.num_gpus_per_node": '"$NUM_GPUS"', "--train.colocate_all": True,
                      "--algo.advantage.estimator": "gae"})
    job.mapping.append(("reward_sources", "--reward.remote_url reward_fn.py (reward_func)"))
    job.mapping.append(("prompt_dataset_ids", "--data.prompt_dataset (data/prompts.jsonl)"))
    job.map("prompts_per_step", "--rollout.batch_size", config.prompts_per_step)
    job.map("prompts_per_step / num_minibatches", "--train.batch_size", config.prompts_per_step // config.num_minibatches)
    episodes = math.ceil(config.max_steps * config.prompts_per_step / max(len(data.prompts), 1))
    job.map("max_steps", "--train.num_episodes", episodes)
    job.skip("max_steps (exact)", f"OpenRLHF counts episodes (passes over the {len(data.prompts)} prompts)")
    for setting, flag in (("max_new_tokens", "--rollout.max_new_tokens"), ("temperature", "--rollout.temperature"),
                          ("top_p", "--rollout.top_p"), ("ppo_epochs", "--train.max_epochs"),
                          ("cliprange", "--actor.eps_clip"), ("cliprange_value", "--critic.value_clip"),
                          ("gamma", "--algo.advantage.gamma"), ("lam", "--algo.advantage.lambd"),
                          ("kl_coef", "--algo.kl.init_coef"), ("kl_estimator", "--algo.kl.estimator"),
                          ("kl_horizon", "--algo.kl.horizon"), ("entropy_coef", "--actor.entropy_coef")):
        job.map(setting, flag, getattr(config, setting))
    if config.adaptive_kl:
        job.map("adaptive_kl, target_kl", "--algo.kl.target", config.target_kl)
    else:
        job.mapping.append(("adaptive_kl, target_kl", "fixed KL: --algo.kl.target left unset"))
    if config.reward_normalization:
        job.map("reward_normalization", "--reward.normalize_enable", True)
    else:
        job.mapping.append(("reward_normalization", "off: --reward.normalize_enable left unset"))
    if config.reward_clip is not None:
        job.map("reward_clip", "--reward.clip_range", f"{-config.reward_clip} {config.reward_clip}")
    else:
        job.skip("reward_clip", "OpenRLHF always clips rewards (to its default -10..10)")
    if config.missing_eos_penalty is not None:
        job.skip("missing_eos_penalty", "OpenRLHF's --reward.stop_properly_penalty_coef scales, it does not subtract")
    else:
        job.mapping.append(("missing_eos_penalty", "none: --reward.stop_properly_penalty_coef left unset"))
    job.skip("vf_coef", "OpenRLHF trains a separate critic model with its own optimizer (--critic.adam.lr)")
    job.skip("whiten_advantages", "OpenRLHF whitens GAE advantages always")
    if config.missing_eos_penalty is not None:
        job.skip("missing_eos_penalty", "OpenRLHF's --reward.stop_properly_penalty_coef scales, it does not subtract")
    return job


def verl_ppo(config, data: runs.TrainingData, model: str) -> Job:
    job = Job("verl", ["python3", "-m", "verl.trainer.main_ppo"])
    job.flags.update({"data.train_files": "data/train.parquet", "data.val_files": "data/eval.parquet",
                      "data.prompt_key": "prompt", "actor_rollout_ref.model.path": model,
                      "critic.model.path": model, "custom_reward_function.path": "reward_fn.py",
                      "custom_reward_function.name": "compute_score", "algorithm.adv_estimator": "gae",
                      "algorithm.use_kl_in_reward": True, "actor_rollout_ref.rollout.n": 1,
                      "trainer.n_gpus_per_node": '"$NUM_GPUS"', "trainer.nnodes": '"$NUM_NODES"',
                      "trainer.logger": "[console,file]", "trainer.default_local_dir": '"$PWD/output"'})
    # verl's file logger writes the metrics where `studio import-run JOB/output/` reads them (the Ray
    # workers of a local cluster inherit this environment; on another cluster, set it there).
    job.preamble += ["mkdir -p output", 'export VERL_FILE_LOGGER_PATH="$PWD/output/metrics.jsonl"']
    job.mapping.append(("reward_sources", "custom_reward_function.path=reward_fn.py (compute_score)"))
    job.mapping.append(("prompt_dataset_ids", "data.train_files (data/train.parquet)"))
    actor = "actor_rollout_ref.actor."
    for setting, flag in (("seed", "data.seed"), ("max_steps", "trainer.total_training_steps"),
                          ("checkpoint_every", "trainer.save_freq"), ("prompts_per_step", "data.train_batch_size"),
                          ("max_new_tokens", "data.max_response_length"), ("learning_rate", actor + "optim.lr"),
                          ("weight_decay", actor + "optim.weight_decay"), ("warmup_steps", actor + "optim.lr_warmup_steps"),
                          ("max_grad_norm", actor + "grad_clip"), ("ppo_epochs", actor + "ppo_epochs"),
                          ("cliprange", actor + "clip_ratio"), ("entropy_coef", actor + "entropy_coeff"),
                          ("temperature", "actor_rollout_ref.rollout.temperature"),
                          ("top_p", "actor_rollout_ref.rollout.top_p"), ("lora_r", "actor_rollout_ref.model.lora_rank"),
                          ("lora_alpha", "actor_rollout_ref.model.lora_alpha"), ("cliprange_value", "critic.cliprange_value"),
                          ("gamma", "algorithm.gamma"), ("lam", "algorithm.lam"), ("kl_coef", "algorithm.kl_ctrl.kl_coef"),
                          ("kl_horizon", "algorithm.kl_ctrl.horizon")):
        job.map(setting, flag, getattr(config, setting))
    job.map("prompts_per_step / num_minibatches", actor + "ppo_mini_batch_size",
            config.prompts_per_step // config.num_minibatches)
    targets = config.lora_target_modules
    job.map("lora_target_modules", "actor_rollout_ref.model.target_modules",
            targets if isinstance(targets, str) else "[" + ",".join(targets) + "]")
    job.map("kl_estimator", "algorithm.kl_penalty", {"k1": "kl", "k3": "low_var_kl"}[config.kl_estimator])
    job.map("adaptive_kl", "algorithm.kl_ctrl.type", "adaptive" if config.adaptive_kl else "fixed")
    job.map("target_kl", "algorithm.kl_ctrl.target_kl", config.target_kl)
    job.skip("lr_scheduler", "verl's actor optimizer warms up then holds the rate (optim.warmup_style)")
    job.skip("lora_dropout", "verl 0.7 has no LoRA dropout setting")
    job.skip("vf_coef", "verl trains a separate critic (critic.optim.lr)")
    job.skip("whiten_advantages", "verl whitens GAE advantages always")
    for setting in ("missing_eos_penalty", "reward_normalization", "reward_clip"):
        job.skip(setting, "no verl equivalent for GAE runs; put it in reward_fn.py if needed")
    map_common_studio_only(job)
    return job


MAPPERS = {("trl", "dpo"): trl_dpo, ("openrlhf", "dpo"): openrlhf_dpo, ("openrlhf", "ppo"): openrlhf_ppo,
           ("verl", "ppo"): verl_ppo}
REFUSALS = {("verl", "dpo"): "verl has no offline DPO trainer (it trains from its own rollouts); "
                             "export DPO runs with --engine trl or --engine openrlhf",
            ("trl", "ppo"): "TRL 1.16's `trl` command has no PPO script; export PPO runs with "
                            "--engine openrlhf or --engine verl"}


# --- the script -----------------------------------------------------------------------------------

def shell_value(value) -> str:
    if isinstance(value, str) and value.startswith('"$'):
        return value  # computed at launch
    if isinstance(value, str) and " " in value and not value.startswith("["):
        return " ".join(shlex.quote(v) for v in value.split(" "))  # nargs values
    return shlex.quote(str(value))


def command_lines(job: Job) -> list[str]:
    """The launch command, then one line per mapped flag as the engine spells it."""
    lines = [" ".join(job.command)]
    if job.engine != "trl":  # TRL's settings live in dpo.yaml
        for flag, value in job.flags.items():
            if job.engine == "verl":
                lines.append(f"{flag}={shell_value(value)}")
            else:
                lines.append(flag if value is True else f"{flag} {shell_value(value)}")
    return lines + job.extra_args + ['"$@"']  # flags given to launch.sh are passed on


LAUNCH_DEFAULTS = {
    "trl": ['NUM_PROCESSES=${NUM_PROCESSES:-1}  # processes (GPUs); the global batch stays the run\'s',
            'ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-multi_gpu}  # multi_gpu | zero2 | zero3 | fsdp2 | a YAML file'],
    "openrlhf": ['NUM_GPUS=${NUM_GPUS:-8}', 'RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}'],
    "verl": ['NUM_GPUS=${NUM_GPUS:-8}', 'NUM_NODES=${NUM_NODES:-1}'],
}


def launch_script(job: Job, run_name: str, method: str) -> str:
    lines = ["#!/usr/bin/env bash",
             f"# Studio run {run_name!r} ({method.upper()}) exported for {PINNED[job.engine]}.",
             f"# Install on the workers: pip install '{PINNED[job.engine]}'" +
             (" alignment-studio  # reward_fn.py uses the studio's reward code" if job.engine != "trl" else ""),
             "#", "# Mapped settings (studio -> engine):"]
    lines += [f"#   {setting} -> {flag}" + (f" = {job.flags[flag]}" if flag in job.flags else "")
              for setting, flag in job.mapping]
    lines += ["#", "# No equivalent in this engine (not exported):"]
    lines += [f"#   {setting}: {why}" for setting, why in job.unmapped] or ["#   (none)"]
    lines += ["#", "# Flags given to this script are passed on to the engine (they override the above).",
              "# Bring the results back: studio import-run PROJECT_DIR output/", "",
              "set -euo pipefail", 'cd "$(dirname "$0")"', *LAUNCH_DEFAULTS[job.engine], *job.preamble, ""]
    lines.append(" \\\n    ".join(command_lines(job)))
    return "\n".join(lines) + "\n"


def export_job(project_path: Path | str, run_id: int, engine: str, out: Path | str) -> Path:
    """Write run `run_id` as a job for `engine` into folder `out`; returns the launch script's path."""
    if engine not in ENGINES:
        raise HandoffError(f"Unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    out = Path(out)
    with store.Project.open(project_path, read_only=True) as project:
        run = store.get_run(project.db, run_id)
        config = runs.engine_module(run["method"]).Config.from_json(run["config"])
        key = (engine, config.method)
        if key in REFUSALS:
            raise HandoffError(REFUSALS[key])
        if key not in MAPPERS:
            raise HandoffError(f"{config.method.upper()} runs cannot be exported to {engine} yet")
        data = runs.gather_training_data(project.db, config)
        job = MAPPERS[key](config, data, "model")  # refuses what the engine cannot do, before any copy
        job.mapping.append(("method", " ".join(job.command)))
        job.mapping.append(("parent_checkpoint_id", "model/ (the base model, with the parent's adapters merged if any)"))
        base = runs.model_start(project.db, None).base
        with new_folder(out, "job") as partial:
            if config.parent_checkpoint_id is not None:  # the engines start from a plain model folder
                runs.export_merged(project.db, config.parent_checkpoint_id, partial / "model")
            else:
                shutil.copytree(resolve_folder(base), partial / "model")
            write_job_files(partial, job, config, data)
            # What import-run checks the engine's adapters against: the base model (its identity) and
            # the checkpoint merged into model/ (they apply on top of it, in this project only).
            (partial / "studio_job.json").write_text(json.dumps(
                {"engine": engine, "pinned": PINNED[engine], "run_name": run["name"], "source_run_id": run_id,
                 "project": str(Path(project_path).resolve()), "parent_checkpoint_id": config.parent_checkpoint_id,
                 "base_identity": base_identity(base),
                 "config": config.to_json(), "flags": job.flags, "unmapped": dict(job.unmapped)}, indent=2))
            (partial / "launch.sh").write_text(launch_script(job, run["name"], config.method))
            (partial / "launch.sh").chmod(0o755)
    return out / "launch.sh"


def write_job_files(out: Path, job: Job, config, data: runs.TrainingData) -> None:
    if job.engine == "trl":
        write_jsonl(out / "data" / "train.jsonl", preference_rows(data))
        (out / "dpo.yaml").write_text(json.dumps(job.flags, indent=2) + "\n")  # JSON is YAML: no PyYAML needed
    elif config.method == "dpo":  # OpenRLHF DPO
        write_jsonl(out / "data" / "train.jsonl", preference_rows(data))
    elif job.engine == "openrlhf":
        write_jsonl(out / "data" / "prompts.jsonl", [{"prompt": as_messages(p["prompt"])} for p in data.prompts])
        write_reward_function(out, config, data)
    else:
        write_verl_parquet(out / "data" / "train.parquet", data.prompts)
        write_verl_parquet(out / "data" / "eval.parquet", data.eval_prompts or data.prompts[:1])
        write_reward_function(out, config, data)


def write_verl_parquet(path: Path, prompts: list[dict]) -> None:
    """verl's RL dataset schema: data_source, prompt (messages), ability, reward_model, extra_info."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"data_source": "studio", "prompt": as_messages(p["prompt"]), "ability": "alignment",
             "reward_model": {"style": "rule", "ground_truth": ""},
             "extra_info": {"index": i, "prompt_id": p["id"], "prompt": json.dumps(p["prompt"])}}
            for i, p in enumerate(prompts)]
    pq.write_table(pa.Table.from_pylist(rows), path)
