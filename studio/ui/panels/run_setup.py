"""Run setup: DPO and PPO forms built from the engines' ``Config`` dataclasses, presets, launch.

Every form row comes from ``dataclasses.fields(module.Config)``: a new field in an engine shows up
here without a UI change. Its editor is chosen from the default value's type, its tooltip from the
field's ``metadata["help"]``, the engine's ``HELP`` dict, or :data:`HELP` below, in that order.
Choices come from ``metadata["choices"]``, the engine's ``CHOICES`` dict, or :data:`CHOICES`.

Launching validates through ``runs.create_run``; a ``ConfigError`` (e.g. a DPO run with no pairs)
is shown inline under the form, nothing is queued.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout,
    QHeaderView, QLabel, QLineEdit, QProgressBar, QPushButton, QScrollArea, QSpinBox, QTableWidget,
    QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget,
)

from studio.core.defaults import SHAPING_METHODS

from . import DANGER, WARNING, ask_once, hint_label, icon
from .reward_preview import RewardPreview

SUMMARY_SETTINGS = ("max_steps", "checkpoint_every", "learning_rate", "batch_size", "beta", "reward_sources")

METHODS = (("dpo", "DPO"), ("ppo", "PPO"), ("grpo", "GRPO"), ("rloo", "RLOO"))

# One line per hyper-parameter, for fields whose engine gives no help of its own.
HELP = {
    # shared by every engine (runs.TrainConfig)
    "seed": "Seed for data order, dropout and sampling: the same seed repeats a run exactly on CPU",
    "max_steps": "Number of optimizer steps to train for",
    "learning_rate": "AdamW step size for the LoRA weights",
    "lr_scheduler": "How the learning rate changes over the run: linear decay, constant, or cosine",
    "warmup_steps": "Steps over which the learning rate ramps up from zero",
    "weight_decay": "AdamW weight decay applied to the LoRA weights",
    "max_grad_norm": "Gradients are clipped to this norm before each optimizer step",
    "lora_r": "Rank of the LoRA update: higher can learn more and uses more memory",
    "lora_alpha": "LoRA scale numerator: updates are scaled by alpha / r",
    "lora_dropout": "Dropout on the LoRA branch during training (0 turns it off)",
    "lora_target_modules": 'Layers that get adapters: "all-linear" or a JSON list of module names',
    "checkpoint_every": "Save a checkpoint (with eval samples) every this many steps; also at stop and end",
    "eval_max_new_tokens": "Length of the greedy answers to eval prompts stored with each checkpoint",
    "device": "Where to train: auto picks CUDA (bf16 autocast), then Apple MPS, then CPU",
    # DPO (TRL's names)
    "beta": "Pull towards the reference model: higher stays closer to it (TRL's beta)",
    "loss_type": "DPO loss: sigmoid is the original; ipo and hinge are more robust to noisy pairs",
    "label_smoothing": "Assumed share of mislabelled pairs (conservative DPO); 0 trusts every pair",
    "batch_size": "Examples per optimizer step (pairs for DPO, prompts for PPO)",
    "gradient_accumulation_steps": "Batches whose gradients are summed before one optimizer step",
    "max_length": "Tokens kept per prompt + response; longer examples are truncated",
    "max_prompt_length": "Tokens kept from the prompt; longer prompts are cut",
    "max_completion_length": "Tokens kept from each response; longer responses are cut",
    "reference_free": "Ignore the reference model (compare policy log-probs directly)",
    "precompute_ref_log_probs": "Compute reference log-probs once up front (faster steps, slower start)",
    "rpo_alpha": "Weight of an added NLL loss on the chosen responses (RPO); 0 turns it off",
    # PPO (TRL's names)
    "kl_coef": "Per-token penalty for drifting from the reference model (TRL's kl_coef)",
    "prompts_per_step": "Prompts sampled and answered per PPO step",
    "samples_per_prompt": "Responses generated per prompt in each rollout",
    "max_new_tokens": "Longest response generated in a rollout (shorter saves memory and time)",
    "response_length": "Longest response generated in a rollout (shorter saves memory and time)",
    "temperature": "Sampling temperature of rollouts: lower is more deterministic",
    "top_p": "Nucleus sampling in rollouts: keep the smallest token set with this probability",
    "top_k": "Sample only among the k most likely tokens (0 turns it off)",
    "ppo_epochs": "Optimisation passes over each batch of rollouts",
    "num_ppo_epochs": "Optimisation passes over each batch of rollouts",
    "mini_batch_size": "Rollouts per PPO minibatch update",
    "num_mini_batches": "Minibatches each batch of rollouts is split into",
    "cliprange": "PPO clip range for the policy probability ratio",
    "cliprange_value": "Clip range for value-function updates",
    "vf_coef": "Weight of the value loss in the total loss",
    "gamma": "Discount factor for future rewards",
    "lam": "GAE lambda: trades bias against variance in advantages",
    "whiten_rewards": "Normalise rewards within each batch",
    "whiten_advantages": "Normalise advantages within each batch",
    "missing_eos_penalty": "Subtracted from the score of responses that never finish",
    "stop_token": "Token that ends a response in rollouts",
    "reward_clip": "Rewards are clipped to ± this value",
}

CHOICES = {
    "lr_scheduler": ("linear", "constant", "cosine"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "loss_type": ("sigmoid", "ipo", "robust", "hinge"),
    "kl_estimator": ("k1", "k3"),
}

# Fields set elsewhere on this panel, not in the generic form.
SPECIAL_FIELDS = {"method", "parent_checkpoint_id", "reward_sources"}

# name -> (method, overrides applied on top of the engine's defaults, explanation). Overrides for
# fields the engine does not have are skipped.
PRESETS = {
    "Shape with PPO": ("ppo", {"kl_coef": 0.05},
                       "Shape behaviour with reward signals: the policy explores, rewards steer it, "
                       "the KL penalty keeps it near the base model."),
    "Shape with GRPO": ("grpo", {"beta": 0.04, "num_generations": 4},
                        "Shape behaviour with reward signals, no value model: each prompt gets a group "
                        "of answers, and each answer is judged against its group's average."),
    "Settle with DPO": ("dpo", {"beta": 0.1, "loss_type": "sigmoid"},
                        "Settle behaviour on preference pairs you trust: no sampling, steady and "
                        "cheap; beta keeps it close to the reference."),
}

SHARED_GROUPS = (  # (title, names, expanded) for the settings every engine shares
    ("Training", ("max_steps", "learning_rate", "lr_scheduler", "warmup_steps"), True),
    ("LoRA adapter", ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"), False),
)


def source_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line in the class source (``beta: float = 0.1  # ...``),
    for the class and its dataclass bases: engines document their fields this way."""
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            out[match.group(1)] = match.group(2).strip()
    return out


