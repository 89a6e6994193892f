"""Run lifecycle shared by every engine: config, start, pause, stop, checkpoint, resume; metrics sink.

An engine module (``studio.core.dpo``, ``studio.core.ppo``) provides:

* ``Config``: a dataclass extending :class:`TrainConfig` with the method's hyper-parameters;
* ``validate(config, db) -> list[str]``: problems that must stop a launch (e.g. no pairs);
* ``select_data(config, db) -> dict``: the :class:`TrainingData` fields it trains on (``pairs`` or
  ``prompts``), read from the project when a run starts; nothing else of the engine sees the database;
* ``Engine(config, policy, tokenizer, data, device, run_dir, on_progress)``, `data` a :class:`TrainingData`
  (``on_progress`` reports the long work done before the first step, see ``studio.core.progress``), with
  attributes ``model`` (the PeftModel policy), ``optimizer``, ``scheduler``, and methods
  ``train_step(step) -> dict`` (one optimizer step, returning metrics named as TRL names them),
  ``extra_state() -> dict`` and ``load_extra_state(state)`` (what a checkpoint needs beyond adapter,
  optimizer, scheduler, RNG: tensors, numbers and strings only, so it loads with ``weights_only=True``).
  Under ``torchrun`` / ``accelerate launch`` an engine takes its rank's share of each step through
  ``studio.core.distributed`` (a no-op in one process).

:func:`train` drives one: it loads the model state the run starts from, wraps it with a fresh LoRA
adapter, resumes from the last checkpoint its sink knows, and calls ``train_step`` until
``max_steps`` or a stop request, checking pause/stop between steps. Everything it records goes to a
:class:`RunSink`: :class:`SQLiteSink` for a run of a project (:func:`execute`, the path every local
run takes: CLI, window, child process) or ``bundles.BundleSink`` (JSONL and a status file) for a run
bundle on another machine. Data order and every random draw come from seeded generators whose state
is in the checkpoint, so a resumed run (even after a kill -9) repeats exactly what an uninterrupted
run does on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import defaults, distributed, store, trackers
from .cpu_linears import route_frozen_linears
from .errors import StudioError
from .generation import Decoding, generate
from .models import ModelSource, add_lora, base_identity, folder_fingerprint, load_model, module_names, pick_device
from .progress import Progress, ignore
from .run_log import append_run_log

ENGINE_MODULES = {"dpo": "studio.core.dpo", "ppo": "studio.core.ppo", "grpo": "studio.core.grpo",
                  "rloo": "studio.core.rloo"}
# A step's raw reward, for the run's no-progress check: PPO's before normalisation, else its scores,
# else GRPO/RLOO's `reward`.
REWARD_METRICS = ("objective/raw_reward", "objective/scores", "reward")


class ConfigError(StudioError):
    """A run configuration that cannot be launched, with a message meant for the user."""


class SettingsError(ConfigError):
    """Settings refused by settings.validate_settings; .fields maps each bad field to its message."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__("Cannot use these settings:\n" + "\n".join(f"- {k}: {v}" for k, v in fields.items()))


@dataclass
class TrainConfig:
    """Settings every engine shares. Engines extend it; all of it is saved as the run's JSON."""

    method: str = ""
    seed: int = 0
    max_steps: int = 100
    learning_rate: float = 5e-5
    lr_scheduler: str = "linear"  # "linear" | "constant" | "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    checkpoint_every: int = 25  # steps; a checkpoint is also written at the end and at a stop
    eval_max_new_tokens: int = 64  # greedy samples of the eval prompts at every checkpoint
    device: str = "auto"  # "auto" picks CUDA (bf16 autocast), then MPS, then CPU
    parent_checkpoint_id: int | None = None  # start (and reference) = this checkpoint
    report_to: str | list[str] | None = None  # trackers, e.g. "tensorboard,trackio,wandb"; none: the project's

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown {cls.__module__.rsplit('.', 1)[-1]} setting(s): {', '.join(unknown)}")
        return cls(**data)


