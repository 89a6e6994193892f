"""Run lifecycle shared by every engine: config, start, pause, stop, checkpoint, resume; metrics sink.

An engine module (``studio.core.dpo``, ``studio.core.ppo``) provides:

* ``Config``: a dataclass extending :class:`TrainConfig` with the method's hyper-parameters;
* ``validate(config, db) -> list[str]``: problems that must stop a launch (e.g. no pairs);
* ``Engine(config, policy, tokenizer, db, device, run_dir)`` with attributes ``model`` (the
  PeftModel policy), ``optimizer``, ``scheduler``, and methods ``train_step(step) -> dict`` (one
  optimizer step, returning metrics named as TRL names them), ``extra_state() -> dict`` and
  ``load_extra_state(state)`` (what a checkpoint needs beyond adapter, optimizer, scheduler, RNG:
  tensors, numbers and strings only, so it loads with ``weights_only=True``).

:func:`execute` drives one: it loads the model state the run starts from, wraps it with a fresh LoRA
adapter, resumes from the run's last checkpoint if there is one, and calls ``train_step`` until
``max_steps`` or a stop request, checking pause/stop between steps. Data order and every random
draw come from seeded generators whose state is in the checkpoint, so a resumed run (even after a
kill -9) repeats exactly what an uninterrupted run does on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import store
from .errors import StudioError
from .generation import Decoding, generate
from .models import ModelSource, add_lora, load_model, pick_device

ENGINE_MODULES = {"dpo": "studio.core.dpo", "ppo": "studio.core.ppo"}
SHAPING_METHODS = ("ppo", "grpo", "rloo")  # reward-driven: they sample their start state at step 0


class ConfigError(StudioError):
    """A run configuration that cannot be launched, with a message meant for the user."""


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


def make_config(method: str, overrides: dict | None = None) -> TrainConfig:
    """The engine's default config with `overrides` applied (unknown keys are an error)."""
    module = engine_module(method)
    return module.Config.from_json({**module.Config().to_json(), **(overrides or {}), "method": method})


def create_run(db, config: TrainConfig, name: str | None = None) -> int:
    """Validate `config` against the project and record a queued run; returns its id."""
    problems = engine_module(config.method).validate(config, db)
    if config.parent_checkpoint_id is not None:
        store.get_checkpoint(db, config.parent_checkpoint_id)  # raises if missing
    if problems:
        raise ConfigError("Cannot start this run:\n- " + "\n- ".join(problems))
    return store.create_run(db, config.method, config.to_json(), name=name,
                            parent_checkpoint_id=config.parent_checkpoint_id)


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


class MetricsSink:
    """Buffers step records and writes them to the store in batches (one transaction each)."""

    def __init__(self, db, run_id: int, batch_size: int = 10, max_delay_s: float = 2.0) -> None:
        self.db, self.run_id = db, run_id
        self.batch_size, self.max_delay_s = batch_size, max_delay_s
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.batch_size or time.monotonic() - self.last_flush > self.max_delay_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            store.write_metrics(self.db, self.run_id, self.pending)
            self.pending = []
        self.last_flush = time.monotonic()


# --- model states: the base, or the base with a chain of checkpoints merged in ----------------

def checkpoint_chain(db, checkpoint_id: int | None) -> list[dict]:
    """The checkpoints to merge, oldest first, to rebuild the model state `checkpoint_id`."""
    chain = []
    while checkpoint_id is not None:
        checkpoint = store.get_checkpoint(db, checkpoint_id)
        chain.append(checkpoint)
        checkpoint_id = store.get_run(db, checkpoint["run_id"])["parent_checkpoint_id"]
    return chain[::-1]


def load_model_state(db, checkpoint_id: int | None, device: str = "cpu"):
    """(model, tokenizer) for the base (None) or a checkpoint, with its adapters merged in."""
    from peft import PeftModel

    model, tokenizer = load_model(ModelSource.from_json(store.get_setting(db, "base_model")), device)
    for checkpoint in checkpoint_chain(db, checkpoint_id):
        model = PeftModel.from_pretrained(model, Path(checkpoint["path"]) / "adapter").merge_and_unload()
    return model, tokenizer


def export_adapter(db, checkpoint_id: int, out_dir: Path | str) -> Path:
    """A PEFT adapter folder (loadable with PeftModel.from_pretrained on the run's start state)."""
    source = Path(store.get_checkpoint(db, checkpoint_id)["path"]) / "adapter"
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