def field_help(module, field: dataclasses.Field, comments: dict[str, str] | None = None) -> str:
    text = (field.metadata.get("help") or getattr(module, "HELP", {}).get(field.name)
            or (comments or {}).get(field.name) or HELP.get(field.name))
    default = _default(field)
    shown = json.dumps(default) if not isinstance(default, str) else repr(default)
    text = text or field.name.replace("_", " ")
    return f"{text[:1].upper()}{text[1:]}  (default {shown})"


def field_choices(module, field: dataclasses.Field) -> tuple | None:
    """metadata["choices"], the engine's CHOICES dict, an engine constant named after the field
    (LOSS_TYPES for loss_type), or :data:`CHOICES`."""
    constant = getattr(module, f"{field.name.upper()}S", None)
    if not (isinstance(constant, (tuple, list)) and all(isinstance(c, str) for c in constant)):
        constant = None
    return (field.metadata.get("choices") or getattr(module, "CHOICES", {}).get(field.name) or constant
            or CHOICES.get(field.name))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


# --- editors: one per field, each with value() / set_value() and a `changed` signal ------------

class FloatSpinBox(QDoubleSpinBox):
    """A spin box that shows 5e-05 as 5e-05 (not 0.00), steps by a tenth of the value's magnitude."""

    def __init__(self, minimum: float = 0.0) -> None:
        super().__init__()
        self.setDecimals(15)
        self.setRange(minimum, 1e12)
        self.setKeyboardTracking(False)

    def textFromValue(self, value: float) -> str:
        return f"{value:.6g}"

    def valueFromText(self, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int):
        try:
            value = float(text)
        except ValueError:
            partial = text.strip().lower() in ("", "-", ".", "-.") or text.strip().lower().endswith(("e", "e-", "e+"))
            state = QValidator.State.Intermediate if partial else QValidator.State.Invalid
            return state, text, pos
        state = QValidator.State.Acceptable if self.minimum() <= value <= self.maximum() else QValidator.State.Intermediate
        return state, text, pos

    def stepBy(self, steps: int) -> None:
        value = self.value()
        step = 10 ** (math.floor(math.log10(abs(value))) - 1) if value else 0.01
        self.setValue(round(value + steps * step, 15))