SCHEDULERS = {"linear": "linear", "constant": "constant_with_warmup", "cosine": "cosine"}  # transformers names


def make_optimizer(config: TrainConfig, parameters):
    """(AdamW, learning-rate scheduler) over the trainable `parameters`, as the config asks."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler], optimizer,
                              num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps)
    return optimizer, scheduler


def autocast(device: str):
    """bf16 autocast on CUDA (weights stay fp32); plain fp32 elsewhere."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def engine_module(method: str):
    if method not in ENGINE_MODULES:
        raise ConfigError(f"Unknown training method {method!r}; expected one of {sorted(ENGINE_MODULES)}")
    return importlib.import_module(ENGINE_MODULES[method])


def make_config(method: str, overrides: dict | None = None, parameters: int | None = None) -> TrainConfig:
    """The engine's default config, with the defaults for a model of `parameters` parameters
    (defaults.py; None: the Config's own, measured on the small demo model), then `overrides`
    applied (unknown keys are an error; every value is checked by settings.check_settings)."""
    from .settings import check_settings

    module = engine_module(method)
    values = {**module.Config().to_json(), **defaults.defaults_for(method, parameters), **(overrides or {}),
              "method": method}
    check_settings(method, values)
    return module.Config.from_json(values)


def create_run(db, config: TrainConfig, name: str | None = None) -> int:
    """Validate `config` against the project and record a queued run; returns its id."""
    if name is not None and not name.isprintable():
        raise ConfigError(f"A run name must be one line of printable text, not {name!r}")
    from .settings import check_settings

    source = ModelSource.from_json(store.get_setting(db, "base_model"))
    check_settings(config.method, config.to_json(), module_names(source))
    problems = engine_module(config.method).validate(config, db)
    try:
        trackers.parse_report_to(config.report_to)
    except trackers.TrackerError as exc:
        problems.append(str(exc))
    if config.parent_checkpoint_id is not None:
        store.get_checkpoint(db, config.parent_checkpoint_id)  # raises if missing
    if problems:
        raise ConfigError("Cannot start this run:\n- " + "\n- ".join(problems))
    identity = base_identity(source)
    check_base_identity(checkpoint_chain(db, config.parent_checkpoint_id), identity)
    return store.create_run(db, config.method, config.to_json(), name=name,
                            parent_checkpoint_id=config.parent_checkpoint_id,
                            base_identity={**identity, "reward_models": reward_model_identities(db, config)})


class RunControl:
    """Pause / resume / stop requests from another thread, honoured between steps.

    `event_factory` makes its two flags: threading.Event for a run in a thread of this process,
    a multiprocessing context's Event for a run in a child process (see ``run_process``).
    """

    def __init__(self, event_factory=threading.Event) -> None:
        self.stop_flag = event_factory()
        self.run_flag = event_factory()  # cleared while paused
        self.run_flag.set()

    def pause(self) -> None:
        self.run_flag.clear()

    def resume(self) -> None:
        self.run_flag.set()

    def stop(self) -> None:
        self.stop_flag.set()
        self.run_flag.set()  # a paused run must wake up to stop

    @property
    def paused(self) -> bool:
        return not self.run_flag.is_set()

    @property
    def stop_requested(self) -> bool:
        return self.stop_flag.is_set()

    def wait_while_paused(self) -> None:
        self.run_flag.wait()


@dataclass
class TrainingData:
    """What a run trains on, fixed when it starts: plain rows, no database behind them."""

    pairs: list[dict] = field(default_factory=list)  # preference pairs: prompt, chosen, rejected (DPO)
    prompts: list[dict] = field(default_factory=list)  # training prompts: id, prompt (PPO)
    eval_prompts: list[dict] = field(default_factory=list)  # id, prompt: sampled greedily at each checkpoint
    reward_root: Path | None = None  # the folder reward-model paths resolve from: the project or the bundle
    base_unsampled: list[dict] = field(default_factory=list)  # eval prompts the base has no greedy sample of