def save_checkpoint(db, run_id: int, run_dir: Path, step: int, engine, tokenizer, device: str,
                    config: TrainConfig) -> int:
    """Write adapter + trainer state atomically, sample the eval prompts, register both together."""
    import torch

    folder = run_dir / f"checkpoint-{step}"
    partial = run_dir / f"checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    engine.model.save_pretrained(partial / "adapter", safe_serialization=True)
    torch.save({"step": step, "optimizer": engine.optimizer.state_dict(),
                "scheduler": engine.scheduler.state_dict(), "rng": _rng_state(device),
                "engine": engine.extra_state()}, partial / "trainer_state.pt")
    shutil.rmtree(folder, ignore_errors=True)  # left by a crash between rename and registration
    os.replace(partial, folder)

    eval_rows = store.eval_prompts(db)
    decoding = Decoding(max_new_tokens=config.eval_max_new_tokens)
    generations = generate(engine.model, tokenizer, [r["prompt"] for r in eval_rows], decoding) if eval_rows else []
    with db.atomic():
        checkpoint_id = store.add_checkpoint(db, run_id, step, str(folder))
        store.add_samples(db, [
            {"checkpoint_id": checkpoint_id, "prompt_id": row["id"], "sample_index": 0,
             "seed": decoding.seed, "decoding": decoding.to_json(), "text": g.text,
             "scores": {"length": len(g.response_ids), "finished": g.finished}}
            for row, g in zip(eval_rows, generations)])
    return checkpoint_id


def resume_from_last_checkpoint(db, run_id: int, engine) -> int:
    """Load the run's last registered checkpoint into `engine`; returns the step to continue from."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    registered = store.checkpoints(db, run_id)
    if not registered:
        return 0
    folder = Path(registered[-1]["path"])
    adapter = load_file(folder / "adapter" / "adapter_model.safetensors",
                        device=str(next(engine.model.parameters()).device))
    set_peft_model_state_dict(engine.model, adapter)
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.scheduler.load_state_dict(state["scheduler"])
    engine.load_extra_state(state["engine"])
    _set_rng_state(state["rng"])
    store.delete_metrics_after(db, run_id, state["step"])  # steps after it will be recomputed
    return state["step"]


# --- the loop ---------------------------------------------------------------------------------

def execute(project_path: Path | str, run_id: int, control: RunControl | None = None,
            on_metrics: Callable[[dict], None] | None = None,
            on_log: Callable[[str], None] | None = None) -> str:
    """Train run `run_id` to its end or to a stop request; returns the final status.

    Opens its own database connection, so it can run in any thread. On an exception the run is
    marked failed (its checkpoints stay intact) and the exception propagates to the caller.
    """
    import torch

    control = control or RunControl()
    log = on_log or (lambda message: None)
    project_path = Path(project_path)
    db = store.connect(project_path)
    run = store.get_run(db, run_id)
    module = engine_module(run["method"])
    config = module.Config.from_json(run["config"])
    run_dir = project_path / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    sink = MetricsSink(db, run_id)
    store.set_run_status(db, run_id, "running")
    try:
        torch.manual_seed(config.seed)
        device, dtype = pick_device(config.device)
        log(f"Loading model on {device} ({dtype})")
        model, tokenizer = load_model_state(db, config.parent_checkpoint_id, device)
        policy = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                          config.lora_target_modules)
        engine = module.Engine(config, policy, tokenizer, db, device, run_dir)
        step = resume_from_last_checkpoint(db, run_id, engine)
        if step:
            log(f"Resumed from the checkpoint at step {step}")
        elif config.method in SHAPING_METHODS and not store.checkpoints(db, run_id):
            # The start state's eval outputs: the reference every side effect is measured against.
            save_checkpoint(db, run_id, run_dir, 0, engine, tokenizer, device, config)
            log("Start state sampled (checkpoint at step 0)")
        last_saved = step
        while step < config.max_steps:
            if control.paused:
                sink.flush()
                store.set_run_status(db, run_id, "paused")
                log(f"Paused after step {step}")
                control.wait_while_paused()
                store.set_run_status(db, run_id, "running")
            if control.stop_requested:
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
                sink.flush()
                save_checkpoint(db, run_id, run_dir, step, engine, tokenizer, device, config)
                last_saved = step
                log(f"Checkpoint saved at step {step}")
        sink.flush()
        if step != last_saved:
            save_checkpoint(db, run_id, run_dir, step, engine, tokenizer, device, config)
            log(f"Checkpoint saved at step {step}")
        status = "completed" if step >= config.max_steps else "stopped"
        store.set_run_status(db, run_id, status)
        log(f"Run {status} at step {step}")
        return status
    except BaseException as exc:
        sink.flush()
        store.set_run_status(db, run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        db.close()