class ValueEditor(QWidget):
    """An editor for one setting, chosen from its default value's type (and its choices, if any)."""

    changed = Signal()

    def __init__(self, name: str, default: Any, choices: tuple | list | None = None) -> None:
        super().__init__()
        self.name = name
        self.default = default
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        if isinstance(default, bool):
            self.kind, self.widget = "bool", QCheckBox()
            self.widget.toggled.connect(self.changed)
        elif isinstance(default, int):
            self.kind, self.widget = "int", QSpinBox()
            self.widget.setRange(0 if default >= 0 else -2**31, 2**31 - 1)
            self.widget.setKeyboardTracking(False)
            self.widget.valueChanged.connect(self.changed)
        elif isinstance(default, float):
            self.kind, self.widget = "float", FloatSpinBox(0.0 if default >= 0 else -1e12)
            self.widget.valueChanged.connect(self.changed)
        elif isinstance(default, str) and choices:
            self.kind, self.widget = "choice", QComboBox()
            for choice in choices:
                self.widget.addItem(str(choice), choice)
            if self.widget.findData(default) < 0:
                self.widget.addItem(default, default)
            self.widget.currentIndexChanged.connect(self.changed)
        elif isinstance(default, str):
            self.kind, self.widget = "text", QLineEdit()
            self.widget.textChanged.connect(self.changed)
        else:  # None, lists, dicts, unions: JSON
            self.kind, self.widget = "json", QLineEdit()
            self.widget.setPlaceholderText("none" if default is None else "JSON")
            self.widget.textChanged.connect(self.changed)
        self.widget.setMinimumWidth(90)
        layout.addWidget(self.widget)
        self.set_value(default)

    def value(self) -> Any:
        w = self.widget
        if self.kind == "bool":
            return w.isChecked()
        if self.kind in ("int", "float"):
            w.interpretText()
            return w.value()
        if self.kind == "choice":
            return w.currentData()
        text = w.text()
        if self.kind == "text":
            # A JSON list typed into a text field (e.g. lora_target_modules) stays a list.
            stripped = text.strip()
            if stripped.startswith("["):
                try:
                    return json.loads(stripped)
                except json.JSONDecodeError:
                    pass
            return text
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text.strip()  # a bare word where text is allowed (e.g. "all-linear")

    def set_value(self, value: Any) -> None:
        w = self.widget
        if self.kind == "bool":
            w.setChecked(bool(value))
        elif self.kind in ("int", "float"):
            w.setValue(value if value is not None else 0)
        elif self.kind == "choice":
            index = w.findData(value)
            if index < 0:
                w.addItem(str(value), value)
                index = w.count() - 1
            w.setCurrentIndex(index)
        elif self.kind == "text":
            w.setText(value if isinstance(value, str) else json.dumps(value))
            w.setCursorPosition(0)
        else:
            w.setText("" if value is None else value if isinstance(value, str) else json.dumps(value))
            w.setCursorPosition(0)

    @property
    def modified(self) -> bool:
        return self.value() != self.default