def gather_training_data(db, config: TrainConfig) -> TrainingData:
    """The run's data from the project: what its engine selects, the eval prompts, the project folder."""
    from .rewards import project_folder

    eval_prompts = [{"id": row["id"], "prompt": row["prompt"]} for row in store.eval_prompts(db)]
    return TrainingData(**engine_module(config.method).select_data(config, db), eval_prompts=eval_prompts,
                        reward_root=project_folder(db), base_unsampled=base_unsampled(db, config, eval_prompts))


def base_unsampled(db, config: TrainConfig, eval_prompts: list[dict]) -> list[dict]:
    """For a run from the base: the eval prompts the base has no greedy sample of at the run's eval
    settings (its first checkpoint samples them, for Compare's Base column and the advisor)."""
    if config.parent_checkpoint_id is not None:
        return []
    decoding = Decoding(max_new_tokens=config.eval_max_new_tokens).to_json()
    stored = {row["prompt_id"] for row in store.samples(db, None) if row["decoding"] == decoding}
    return [row for row in eval_prompts if row["id"] not in stored]


@dataclass
class ModelStart:
    """The model state a run starts from: the base model and the adapters merged into it, oldest first."""

    base: ModelSource
    adapters: list[Path] = field(default_factory=list)  # PEFT adapter folders


class RunSink(Protocol):
    """Where a run's records go: the project database (SQLiteSink) or a bundle's files (BundleSink)."""

    def add(self, record: dict) -> None: ...  # one step's metrics; may be buffered
    def flush(self) -> None: ...
    def set_status(self, status: str, error: str | None = None) -> None: ...
    def checkpoint_saved(self, step: int, folder: Path, samples: list[dict],
                         base_samples: list[dict] = ()) -> None: ...  # base_samples: eval samples of the base
    def last_checkpoint(self, log: Callable[[str], None]) -> Path | None: ...  # the last whole one
    def discard_after(self, step: int) -> None: ...  # metrics and checkpoints of steps a resumed run redoes


class BufferedSink:
    """Step records written in batches: every `batch_size` records, or when `max_delay_s` has passed,
    so a slow run's charts still move. Subclasses say where with ``write(records)``."""

    def __init__(self, batch_size: int = 10, max_delay_s: float = 2.0) -> None:
        self.batch_size, self.max_delay_s = batch_size, max_delay_s
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.batch_size or time.monotonic() - self.last_flush > self.max_delay_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.write(self.pending)
            self.pending = []
        self.last_flush = time.monotonic()

    def write(self, records: list[dict]) -> None:
        raise NotImplementedError


class SQLiteSink(BufferedSink):
    """A project's run: metrics written in batches (one transaction each), checkpoints registered."""

    def __init__(self, db, run_id: int, identity: dict | None = None, batch_size: int = 10,
                 max_delay_s: float = 2.0) -> None:
        super().__init__(batch_size, max_delay_s)
        self.db, self.run_id = db, run_id
        self.identity = identity  # the base model's identity, recorded on every checkpoint

    def write(self, records: list[dict]) -> None:
        store.write_metrics(self.db, self.run_id, records)

    def set_status(self, status: str, error: str | None = None) -> None:
        store.set_run_status(self.db, self.run_id, status, error=error)

    def checkpoint_saved(self, step: int, folder: Path, samples: list[dict], base_samples: list[dict] = ()) -> None:
        with self.db.atomic():  # the checkpoint and its samples together, or neither
            checkpoint_id = store.add_checkpoint(self.db, self.run_id, step, str(folder), self.identity)
            store.add_samples(self.db, [{**sample, "checkpoint_id": checkpoint_id} for sample in samples]
                              + [{**sample, "checkpoint_id": None} for sample in base_samples])

    def last_checkpoint(self, log: Callable[[str], None]) -> Path | None:
        return last_good([(c["step"], store.checkpoint_folder(self.db, c))
                          for c in store.checkpoints(self.db, self.run_id)], log)

    def discard_after(self, step: int) -> None:
        store.delete_checkpoints_after(self.db, self.run_id, step)
        store.delete_metrics_after(self.db, self.run_id, step)


