"""The model picker: the demo model, a local Hugging Face folder, or a GGUF file.

Choosing a source inspects it in the background (architecture, parameters, chat template, and the
device and dtype training will use): a GGUF file is converted on first use, which takes ~20 s, and
importing transformers/torch takes seconds, so nothing here blocks the window.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton,
    QToolButton, QVBoxLayout, QWidget,
)

from . import DANGER, MUTED, OK, WARNING, hint_label, icon
from ..workers import describe_error, run_in_background

KINDS = (("demo", "Demo model (SmolLM2-135M-Instruct)"), ("folder", "Local model folder"), ("gguf", "GGUF file"))


def format_parameters(count: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.1f}{suffix} parameters"
    return f"{count} parameters"


def inspect_source(source_json: dict) -> dict:
    """Background job: what the picker shows about a source (imports torch; may convert a GGUF)."""
    from studio.core.models import ModelSource, inspect_model, pick_device

    try:
        info = inspect_model(ModelSource.from_json(source_json))
        device, dtype = pick_device("auto")
    except Exception as exc:  # returned, not raised: the picker must know which source failed
        return {"source": source_json, "error": describe_error(exc)}
    return {"source": source_json, "architecture": info.architecture, "parameters": info.parameters,
            "has_chat_template": info.has_chat_template, "folder": str(info.folder),
            "device": device, "dtype": dtype}


class ModelPicker(QWidget):
    """Pick a base model source and see what it is; emits ``source_chosen`` when applied."""

    source_chosen = Signal(dict)  # ModelSource JSON
    inspected = Signal(dict)  # the facts shown (see inspect_source)

    def __init__(self, parent: QWidget | None = None, apply_text: str | None = "Use this model") -> None:
        super().__init__(parent)
        self._applied: dict | None = None
        self.info: dict | None = None
        self.error: str | None = None

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.kind = QComboBox()
        for kind, text in KINDS:
            self.kind.addItem(text, kind)
        self.kind.setToolTip("Where the base model comes from. Nothing is ever downloaded.")
        self.kind.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.kind.setMinimumContentsLength(12)
        layout.addWidget(self.kind)

        path_row = QHBoxLayout()
        self.path = QLineEdit()
        self.path.setPlaceholderText("Path to a model folder or a .gguf file")
        self.browse = QToolButton()
        self.browse.setIcon(icon("fa6s.folder-open"))
        self.browse.setToolTip("Browse…")
        path_row.addWidget(self.path, 1)
        path_row.addWidget(self.browse)
        self.path_row = QWidget()
        self.path_row.setLayout(path_row)
        path_row.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.path_row)

        self.progress = QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(5)
        self.progress.setVisible(False)
        layout.addWidget(self.progress)

        facts = QFormLayout()
        facts.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
        facts.setContentsMargins(0, 2, 0, 2)
        self.architecture = QLabel("—")
        self.size = QLabel("—")
        self.template = QLabel("—")
        self.device = QLabel("—")
        for label in (self.architecture, self.size, self.template, self.device):
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
        facts.addRow("Architecture", self.architecture)
        facts.addRow("Size", self.size)
        facts.addRow("Chat template", self.template)
        facts.addRow("Training on", self.device)
        layout.addLayout(facts)
        self.status = hint_label("")
        self.status.setVisible(False)
        layout.addWidget(self.status)

        self.apply_button: QPushButton | None = None
        if apply_text:
            self.apply_button = QPushButton(icon("fa6s.circle-check"), apply_text)
            self.apply_button.setEnabled(False)
            self.apply_button.clicked.connect(self.apply)
            row = QHBoxLayout()
            row.addStretch(1)
            row.addWidget(self.apply_button)
            layout.addLayout(row)

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(400)
        self._debounce.timeout.connect(self.inspect)
        self.kind.currentIndexChanged.connect(self._on_kind_changed)
        self.path.textEdited.connect(lambda _text: self._debounce.start())
        self.browse.clicked.connect(self._browse)
        self._on_kind_changed(inspect=False)

    # --- the source ---
    def source(self) -> dict:
        kind = self.kind.currentData()
        path = self.path.text().strip() or None
        return {"kind": kind, "path": None if kind == "demo" else path, "allow_pickle": False}

    def set_source(self, source: dict | None, inspect: bool = True) -> None:
        source = {"kind": "demo", "path": None, "allow_pickle": False, **(source or {})}
        self._applied = dict(source)
        self.kind.blockSignals(True)
        self.kind.setCurrentIndex(max(0, self.kind.findData(source["kind"])))
        self.kind.blockSignals(False)
        self.path.setText(source.get("path") or "")
        self._on_kind_changed(inspect=inspect)

    def apply(self) -> None:
        source = self.source()
        self._applied = dict(source)
        self._update_apply()
        self.source_chosen.emit(source)

    def _update_apply(self) -> None:
        if self.apply_button is not None:
            changed = self._applied is None or self.source() != self._applied
            self.apply_button.setVisible(changed)  # shown only when there is something to apply
            self.apply_button.setEnabled(changed and self.info is not None and self.error is None)

    def _on_kind_changed(self, _index: int = 0, inspect: bool = True) -> None:
        self.path_row.setVisible(self.kind.currentData() != "demo")
        if inspect:
            self.inspect()

    def _browse(self) -> None:
        if self.kind.currentData() == "gguf":
            path, _ = QFileDialog.getOpenFileName(self, "Choose a GGUF file", self.path.text(), "GGUF (*.gguf)")
        else:
            path = QFileDialog.getExistingDirectory(self, "Choose a model folder", self.path.text())
        if path:
            self.path.setText(path)
            self.inspect()

    # --- inspection ---
    @property
    def busy(self) -> bool:
        return self.progress.isVisibleTo(self)

    def inspect(self) -> None:
        source = self.source()
        self.info, self.error = None, None
        self._update_apply()
        for label in (self.architecture, self.size, self.template):
            label.setText("—")
            label.setStyleSheet("")
        if source["kind"] != "demo" and not source["path"]:
            self._set_status("Choose a path.", MUTED)
            return
        slow = "converting a GGUF file takes about 20 s the first time" if source["kind"] != "folder" else ""
        self._set_status(f"Inspecting… {slow}".strip(), MUTED)
        self.progress.setVisible(True)
        self._job = run_in_background(inspect_source, source, on_result=self._on_inspected,
                                      on_error=self._on_error)

    def _on_inspected(self, info: dict) -> None:
        if info["source"] != self.source():
            return  # the user picked something else meanwhile
        self.progress.setVisible(False)
        if "error" in info:
            self.info, self.error = None, info["error"]
            self._set_status(self.error, DANGER)
            self._update_apply()
            return
        self.info, self.error = info, None
        self.architecture.setText(info["architecture"])
        self.size.setText(format_parameters(info["parameters"]))
        if info["has_chat_template"]:
            self.template.setText("present")
            self.template.setStyleSheet(f"color: {OK};")
        else:
            self.template.setText("missing: conversational prompts cannot be formatted")
            self.template.setStyleSheet(f"color: {WARNING};")
        self.set_device(info["device"], info["dtype"])
        self._set_status("", MUTED)
        self._update_apply()
        self.inspected.emit(info)

    def _on_error(self, exc: BaseException) -> None:
        self.progress.setVisible(False)
        self.info, self.error = None, describe_error(exc)
        self._set_status(self.error, DANGER)
        self._update_apply()

    def set_device(self, device: str, dtype: str) -> None:
        self.device.setText(f"{device} · {dtype}")
        self.device.setToolTip({"cpu": "No GPU found: training runs on the CPU, fine for the demo model and "
                                       "slow for larger ones"}.get(device, f"Training uses {device} with {dtype}"))

    def _set_status(self, text: str, color: str) -> None:
        self.status.setText(text)
        self.status.setStyleSheet(f"color: {color};")
        self.status.setVisible(bool(text))