class ConfigForm(QWidget):
    """A form for one engine's Config: method settings first, then the shared ones, grouped."""

    def __init__(self, module, shared_fields: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from superqt import QCollapsible

        self.module = module
        self.editors: dict[str, ValueEditor] = {}
        self.labels: dict[str, QLabel] = {}
        comments = source_comments(module.Config)
        fields = [f for f in dataclasses.fields(module.Config) if f.name not in SPECIAL_FIELDS]
        by_name = {f.name: f for f in fields}
        own = [f.name for f in fields if f.name not in shared_fields]
        placed = set(own)
        groups: list[tuple[str, list[str], bool]] = []
        if own:
            groups.append((f"{module.Config().method.upper() or 'Method'} settings", own, True))
        for title, names, expanded in SHARED_GROUPS:
            names = [n for n in names if n in by_name and n not in placed]
            placed.update(names)
            groups.append((title, names, expanded))
        rest = [f.name for f in fields if f.name not in placed]
        groups.append(("More", rest, False))

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        self.sections: dict[str, QWidget] = {}
        for title, names, expanded in groups:
            if not names:
                continue
            body = QWidget()
            form = QFormLayout(body)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            form.setContentsMargins(4, 2, 4, 2)
            form.setVerticalSpacing(5)
            for name in names:
                field = by_name[name]
                editor = ValueEditor(name, _default(field), field_choices(module, field))
                tip = field_help(module, field, comments)
                label = QLabel(name)
                label.setToolTip(tip)
                editor.setToolTip(tip)
                editor.widget.setToolTip(tip)
                editor.changed.connect(lambda e=editor: self._mark(e))
                form.addRow(label, editor)
                self.editors[name], self.labels[name] = editor, label
            if expanded:
                box = QGroupBox(title)
                box_layout = QVBoxLayout(box)
                box_layout.setContentsMargins(4, 4, 4, 4)
                box_layout.addWidget(body)
                section: QWidget = box
            else:
                section = QCollapsible(title, expandedIcon="▾", collapsedIcon="▸")
                section.setDuration(0)
                section.addWidget(body)
                section.collapse(animate=False)
            self.sections[title] = section
            layout.addWidget(section)
        layout.addStretch(1)

    def values(self) -> dict:
        return {name: editor.value() for name, editor in self.editors.items()}

    def set_values(self, values: dict) -> None:
        for name, value in values.items():
            if name in self.editors:
                self.editors[name].set_value(value)

    def reset(self) -> None:
        for editor in self.editors.values():
            editor.set_value(editor.default)

    def set_defaults(self, values: dict) -> None:
        """New defaults (the project model's size picks them): a field still at its old default follows."""
        for name, value in values.items():
            editor = self.editors.get(name)
            if editor is not None:
                if editor.value() == editor.default:
                    editor.set_value(value)
                editor.default = value

    def mark_invalid(self, problems: dict[str, str]) -> None:
        """Turn the fields settings.validate_settings refused red, with its message as their tooltip."""
        for name, editor in self.editors.items():
            bad = name in problems
            editor.widget.setStyleSheet(f"border: 1px solid {DANGER};" if bad else "")
            editor.widget.setToolTip(problems[name] if bad else editor.toolTip())
            self.labels[name].setStyleSheet(f"color: {DANGER};" if bad else "")

    def _mark(self, editor: ValueEditor) -> None:
        """Settings that differ from the engine's default are shown in bold."""
        label = self.labels[editor.name]
        font = label.font()
        font.setBold(editor.modified)
        label.setFont(font)


# --- PPO reward sources -----------------------------------------------------------------------

def normalise_catalogue(raw: Any) -> dict[str, dict]:
    """rewards.describe_sources() as {type: {"help": str, "params": {name: {"default", "help"}}}}.

    Accepts a dict of types (each a dict with help/description and params/parameters, or directly a
    dict of parameters) or a list of dicts with a "type" or "name" key; a parameter may be a dict
    with default/help, a (default, help) pair, or a bare default.
    """
    if isinstance(raw, (list, tuple)):
        raw = {item.get("type") or item.get("name"): item for item in raw if isinstance(item, dict)}
    out: dict[str, dict] = {}
    for type_name, spec in (raw or {}).items():
        if not isinstance(spec, dict):
            out[str(type_name)] = {"help": str(spec or ""), "params": {}}
            continue
        text = spec.get("help") or spec.get("description") or spec.get("doc") or ""
        params = spec.get("params", spec.get("parameters"))
        if params is None:
            params = {k: v for k, v in spec.items() if k not in ("help", "description", "doc", "type", "name")}
        norm = {}
        for name, p in (params or {}).items():
            if isinstance(p, dict) and ("default" in p or "help" in p):
                norm[name] = {"default": p.get("default"), "help": p.get("help", "")}
            elif isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[1], str):
                norm[name] = {"default": p[0], "help": p[1]}
            else:
                norm[name] = {"default": p, "help": ""}
        out[str(type_name)] = {"help": str(text), "params": norm}
    return out