# --- model states: the base, or the base with a chain of checkpoints merged in ----------------

def checkpoint_chain(db, checkpoint_id: int | None) -> list[dict]:
    """The checkpoints to merge, oldest first, to rebuild the model state `checkpoint_id`."""
    chain = []
    while checkpoint_id is not None:
        checkpoint = store.get_checkpoint(db, checkpoint_id)
        chain.append(checkpoint)
        checkpoint_id = store.get_run(db, checkpoint["run_id"])["parent_checkpoint_id"]
    return chain[::-1]


class BaseModelChangedError(StudioError):
    """A checkpoint trained on another base than the project's current one (its adapter would not fit)."""


def check_base_identity(chain: list[dict], identity: dict) -> None:
    """Refuse to put adapters trained on one base onto another (rows from before identities pass)."""
    for checkpoint in chain:
        recorded = json.loads(checkpoint.get("base_identity") or "null")
        if recorded and recorded["hash"] != identity["hash"]:
            raise BaseModelChangedError(
                f"Checkpoint {checkpoint['id']} (run {checkpoint['run_id']}, step {checkpoint['step']}) was "
                f"trained on {recorded['model']} (content {recorded['hash']}), but the project's base is now "
                f"{identity['model']} (content {identity['hash']}). Its adapter only fits the base it was "
                "trained on: put that base back in the project settings, or train again from the new base.")


def verified_folder(db, checkpoint: dict) -> Path:
    """A checkpoint's folder, after checking that its files are whole; raises a clear error if not."""
    folder = store.checkpoint_folder(db, checkpoint)
    problem = verify_checkpoint(folder, resumable=False)
    if problem:
        raise store.ProjectError(
            f"Checkpoint {checkpoint['id']} (run {checkpoint['run_id']}, step {checkpoint['step']}) cannot "
            f"be used: {problem}. Use another checkpoint of that run, or train it again.")
    return folder


def model_start(db, checkpoint_id: int | None) -> ModelStart:
    """The project's base model with the adapters of `checkpoint_id`'s chain (none for the base),
    after checking that each adapter was trained on this base and that its files are whole."""
    source = ModelSource.from_json(store.get_setting(db, "base_model"))
    chain = checkpoint_chain(db, checkpoint_id)
    if chain:
        check_base_identity(chain, base_identity(source))
    return ModelStart(source, [verified_folder(db, checkpoint) / "adapter" for checkpoint in chain])


def load_start(start: ModelStart, device: str = "cpu", on_progress: Progress = ignore):
    """(model, tokenizer): the base with `start`'s adapters merged in, in order."""
    from peft import PeftModel

    total = 1 + len(start.adapters)  # the base, then each adapter merged into it
    on_progress("Loading the model", 0, total)
    model, tokenizer = load_model(start.base, device)
    on_progress("Loading the model", 1, total)
    for merged, adapter in enumerate(start.adapters, 2):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        on_progress("Loading the model", merged, total)
    return model, tokenizer


def load_model_state(db, checkpoint_id: int | None, device: str = "cpu", on_progress: Progress = ignore):
    """(model, tokenizer) for the base (None) or a checkpoint, with its adapters merged in."""
    return load_start(model_start(db, checkpoint_id), device, on_progress)


def export_adapter(db, checkpoint_id: int, out_dir: Path | str) -> Path:
    """A PEFT adapter folder (loadable with PeftModel.from_pretrained on the run's start state)."""
    source = verified_folder(db, store.get_checkpoint(db, checkpoint_id)) / "adapter"
    shutil.copytree(source, out_dir, dirs_exist_ok=True)
    return Path(out_dir)


