"""The one validator of a run's settings, used before a run is created by the CLI, the window's
form and run bundles: it returns {field: message}, so a form can turn each bad field red.

It checks what can be known without the project's data: types (from the engine's Config
annotations), ranges, names of choices, the device, and LoRA target modules against the module
names of the base model (read from its safetensors headers, no weights loaded). What depends on the
project's data (are there pairs? does dataset 3 exist?) stays in each engine's ``validate``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Iterable

AT_LEAST_ONE = ("max_steps", "checkpoint_every", "lora_r", "eval_max_new_tokens")
NOT_NEGATIVE = ("warmup_steps", "weight_decay", "seed", "learning_rate")  # a rate of 0 is a frozen probe
POSITIVE = ("max_grad_norm", "lora_alpha")
DEVICES = "auto, cpu, mps, cuda or cuda:N"


def validate_settings(method: str, values: dict, module_names: Iterable[str] | None = None) -> dict[str, str]:
    """Problems in `values` (a run's settings, defaults filled in or not), as field -> message.

    `module_names`: the base model's module names, to check lora_target_modules against; None skips it.
    """
    from .runs import SCHEDULERS, engine_module

    config_class = engine_module(method).Config
    hints = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class)}
    problems = {key: "unknown setting" for key in values if key not in known}
    for key, value in values.items():
        if key in known and not _has_type(value, hints[key]):
            problems[key] = f"expected {_type_words(hints[key])}, got {value!r}"
    ok = {key: value for key, value in values.items() if key in known and key not in problems}

    def check(key: str, test, message: str) -> None:
        if key in ok and not test(ok[key]):
            problems[key] = f"{message} (got {ok[key]!r})"

    for key in AT_LEAST_ONE:
        check(key, lambda v: v >= 1, "must be at least 1")
    for key in NOT_NEGATIVE:
        check(key, lambda v: v >= 0, "must not be negative")
    for key in POSITIVE:
        check(key, lambda v: v > 0, "must be positive")
    check("lora_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)")
    check("lr_scheduler", lambda v: v in SCHEDULERS, f"must be one of {', '.join(SCHEDULERS)}")
    if "device" in ok:
        problem = device_problem(ok["device"])
        if problem:
            problems["device"] = problem
    if "lora_target_modules" in ok and module_names is not None:
        problem = target_modules_problem(ok["lora_target_modules"], list(module_names))
        if problem:
            problems["lora_target_modules"] = problem
    return problems


def check_settings(method: str, values: dict, module_names: Iterable[str] | None = None) -> None:
    """Raise SettingsError (its .fields: field -> message) if validate_settings finds anything."""
    from .runs import SettingsError

    problems = validate_settings(method, values, module_names)
    if problems:
        raise SettingsError(problems)


def device_problem(device: str) -> str | None:
    """Why `device` cannot be trained on here, or None."""
    import torch

    if device in ("auto", "cpu"):
        return None
    if device == "mps":
        available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        return None if available else "there is no MPS (Apple GPU) device on this computer"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        return f"unknown device {device!r}; expected {DEVICES}"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= count:
        found = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
        return f"no such device: this computer has {found}"
    return None


def target_modules_problem(targets: str | list[str], module_names: list[str]) -> str | None:
    """LoRA targets that match none of the model's modules (PEFT's rules: a list entry matches a
    module name or its last dotted parts; a string other than "all-linear" is a full regex)."""
    if targets == "all-linear":
        return None
    if isinstance(targets, str):
        try:
            matched = any(re.fullmatch(targets, name) for name in module_names)
        except re.error as exc:
            return f"not a valid regular expression: {exc}"
        return None if matched else f"{targets!r} matches none of the model's modules"
    if not targets:
        return "name at least one module, or use \"all-linear\""
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in module_names)]
    if not missing:
        return None
    leaves = sorted({name.rsplit(".", 1)[-1] for name in module_names if "." in name})
    return (f"{', '.join(map(repr, missing))} match{'es' if len(missing) == 1 else ''} none of the model's "
            f"modules (its layers have: {', '.join(leaves[:20])})")


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(item, args[0]) for item in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is Any:
        return True
    return isinstance(value, hint)


def _type_words(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(arg) for arg in args)
    if origin is list:
        items = {int: "a list of ids like [1, 2]", str: 'a list of names like ["q_proj"]'}
        return items.get(args[0] if args else None, "a list of objects")
    words = {int: "a whole number", float: "a number", str: "text", bool: "true or false",
             type(None): "null (none)", dict: "an object"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))