class RewardSourcesTable(QWidget):
    """PPO reward sources: a table (type, weight, parameters) and a form for the selected source.

    Entries are stored as the PPO config wants them, ``{"type", "weight", **parameters}`` (or with
    the parameters under "params" if the engine's defaults nest them). The parameter form is built
    from the catalogue (``rewards.describe_sources()``), one editor and one line of help each.
    """

    COLUMNS = ("Type", "Weight", "Parameters")
    edited = Signal()  # the user changed a source (not set_value): the project keeps them as its setting

    def __init__(self, catalogue: dict, defaults: list[dict] | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.catalogue = normalise_catalogue(catalogue)
        self.defaults = [dict(d) for d in (defaults or [])]
        self.nested = any(isinstance(d, dict) and "params" in d for d in self.defaults)
        self.sources: list[dict] = []  # {"type", "weight", "params": {...}} while editing
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(30)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Fixed)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.table.setColumnWidth(1, 72)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setMinimumHeight(100)
        self.table.setMaximumHeight(150)
        self.table.currentCellChanged.connect(lambda row, *_: self._show_params(row))
        layout.addWidget(self.table)
        buttons = QHBoxLayout()
        self.add_button = QPushButton(icon("fa6s.plus"), "Add source")
        self.add_button.setToolTip("Add a reward source; choose its type in the table")
        self.add_button.clicked.connect(self._add_clicked)
        self.remove_button = QPushButton(icon("fa6s.trash-can"), "Remove")
        self.remove_button.clicked.connect(self.remove_selected)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        layout.addLayout(buttons)
        self.params_box = QGroupBox("Parameters")
        self.params_form = QFormLayout(self.params_box)
        self.params_form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.params_form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.param_editors: dict[str, ValueEditor] = {}
        layout.addWidget(self.params_box)
        if not self.catalogue:
            layout.addWidget(hint_label("No reward catalogue (studio.core.rewards): parameters cannot be edited here.",
                                        WARNING))
        self.set_value(self.defaults)

    # --- rows ---
    def _add_clicked(self) -> None:
        self.add_row()
        self.edited.emit()

    def add_row(self, source: dict | None = None) -> None:
        source = dict(source or {})
        kind = source.get("type") or (next(iter(self.catalogue)) if self.catalogue else "")
        if self.nested:
            params = dict(source.get("params") or {})
        else:
            params = {k: v for k, v in source.items() if k not in ("type", "weight")}
        spec = self.catalogue.get(kind, {"params": {}})
        full = {name: p["default"] for name, p in spec["params"].items()}
        full.update(params)
        self.sources.append({"type": kind, "weight": float(source.get("weight", 1.0)), "params": full})
        row = self.table.rowCount()
        self.table.insertRow(row)
        combo = QComboBox()
        for name in list(self.catalogue) or [kind]:
            combo.addItem(name, name)
            combo.setItemData(combo.count() - 1, self.catalogue.get(name, {}).get("help", ""),
                              Qt.ItemDataRole.ToolTipRole)
        if combo.findData(kind) < 0:
            combo.addItem(kind, kind)
        combo.setCurrentIndex(combo.findData(kind))
        combo.setToolTip(self.catalogue.get(kind, {}).get("help", kind))
        combo.currentIndexChanged.connect(lambda _i, c=combo: self._on_type_changed(c))
        weight = FloatSpinBox(-1e12)
        weight.setValue(self.sources[-1]["weight"])
        weight.setToolTip("How much this source counts: the reward is the weighted sum of the sources' scores")
        weight.valueChanged.connect(lambda value, w=weight: self._on_weight_changed(w, value))
        self.table.setCellWidget(row, 0, combo)
        self.table.setCellWidget(row, 1, weight)
        self.table.setItem(row, 2, QTableWidgetItem())
        self._update_summary(row)
        self.table.setCurrentCell(row, 2)

    def _row_of(self, widget: QWidget, column: int) -> int:
        for row in range(self.table.rowCount()):
            if self.table.cellWidget(row, column) is widget:
                return row
        return -1

    def _on_type_changed(self, combo: QComboBox) -> None:
        row = self._row_of(combo, 0)
        if row < 0:
            return
        kind = combo.currentData()
        spec = self.catalogue.get(kind, {"help": "", "params": {}})
        self.sources[row].update(type=kind, params={name: p["default"] for name, p in spec["params"].items()})
        combo.setToolTip(spec.get("help") or kind)
        self._update_summary(row)
        self.table.setCurrentCell(row, 2)
        self._show_params(row)
        self.edited.emit()

    def _on_weight_changed(self, box: QWidget, value: float) -> None:
        row = self._row_of(box, 1)
        if row >= 0:
            self.sources[row]["weight"] = value
            self.edited.emit()

    def _update_summary(self, row: int) -> None:
        params = self.sources[row]["params"]
        text = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()
                         if v not in ("", None, []))
        item = self.table.item(row, 2)
        item.setText(text or "defaults")
        item.setToolTip(json.dumps(params, indent=1))

    def remove_selected(self) -> None:
        row = self.table.currentRow()
        if row < 0 and self.table.rowCount():
            row = self.table.rowCount() - 1
        if row >= 0:
            self.table.removeRow(row)
            del self.sources[row]
            self._show_params(self.table.currentRow())
            self.edited.emit()

    # --- the parameter form of the selected source ---
    def _show_params(self, row: int) -> None:
        while self.params_form.rowCount():
            self.params_form.removeRow(0)
        self.param_editors = {}
        if not 0 <= row < len(self.sources):
            self.params_box.setTitle("Parameters")
            self.params_box.setVisible(False)
            return
        source = self.sources[row]
        spec = self.catalogue.get(source["type"], {"help": "", "params": {}})
        self.params_box.setTitle(f"Parameters of {source['type']}")
        self.params_box.setToolTip(spec.get("help", ""))
        self.params_box.setVisible(True)
        for name, value in source["params"].items():
            info = spec["params"].get(name, {"default": value, "help": "", "choices": None})
            editor = ValueEditor(name, info.get("default", value), info.get("choices"))
            editor.set_value(value)
            tip = (info.get("help") or name.replace("_", " "))
            tip = f"{tip[:1].upper()}{tip[1:]}  (default {json.dumps(info.get('default'))})"
            label = QLabel(name)
            label.setToolTip(tip)
            editor.setToolTip(tip)
            editor.widget.setToolTip(tip)
            editor.changed.connect(lambda r=row, n=name, e=editor: self._on_param_changed(r, n, e))
            self.params_form.addRow(label, editor)
            self.param_editors[name] = editor
        if not source["params"]:
            self.params_form.addRow(hint_label("This source has no parameters."))

    def _on_param_changed(self, row: int, name: str, editor: ValueEditor) -> None:
        if 0 <= row < len(self.sources):
            self.sources[row]["params"][name] = editor.value()
            self._update_summary(row)
            self.edited.emit()

    # --- value ---
    def value(self) -> list[dict]:
        """The sources as the PPO config stores them."""
        out = []
        for source in self.sources:
            entry = {"type": source["type"], "weight": source["weight"]}
            entry.update({"params": dict(source["params"])} if self.nested else source["params"])
            out.append(entry)
        return out

    def set_value(self, sources: list[dict]) -> None:
        self.table.setRowCount(0)
        self.sources = []
        for source in sources:
            self.add_row(source)
        self.table.setCurrentCell(0 if self.sources else -1, 2)
        self._show_params(self.table.currentRow())