def export_merged(db, checkpoint_id: int, out_dir: Path | str) -> Path:
    """A full model folder with every adapter of the chain merged: loadable with transformers alone."""
    model, tokenizer = load_model_state(db, checkpoint_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


# --- checkpoints ------------------------------------------------------------------------------

def _rng_state(device: str) -> dict:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


ADAPTER_FILE = "adapter/adapter_model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"


def verify_checkpoint(folder: Path, resumable: bool = True) -> str | None:
    """What is wrong with a checkpoint folder's files (None when whole), without loading tensors:
    the safetensors header must describe exactly the bytes after it, the torch file must be a
    whole zip whose members match their CRCs. `resumable=False` checks the adapter alone (all that
    loading a model state needs; an imported TRL checkpoint has no trainer state)."""
    import zipfile

    if not folder.is_dir():
        return f"its folder {folder} is missing"
    problem = safetensors_problem(folder / ADAPTER_FILE)
    if problem or not resumable:
        return problem
    state = folder / TRAINER_STATE_FILE
    try:
        with zipfile.ZipFile(state) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"{state} is damaged (member {bad})"
    except FileNotFoundError:
        return f"{state} is missing"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"{state} is damaged ({exc})"
    return None


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file (None when whole), from its header alone: the header must
    describe exactly the bytes after it (a copy cut short or padded is caught without reading tensors)."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > file.stat().st_size:
                return f"{file} is damaged (its header length is past the end of the file)"
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + size + end != file.stat().st_size:
            return f"{file} is truncated or padded ({file.stat().st_size} bytes, header says {8 + size + end})"
    except FileNotFoundError:
        return f"{file} is missing"
    except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:
        return f"{file} is damaged ({type(exc).__name__})"
    return None


def last_good(candidates: list[tuple[int, Path]], log: Callable[[str], None]) -> Path | None:
    """The newest of (step, folder) checkpoints whose files are whole; says which damaged ones it skipped."""
    for step, folder in reversed(candidates):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log(f"Checkpoint at step {step} is damaged ({problem}); trying the one before it")
    return None


def save_checkpoint(sink: RunSink, run_dir: Path, step: int, engine, tokenizer, device: str,
                    config: TrainConfig, data: TrainingData, on_progress: Progress = ignore) -> Path:
    """Write adapter + trainer state atomically and durably, sample the eval prompts (and, once, those
    the base has no greedy sample of), hand them to the sink together."""
    import torch

    folder = run_dir / f"checkpoint-{step}"
    partial = run_dir / f"checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    engine.model.save_pretrained(partial / "adapter", safe_serialization=True)
    torch.save({"step": step, "optimizer": engine.optimizer.state_dict(),
                "scheduler": engine.scheduler.state_dict(), "rng": _rng_state(device),
                "engine": engine.extra_state()}, partial / TRAINER_STATE_FILE)
    store.fsync_tree(partial)  # the files are on disk before the folder gets its final name
    shutil.rmtree(folder, ignore_errors=True)  # left by a crash between rename and registration
    os.replace(partial, folder)
    store.fsync_path(run_dir)  # ... and the rename is on disk before the database points at it

    decoding = Decoding(max_new_tokens=config.eval_max_new_tokens)
    generations = _eval_samples(engine.model, tokenizer, data.eval_prompts, decoding,
                                f"Eval samples at step {step}", on_progress)
    with engine.model.disable_adapter():  # a run from the base: without its adapter, it is the base
        base_generations = _eval_samples(engine.model, tokenizer, data.base_unsampled, decoding,
                                         "Eval samples of the base", on_progress)
    sink.checkpoint_saved(step, folder, _sample_rows(data.eval_prompts, generations, decoding),
                          _sample_rows(data.base_unsampled, base_generations, decoding))
    data.base_unsampled = []  # stored now: later checkpoints need not sample the base again
    return folder


def _eval_samples(model, tokenizer, rows: list[dict], decoding: Decoding, phase: str, on_progress: Progress) -> list:
    if not rows:
        return []
    on_progress(phase, 0, len(rows))
    return generate(model, tokenizer, [r["prompt"] for r in rows], decoding,
                    on_batch=lambda first, batch: on_progress(phase, first + len(batch), len(rows)))


def _sample_rows(rows: list[dict], generations: list, decoding: Decoding) -> list[dict]:
    return [{"prompt_id": row["id"], "sample_index": 0, "seed": decoding.seed, "decoding": decoding.to_json(),
             "text": g.text, "scores": {"length": len(g.response_ids), "finished": g.finished}}
            for row, g in zip(rows, generations)]


def resume_from_checkpoint(folder: Path, engine) -> int:
    """Load checkpoint `folder` into `engine` (adapter, optimizer, scheduler, RNG); returns its step."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(folder / ADAPTER_FILE, device=str(next(engine.model.parameters()).device))
    set_peft_model_state_dict(engine.model, adapter)
    state = torch.load(folder / TRAINER_STATE_FILE, weights_only=True)
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.scheduler.load_state_dict(state["scheduler"])
    engine.load_extra_state(state["engine"])
    _set_rng_state(state["rng"])
    return state["step"]


def take_run_lock(run_dir: Path) -> int:
    """The per-run lock, held by whichever process trains the run, so two can never train one run."""
    return store.take_lock(run_dir / store.RUN_LOCK_NAME,
                           f"The run in {run_dir} is being trained by another process (pid {{pid}}). "
                           "Stop it there, or wait for it to finish.")


def reward_model_identities(db, config: TrainConfig) -> dict[str, str]:
    """Fingerprints of the reward model folders a run scores with (a model retrained under the same
    name gets another fingerprint)."""
    from .rewards import source_from_json

    out = {}
    for data in getattr(config, "reward_sources", None) or []:
        source = source_from_json(data)
        if hasattr(source, "folder") and source.folder(store.project_dir(db)).is_dir():
            out[f"{source.type} {getattr(source, 'model', '') or source.path}"] = folder_fingerprint(
                source.folder(store.project_dir(db)))
    return out


def check_run_base(db, run: dict, config: TrainConfig, identity: dict) -> None:
    """A run resumes only on the base, and with the reward models, it started with."""
    recorded = json.loads(run.get("base_identity") or "null")
    if not recorded:
        return  # a run from before identities were recorded
    if recorded["hash"] != identity["hash"]:
        raise BaseModelChangedError(
            f"Run {run['id']} was started on {recorded['model']} (content {recorded['hash']}), but the "
            f"project's base is now {identity['model']} (content {identity['hash']}). Resuming would put "
            "its adapter on another model: put that base back in the project settings, or start a new run.")
    now = reward_model_identities(db, config)
    for name, fingerprint in recorded.get("reward_models", {}).items():
        if now.get(name) != fingerprint:
            raise BaseModelChangedError(
                f"Run {run['id']} was started with the reward model {name} (content {fingerprint}), which has "
                f"changed since (content {now.get(name, 'missing')}). Resuming would change what the run "
                "optimises half-way: start a new run with the new reward model, or put the old one back.")


def record_failure(sink: BufferedSink, exc: BaseException) -> None:
    """Mark the run failed with its error, even when the metrics that were pending cannot be written."""
    error = f"{type(exc).__name__}: {exc}"
    try:
        sink.flush()
    except Exception as flush_exc:  # e.g. the disk that failed the step is still full
        sink.pending = []  # recomputed on resume, from the last checkpoint
        error += f" (and its last metrics could not be written: {flush_exc})"
    sink.set_status("failed", error=error)


# --- the loop ---------------------------------------------------------------------------------

def execute(project_path: Path | str, run_id: int, control: RunControl | None = None,
            on_metrics: Callable[[dict], None] | None = None,
            on_log: Callable[[str], None] | None = None, on_progress: Progress = ignore) -> str:
    """Train run `run_id` of a project to its end or to a stop request; returns the final status.

    Opens its own database connection, so it can run in any thread. On an exception the run is
    marked failed (its checkpoints stay intact) and the exception propagates to the caller.
    """
    project_path = Path(project_path)
    run_dir = project_path / "runs" / str(run_id)
    db = store.connect(project_path)
    sink = SQLiteSink(db, run_id)
    try:
        run = store.get_run(db, run_id)
        config = engine_module(run["method"]).Config.from_json(run["config"])
        start = model_start(db, config.parent_checkpoint_id)
        sink.identity = base_identity(start.base)
        check_run_base(db, run, config, sink.identity)
        data = gather_training_data(db, config)
    except BaseException as exc:
        record_failure(sink, exc)
        db.close()
        raise

    def log(message: str) -> None:  # the run's own log file too, so the Log tab survives a relaunch
        append_run_log(run_dir, message)
        if on_log is not None:
            on_log(message)

    sink = trackers.project_run_sink(db, run_id, sink, run_dir, data.eval_prompts, log)
    try:
        return train(config, data, start, run_dir, sink, control, on_metrics, log, on_progress)
    finally:
        db.close()


def train(config: TrainConfig, data: TrainingData, start: ModelStart, run_dir: Path, sink: RunSink,
          control: RunControl | None = None, on_metrics: Callable[[dict], None] | None = None,
          on_log: Callable[[str], None] | None = None, on_progress: Progress = ignore) -> str:
    """Train `config` on `data` from `start`, recording to `sink`; returns the final status.

    In a data-parallel launch every rank calls this with the same arguments; rank 0 alone writes
    checkpoints (other ranks get a sink that only reads). On an exception the run is marked failed
    and the exception propagates.
    """
    import torch

    control = control or RunControl()
    log = on_log or (lambda message: None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_lock = take_run_lock(run_dir) if distributed.is_main() else None  # before the status says running
    is_main = distributed.is_main()
    sink.set_status("running")
    try:
        torch.manual_seed(config.seed)
        device, dtype = pick_device(config.device)
        device = distributed.local_device(device)
        log(f"Loading model on {device} ({dtype})")
        model, tokenizer = load_start(start, device, on_progress)
        policy = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                          config.lora_target_modules)
        route_frozen_linears(policy)
        engine = engine_module(config.method).Engine(config, policy, tokenizer, data, device, run_dir,
                                                                   on_progress)
        last = sink.last_checkpoint(log)
        # Every rank has read which checkpoint to resume from before rank 0 may write the next one (a
        # slower rank would otherwise see a fresh step-0 checkpoint and skip the barrier that saving it holds).
        distributed.barrier()
        step = resume_from_checkpoint(last, engine) if last is not None else 0
        sink.discard_after(step)  # steps after it (or every step, before a first checkpoint) are redone

        def checkpoint() -> None:
            sink.flush()
            if is_main:
                save_checkpoint(sink, run_dir, step, engine, tokenizer, device, config, data, on_progress)
            distributed.barrier()  # no rank runs ahead of a checkpoint it might have to resume from
            log(f"Checkpoint saved at step {step}")

        if step:
            log(f"Resumed from the checkpoint at step {step}")
        elif last is None and config.method in defaults.SHAPING_METHODS:
            # The start state's eval outputs: the reference every side effect is measured against.
            checkpoint()
            log("Start state sampled (checkpoint at step 0)")
        last_saved = step

        rewards: list[float] = []  # this session's step rewards, for the no-progress check
        while step < config.max_steps:
            if control.paused:
                sink.flush()
                sink.set_status("paused")
                log(f"Paused after step {step}")
                control.wait_while_paused()
                sink.set_status("running")
            if distributed.any_rank(control.stop_requested):
                break
            started = time.perf_counter()
            record = engine.train_step(step)
            step += 1
            record = {"step": step, "time": time.time(), **record,
                      "step_seconds": time.perf_counter() - started}
            sink.add(record)
            if on_metrics is not None:
                on_metrics(record)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                checkpoint()
                last_saved = step
            reward = next((record[name] for name in REWARD_METRICS if name in record), None)
            if reward is not None:
                rewards.append(reward)
                if step % config.checkpoint_every == 0:
                    progress = defaults.no_progress(rewards, config.method.upper())
                    if not progress.moving:
                        log(progress.message)
        sink.flush()
        if step != last_saved:
            checkpoint()
        status = "completed" if step >= config.max_steps else "stopped"
        sink.set_status(status)
        log(f"Run {status} at step {step}")
        return status
    except BaseException as exc:
        record_failure(sink, exc)
        raise
    finally:
        if run_lock is not None:
            os.close(run_lock)