# --- the panel --------------------------------------------------------------------------------

def model_size(project) -> int | None:
    """The project base model's parameter count; None when it cannot be read (the small defaults apply)."""
    if project is None:
        return None
    from studio.core.errors import StudioError
    from studio.core.models import model_parameters

    try:
        return model_parameters(project.db)
    except (StudioError, OSError, ValueError, KeyError, TypeError):
        return None  # a missing or unreadable model is reported where it is used, not here


class MethodPage(QWidget):
    """One method's tab: its form (and, for PPO, the reward sources)."""

    def __init__(self, method: str, module, shared_fields: list[str], catalogue: dict) -> None:
        super().__init__()
        self.method = method
        self.module = module
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        body = QWidget()
        body_layout = QVBoxLayout(body)
        body_layout.setContentsMargins(2, 4, 6, 4)
        self.rewards: RewardSourcesTable | None = None
        self.reward_preview: RewardPreview | None = None
        names = {f.name for f in dataclasses.fields(module.Config)}
        if "reward_sources" in names:
            box = QGroupBox("Reward sources")
            box.setToolTip("What PPO maximises: the weighted sum of these sources' scores")
            box_layout = QVBoxLayout(box)
            self.rewards = RewardSourcesTable(catalogue, module.Config().reward_sources)
            box_layout.addWidget(self.rewards)
            self.reward_preview = RewardPreview()
            box_layout.addWidget(self.reward_preview)
            self.rewards.edited.connect(self.preview_rewards)
            body_layout.addWidget(box)
        self.form = ConfigForm(module, shared_fields)
        body_layout.insertWidget(0 if self.rewards is None else 1, self.form)
        scroll.setWidget(body)
        layout.addWidget(scroll)

    def overrides(self) -> dict:
        values = self.form.values()
        if self.rewards is not None:
            values["reward_sources"] = self.rewards.value()
        return values

    def reset(self) -> None:
        self.form.reset()
        if self.rewards is not None:
            self.rewards.set_value(self.rewards.defaults)
            self.preview_rewards()

    def preview_rewards(self) -> None:
        if self.reward_preview is not None:
            self.reward_preview.set_sources(self.rewards.value())


class RunSetupPanel(QWidget):
    """Configure and queue a DPO or PPO run."""

    run_created = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = None
        self.parameters: int | None = None  # the project model's size; None (unknown): the small defaults
        self.pages: dict[str, MethodPage] = {}
        self.unavailable: dict[str, str] = {}
        self.ready = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(8)

        presets = QHBoxLayout()
        self.preset_buttons: dict[str, QPushButton] = {}
        for name, (method, _overrides, text) in PRESETS.items():
            button = QPushButton(icon("fa6s.wand-magic-sparkles" if method in SHAPING_METHODS else "fa6s.scale-balanced"), name)
            button.setToolTip(f"{text}\nResets the {method.upper()} form to this preset.")
            button.clicked.connect(lambda _c=False, n=name: self.apply_preset(n))
            presets.addWidget(button)
            self.preset_buttons[name] = button
        layout.addLayout(presets)

        top = QFormLayout()
        top.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.run_name = QLineEdit()
        self.run_name.setPlaceholderText("automatic (e.g. DPO #3)")
        top.addRow("Run name", self.run_name)
        self.start_from = QComboBox()
        self.start_from.setToolTip("The model state this run starts from, and its reference model: the base "
                                   "model, or a checkpoint of an earlier run (e.g. settle a shaped policy with DPO)")
        self.start_from.addItem(icon("fa6s.cube"), "Base model", None)
        top.addRow("Start from", self.start_from)
        layout.addLayout(top)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        loading = QWidget()
        loading_layout = QVBoxLayout(loading)
        loading_layout.addStretch(1)
        self.loading_label = hint_label("Loading the training engines (torch)…")
        self.loading_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        loading_layout.addWidget(self.loading_label)
        bar = QProgressBar()
        bar.setRange(0, 0)
        bar.setMaximumHeight(6)
        bar.setTextVisible(False)
        loading_layout.addWidget(bar)
        loading_layout.addStretch(2)
        self.tabs.addTab(loading, "Loading…")
        layout.addWidget(self.tabs, 1)

        self.hint = hint_label("", WARNING)
        self.hint.setVisible(False)
        layout.addWidget(self.hint)
        self.error = hint_label("", DANGER)
        self.error.setObjectName("inlineError")
        self.error.setVisible(False)
        layout.addWidget(self.error)
        self.tabs.currentChanged.connect(lambda _i: self.refresh_hint())

        buttons = QHBoxLayout()
        self.reset_button = QPushButton(icon("fa6s.rotate-left"), "Defaults")
        self.reset_button.setToolTip("Reset this form to the engine's defaults")
        self.reset_button.clicked.connect(self.reset)
        self.launch_button = QPushButton(icon("fa6s.play", "white"), "Queue run")
        self.launch_button.setProperty("primary", True)
        self.launch_button.setToolTip("Validate these settings and queue the run (runs start one after another)")
        self.launch_button.clicked.connect(self.ask_and_launch)
        buttons.addWidget(self.reset_button)
        buttons.addStretch(1)
        buttons.addWidget(self.launch_button)
        layout.addLayout(buttons)
        self._update_enabled()

    # --- engines arrive from the background import ---
    def set_engines(self, engines: dict, shared_fields: list[str], catalogue: dict) -> None:
        """Build a tab per method from its engine module (or show why it is unavailable)."""
        self.tabs.clear()
        self.pages.clear()
        self.unavailable.clear()
        for method, title in METHODS:
            module = engines.get(method)
            if module is None or isinstance(module, str):
                self.unavailable[method] = module or f"No {title} engine"
                page = QWidget()
                page_layout = QVBoxLayout(page)
                page_layout.addWidget(hint_label(self.unavailable[method], WARNING))
                page_layout.addStretch(1)
                self.tabs.addTab(page, title)
                continue
            try:
                page = MethodPage(method, module, shared_fields, catalogue)
            except Exception as exc:  # an engine's Config the form cannot read must not break the window
                self.unavailable[method] = f"Cannot build the {title} form: {exc}"
                page = hint_label(self.unavailable[method], WARNING)
            else:
                self.pages[method] = page
                if page.rewards is not None:
                    page.rewards.edited.connect(lambda rewards=page.rewards: self._keep_reward_sources(rewards))
            self.tabs.addTab(page, title)
        self.ready = True
        self._apply_size_defaults()
        self._show_project_reward_sources()
        self._update_enabled()
        self.refresh_hint()

    def set_loading_error(self, message: str) -> None:
        self.loading_label.setText(f"The training engines could not be loaded:\n{message}")
        self.loading_label.setStyleSheet(f"color: {DANGER};")

    # --- project ---
    def set_project(self, project) -> None:
        self.project = project
        self.parameters = model_size(project)
        self.clear_error()
        self.refresh()
        self._apply_size_defaults()
        self._show_project_reward_sources()
        self._update_enabled()

    def _apply_size_defaults(self) -> None:
        """Each form's defaults for the project model's size (defaults.py), as the CLI applies them."""
        from studio.core import defaults

        for method, page in self.pages.items():
            page.form.set_defaults(defaults.defaults_for(method, self.parameters))

    def _show_project_reward_sources(self) -> None:
        """The project's `reward_sources` setting, if it has one, in each shaping method's reward sources editor."""
        from studio.core import store

        sources = store.get_setting(self.project.db, "reward_sources") if self.project is not None else None
        for method in SHAPING_METHODS:
            page = self.pages.get(method)
            if page is None or page.rewards is None:
                continue
            page.reward_preview.set_project(self.project)
            if self.project is None:
                continue
            if sources:
                page.rewards.set_value(sources)
            page.preview_rewards()

    def refresh(self) -> None:
        """Reload what depends on the project: checkpoints to start from, the data hint."""
        self.refresh_checkpoints()
        self.refresh_hint()

    def refresh_checkpoints(self) -> None:
        current = self.start_from.currentData()
        self.start_from.blockSignals(True)
        self.start_from.clear()
        self.start_from.addItem(icon("fa6s.cube"), "Base model", None)
        if self.project is not None:
            from studio.core import labelling, store

            db = self.project.db
            best = {int(k): v.get("checkpoint_id") for k, v in (store.get_setting(db, "best_checkpoints", {}) or {}).items()}
            for checkpoint in reversed(store.checkpoints(db)):
                run_id = checkpoint["run_id"]
                star = best.get(run_id) == checkpoint["id"]
                self.start_from.addItem(icon("fa6s.star" if star else "fa6s.box-archive", "#d4a106" if star else None),
                                        labelling.describe_state(db, checkpoint["id"])  # as the advisor names it
                                        + ("  (best)" if star else ""), checkpoint["id"])
        index = self.start_from.findData(current)
        self.start_from.setCurrentIndex(max(0, index))
        self.start_from.blockSignals(False)

    def set_start_checkpoint(self, checkpoint_id: int | None) -> None:
        self.refresh_checkpoints()
        self.start_from.setCurrentIndex(max(0, self.start_from.findData(checkpoint_id)))

    def refresh_hint(self) -> None:
        """An empty-state hint when the chosen method has no data to train on."""
        text = "Create or open a project to configure a run." if self.project is None else ""
        method = self.current_method()
        if self.project is not None and method:
            from studio.core import store

            db = self.project.db
            if method == "dpo" and not store.count_rows(db, "pairs"):
                text = "Import preference pairs to start a DPO run (Data panel, or drop a file on the window)."
            elif method in SHAPING_METHODS and not store.count_rows(db, "prompts", "is_eval = 0"):
                text = (f"Import training prompts to start a {method.upper()} run "
                        "(Data panel, or drop a file on the window).")
        self.hint.setText(text)
        self.hint.setVisible(bool(text))
        self._update_name_placeholder(method)

    def _update_name_placeholder(self, method: str | None) -> None:
        """The name a run of this tab's method gets when the field is left empty."""
        next_id = 1
        if self.project is not None:
            from studio.core import store

            next_id += max((run["id"] for run in store.list_runs(self.project.db)), default=0)
        self.run_name.setPlaceholderText(f"automatic ({method.upper()} #{next_id})" if method else "automatic")

    # --- the form ---
    def current_method(self) -> str | None:
        page = self.tabs.currentWidget()
        if isinstance(page, MethodPage):
            return page.method
        index = self.tabs.currentIndex()
        titles = dict((t, m) for m, t in METHODS)
        return titles.get(self.tabs.tabText(index)) if self.ready else None

    def select_method(self, method: str) -> None:
        for index in range(self.tabs.count()):
            if self.tabs.tabText(index) == dict(METHODS).get(method):
                self.tabs.setCurrentIndex(index)

    def apply_preset(self, name: str) -> None:
        method, overrides, _text = PRESETS[name]
        self.select_method(method)
        page = self.pages.get(method)
        if page is None:
            return
        page.reset()
        page.form.set_values({k: v for k, v in overrides.items() if k in page.form.editors})

    def reset(self) -> None:
        page = self.pages.get(self.current_method() or "")
        if page is not None:
            page.reset()
        self.clear_error()

    def page(self, method: str) -> MethodPage:
        return self.pages[method]

    def _update_enabled(self) -> None:
        enabled = self.ready and self.project is not None and not getattr(self.project, "read_only", False)
        self.launch_button.setEnabled(enabled)
        for button in self.preset_buttons.values():
            button.setEnabled(self.ready)
        self.reset_button.setEnabled(self.ready)

    def show_error(self, text: str) -> None:
        self.error.setText(text)
        self.error.setVisible(True)

    def clear_error(self) -> None:
        self.error.clear()
        self.error.setVisible(False)

    # --- launch ---
    def _keep_reward_sources(self, rewards: "RewardSourcesTable") -> None:
        """The user's reward sources become the project's `reward_sources` setting (the advisor scores with it)."""
        if self.project is not None:
            from studio.core import store

            store.set_setting(self.project.db, "reward_sources", rewards.value())

    def ask_and_launch(self) -> None:
        """Queue run, clicked: show the settings the run will use (ask once), then launch."""
        method = self.current_method()
        if self.project is None or method not in self.pages:
            self.launch()  # shows why it cannot
            return
        from studio.core import runs

        values = self.pages[method].overrides()
        defaults = runs.make_config(method, parameters=self.parameters).to_json()
        shown = {"start from": self.start_from.currentText()}
        shown.update({name: values[name] for name in values
                      if name in SUMMARY_SETTINGS or values[name] != defaults.get(name)})
        if "reward_sources" in shown:
            shown["reward_sources"] = ", ".join(source["type"] for source in values["reward_sources"])
        ask_once(self, "queue_run", f"Queue a {method.upper()} run?",
                 f"The {method.upper()} run will train with these settings (the rest are the defaults):",
                 shown, self.launch)

    def launch(self) -> int | None:
        """Validate and record a queued run; emits run_created(id). Problems are shown inline."""
        self.clear_error()
        method = self.current_method()
        if self.project is None or method is None:
            return None
        if method not in self.pages:
            self.show_error(self.unavailable.get(method, f"No {method.upper()} engine"))
            return None
        from studio.core import runs
        from studio.core.errors import StudioError

        try:
            overrides = self.pages[method].overrides()
            overrides["parent_checkpoint_id"] = self.start_from.currentData()
            config = runs.make_config(method, overrides)
            run_id = runs.create_run(self.project.db, config, self.run_name.text().strip() or None)
        except (StudioError, ValueError, TypeError) as exc:
            self.show_error(str(exc))
            self.pages[method].form.mark_invalid(getattr(exc, "fields", {}))
            return None
        self.pages[method].form.mark_invalid({})
        self.run_name.clear()
        self._update_name_placeholder(method)
        self.run_created.emit(run_id)
        return run_id
