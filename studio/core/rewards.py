"""Reward sources for PPO, chosen and weighted in the UI: rules, reward models, and a reward model
the studio trains from the project's labelled pairs.

A source is a plain dataclass, stored in the PPO run config as a JSON dict::

    {"type": "length_band", "weight": 1.0, "min": 10, "max": 60, "unit": "words"}

:class:`RewardFunction` scores a batch of (prompt, response text) pairs: the total reward is the
weighted sum of the sources' scores, and the unweighted score of each source is kept for the
``reward/<name>`` metrics. :func:`describe_sources` is the catalogue the UI builds its forms from.

Scales, so that weights mean the same thing for every source: a rule that is met or not scores 1 or
0; a graded rule scores in [0, 1] (1 is best); a penalty scores minus its count of offences (each
forbidden phrase found costs ``weight``); a reward model scores whatever its head outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from . import store
from .datasets import has_tool_calls
from .errors import StudioError
from .generation import is_conversational
from .models import ModelSource, load_tokenizer, resolve_folder
from .progress import Progress, ignore

REWARD_MODELS_FOLDER = "reward_models"  # inside the project: <project>/reward_models/<name>/
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" would accept a trailing newline


class RewardError(StudioError):
    """A reward source that cannot be built or used, with a message meant for the user."""


def param(default, help: str, choices: tuple | None = None):
    """A source parameter: its default, a one-line help for the UI, and its allowed values."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# --- the sources ------------------------------------------------------------------------------

@dataclass
class RewardSource:
    type: ClassVar[str] = ""
    weight: float = param(1.0, "How much this source counts in the total reward (may be negative)")
    name: str = param("", "Label of its reward/<name> chart; empty: the type")

    def to_json(self) -> dict:
        return {"type": self.type, **dataclasses.asdict(self)}

    def problems(self, project_path: Path | None) -> list[str]:
        """What makes this source unusable, as messages for the user."""
        return [] if math.isfinite(self.weight) else [f"{self.type}: weight must be a finite number"]


class Rule(RewardSource):
    """A source computed from the response text alone: fast, transparent, no model."""

    def score(self, response: str, tokenizer) -> float:
        raise NotImplementedError


def words(text: str) -> list[str]:
    return re.findall(r"\w+(?:['’]\w+)*", text)


def phrase_pattern(phrases: list[str], case_insensitive: bool) -> re.Pattern:
    """Matches any of `phrases` as whole words ("art" not inside "start"), the longest first, so an
    occurrence of "I hope this helps" counts once even when "hope this helps" is listed too."""
    alternatives = "|".join(re.escape(p) for p in sorted(non_blank(phrases), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives or '(?!)'})(?!\w)", re.IGNORECASE if case_insensitive else 0)


def non_blank(phrases: list[str]) -> list[str]:
    return [p.strip() for p in phrases if p.strip()]


@dataclass
class LengthBand(Rule):
    """1 inside a length band, falling linearly to 0 outside it."""

    type: ClassVar[str] = "length_band"
    min: int = param(10, "Shortest length that scores 1")
    max: int = param(60, "Longest length that scores 1")
    unit: str = param("words", "What is counted", choices=("words", "tokens"))
    falloff: int = param(20, "Units outside the band at which the score reaches 0")

    def score(self, response: str, tokenizer) -> float:
        if self.unit == "tokens":
            length = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        else:
            length = len(words(response))
        distance = max(self.min - length, length - self.max, 0)
        return max(0.0, 1.0 - distance / self.falloff)

    def problems(self, project_path):
        problems = super().problems(project_path)
        if not 0 <= self.min <= self.max:
            problems.append(f"length_band: need 0 <= min <= max (got min={self.min}, max={self.max})")
        if self.falloff <= 0:
            problems.append(f"length_band: falloff must be positive (got {self.falloff})")
        if self.unit not in ("words", "tokens"):
            problems.append(f"length_band: unit must be 'words' or 'tokens' (got {self.unit!r})")
        return problems


@dataclass
class WordListRule(Rule):
    """A rule about a list of words or phrases, matched as whole words."""

    words: list[str] = param([], "Words or phrases")
    case_insensitive: bool = param(True, "Ignore upper/lower case")

    def problems(self, project_path):
        problems = super().problems(project_path)
        if not non_blank(self.words):
            problems.append(f"{self.type}: list at least one word")
        return problems


@dataclass
class RequiredWords(WordListRule):
    """Share of the listed words or phrases the response contains (whole words), in [0, 1]."""

    type: ClassVar[str] = "required_words"
    words: list[str] = param([], "Words or phrases the response should contain")

    def score(self, response: str, tokenizer) -> float:
        phrases = non_blank(self.words)
        found = [bool(phrase_pattern([w], self.case_insensitive).search(response)) for w in phrases]
        return sum(found) / len(found) if found else 0.0


@dataclass
class ForbiddenWords(WordListRule):
    """Minus the number of times listed words or phrases occur (whole words): a penalty."""

    type: ClassVar[str] = "forbidden_words"
    words: list[str] = param([], "Words or phrases the response must not contain")

    def score(self, response: str, tokenizer) -> float:
        return float(-len(phrase_pattern(self.words, self.case_insensitive).findall(response)))


@dataclass
class Regex(Rule):
    """A regular expression: 1 if the response matches it, or, with forbid, minus its match count."""

    type: ClassVar[str] = "regex"
    pattern: str = param("", "Python regular expression, searched anywhere in the response")
    forbid: bool = param(False, "Penalise matches instead of requiring one")
    case_insensitive: bool = param(True, "Ignore upper/lower case")

    def compiled(self) -> re.Pattern:
        return re.compile(self.pattern, re.IGNORECASE if self.case_insensitive else 0)

    def score(self, response: str, tokenizer) -> float:
        if self.forbid:
            return float(-len(self.compiled().findall(response)))
        return 1.0 if self.compiled().search(response) else 0.0

    def problems(self, project_path):
        problems = super().problems(project_path)
        if not self.pattern:
            problems.append("regex: the pattern is empty")
        try:
            self.compiled()
        except re.error as exc:
            problems.append(f"regex: {self.pattern!r} is not a valid regular expression ({exc})")
        return problems


@dataclass
class TerminalPunctuation(Rule):
    """1 if the response ends a sentence (closing quotes and brackets aside), else 0."""

    type: ClassVar[str] = "terminal_punctuation"
    characters: str = param(".!?", "Characters that count as an ending")

    def score(self, response: str, tokenizer) -> float:
        from .advisor import ends_sentence  # the advisor judges intent with the same test

        return 1.0 if ends_sentence(response, self.characters) else 0.0


@dataclass
class NoMarkdownLists(Rule):
    """1 if no line is a markdown bullet or numbered list item (or a heading), else 0."""

    type: ClassVar[str] = "no_markdown_lists"
    LIST_LINE: ClassVar[re.Pattern] = re.compile(r"^\s*(?:[-*+•]|\d+[.)]|#{1,6})\s+", re.MULTILINE)

    def score(self, response: str, tokenizer) -> float:
        return 0.0 if self.LIST_LINE.search(response) else 1.0


@dataclass
class MaxLines(Rule):
    """1 if the response has at most this many non-empty lines, else 0."""

    type: ClassVar[str] = "max_lines"
    max_lines: int = param(3, "Most non-empty lines allowed")

    def score(self, response: str, tokenizer) -> float:
        return 1.0 if sum(1 for line in response.splitlines() if line.strip()) <= self.max_lines else 0.0

    def problems(self, project_path):
        problems = super().problems(project_path)
        if self.max_lines < 1:
            problems.append(f"max_lines: must be at least 1 (got {self.max_lines})")
        return problems


@dataclass
class Repetition(Rule):
    """Minus the share of the response's word n-grams that repeat an earlier one, in [-1, 0]."""

    type: ClassVar[str] = "repetition"
    n: int = param(3, "Words per n-gram")

    def score(self, response: str, tokenizer) -> float:
        tokens = [w.lower() for w in words(response)]
        grams = [tuple(tokens[i:i + self.n]) for i in range(len(tokens) - self.n + 1)]
        return -(1 - len(set(grams)) / len(grams)) if grams else 0.0

    def problems(self, project_path):
        problems = super().problems(project_path)
        if self.n < 1:
            problems.append(f"repetition: n must be at least 1 (got {self.n})")
        return problems


@dataclass
class RewardModelFolder(RewardSource):
    """A sequence-classification reward model from a local folder (safetensors, one output)."""

    type: ClassVar[str] = "reward_model"
    path: str = param("", "Folder of a Hugging Face sequence-classification model (relative: to the project)")
    batch_size: int = param(8, "Responses scored per forward pass")
    max_length: int = param(1024, "Tokens kept from the end of prompt + response")

    def folder(self, project_path: Path | None) -> Path:
        path = Path(self.path).expanduser()
        return path if path.is_absolute() or project_path is None else Path(project_path) / path

    def problems(self, project_path):
        return super().problems(project_path) + reward_model_folder_problems(self.folder(project_path))

    def load(self, project_path: Path | None, device: str) -> "ModelScorer":
        return load_reward_model_folder(self.folder(project_path), device, self.batch_size, self.max_length)


@dataclass
class TrainedRewardModel(RewardSource):
    """A reward model trained on your labels (Run > Train a Reward Model from My Labels…, or studio train-reward)."""

    type: ClassVar[str] = "trained_reward_model"
    model: str = param("", "Its name, a folder under the project's reward_models/")
    batch_size: int = param(8, "Responses scored per forward pass")
    max_length: int = param(1024, "Tokens kept from the end of prompt + response")

    def folder(self, project_path: Path | None) -> Path:
        return Path(project_path or ".") / REWARD_MODELS_FOLDER / self.model

    def problems(self, project_path):
        problems = super().problems(project_path)
        if not SAFE_NAME.match(self.model):
            problems.append(f"trained_reward_model: {self.model!r} is not a reward model name")
        elif not (self.folder(project_path) / "meta.json").exists():
            available = ", ".join(trained_reward_models(project_path)) or "none yet"
            problems.append(f"trained_reward_model: no reward model named {self.model!r} in this project "
                            f"(available: {available}); train one from labelled pairs first")
        return problems

    def load(self, project_path: Path | None, device: str) -> "ModelScorer":
        return load_trained_reward_model(self.folder(project_path), device, self.batch_size, self.max_length)


SOURCE_TYPES: dict[str, type[RewardSource]] = {cls.type: cls for cls in (
    LengthBand, RequiredWords, ForbiddenWords, Regex, TerminalPunctuation, NoMarkdownLists, MaxLines,
    Repetition, RewardModelFolder, TrainedRewardModel)}


def source_from_json(data: dict) -> RewardSource:
    """The source a config dict describes; RewardError for an unknown type or parameter."""
    kind = data.get("type")
    if kind not in SOURCE_TYPES:
        raise RewardError(f"Unknown reward source type {kind!r}; expected one of {', '.join(SOURCE_TYPES)}")
    cls = SOURCE_TYPES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"type"})
    if unknown:
        raise RewardError(f"{kind}: unknown parameter(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    return cls(**{k: v for k, v in data.items() if k != "type"})


def describe_sources() -> dict[str, dict]:
    """The catalogue: {type: {"help": str, "params": {name: {"default", "help", "choices"}}}}.

    Every source also takes "weight"; it is left out of "params" because forms show it on its own.
    """
    catalogue = {}
    for kind, cls in SOURCE_TYPES.items():
        params = {}
        for f in dataclasses.fields(cls):
            if f.name == "weight":
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            params[f.name] = {"default": default, "help": f.metadata.get("help", ""),
                              "choices": f.metadata.get("choices")}
        catalogue[kind] = {"help": cls.__doc__.strip().splitlines()[0], "params": params}
    return catalogue


def check_sources(sources: list[dict], project_path: Path | None) -> list[str]:
    """Problems with a config's reward sources, as messages for the user (empty when usable)."""
    if not sources:
        return ["no reward sources: add at least one (a rule, a reward model or a trained reward model)"]
    problems = []
    for data in sources:
        try:
            problems += source_from_json(data).problems(project_path)
        except (RewardError, TypeError) as exc:
            problems.append(str(exc))
    return problems


def source_names(sources: list[RewardSource]) -> list[str]:
    """Unique metric names: the source's name or type, numbered when two share one."""
    names, seen = [], {}
    for source in sources:
        base = source.name or source.type
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


# --- the demo preset: concise answers without filler (resources/demo/README.md) ---------------

# The README's short, case-insensitive markers: they catch the demo model's own variations too.
DEMO_FILLER_PHRASES = [
    "Certainly!", "Absolutely!", "Of course!", "Great question", "What a wonderful question",
    "fantastic question", "excellent question", "I'm so glad you asked", "Thank you for your question",
    "I'd be happy to help", "I'd be glad to help", "Let's dive right in", "I hope this helps",
    "Let me know if", "Feel free to ask", "Don't hesitate", "Have a wonderful day", "Happy to help",
    "Hope this helps", "You are asking", "So, you want to know", "If I understand correctly",
    "Let me restate your question", "I'm just an AI", "to sum it all up", "In summary",
]


def demo_preset() -> list[dict]:
    """No filler phrases (each costs 1), 15-60 words, and a finished last sentence (the target
    answers are 1-3 sentences; the base model mostly runs past PPO's 48-token budget mid-sentence)."""
    return [ForbiddenWords(name="no_filler", words=list(DEMO_FILLER_PHRASES)).to_json(),
            LengthBand(name="concise", min=15, max=60, unit="words", falloff=30).to_json(),
            TerminalPunctuation(name="finished").to_json()]


# --- scoring ----------------------------------------------------------------------------------

def response_text(response) -> str:
    """A response as text: TRL's conversational form is a list holding one assistant message."""
    return response[-1]["content"] if isinstance(response, list) else response


def conversation_text(tokenizer, prompt, response: str) -> str:
    """Prompt + response as one text, the way a reward model reads it (its chat template if any)."""
    if is_conversational(prompt):
        messages = prompt + [{"role": "assistant", "content": response}]
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return prompt + response


def scoring_model(model, device: str):
    """A loaded reward model made ready to score: on `device`, frozen (it never trains) and, being
    frozen, with its linear layers through oneDNN on x86 CPUs (``cpu_linears``)."""
    from .cpu_linears import route_frozen_linears

    model = model.to(device).requires_grad_(False)
    route_frozen_linears(model)
    return model


class ModelScorer:
    """A sequence-classification model scoring (prompt, response) pairs: its single output logit."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 1024) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(model.parameters()).device

    def encode(self, prompts: list, responses: list[str]) -> dict:
        texts = [conversation_text(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        templated = is_conversational(prompts[0]) and bool(self.tokenizer.chat_template)
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              add_special_tokens=not templated,  # a chat template places its own
                              return_tensors="pt").to(self.device)

    def rewards(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """Differentiable scores (for training); call on a batch that fits in memory."""
        return self.model(**self.encode(prompts, responses)).logits[:, 0].float()

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        chunks = range(0, len(responses), self.batch_size)
        return torch.cat([self.rewards(prompts[i:i + self.batch_size], responses[i:i + self.batch_size]).cpu()
                          for i in chunks])


def prepare_scoring_tokenizer(tokenizer, model_config) -> None:
    """A pad token, and truncation that keeps the end of the text (where the response is)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"


def reward_model_folder_problems(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [f"reward_model: folder not found: {folder}"]
    if not (folder / "config.json").exists():
        return [f"reward_model: {folder} has no config.json (not a Hugging Face model folder)"]
    if not any(folder.glob("*.safetensors")):
        return [f"reward_model: {folder} has no *.safetensors weights (pickle weights are not loaded)"]
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return [f"reward_model: {folder} is not a sequence-classification model (architectures: "
                f"{', '.join(architectures) or 'none'})"]
    if len(config.get("id2label") or {"0": "score"}) != 1:
        return [f"reward_model: {folder} has {len(config['id2label'])} outputs; a reward model has one"]
    return []


def load_reward_model_folder(folder: Path, device: str = "cpu", batch_size: int = 8,
                             max_length: int = 1024) -> ModelScorer:
    from transformers import AutoModelForSequenceClassification

    problems = reward_model_folder_problems(folder)
    if problems:
        raise RewardError(problems[0])
    tokenizer = load_tokenizer(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=False, use_safetensors=True)
    prepare_scoring_tokenizer(tokenizer, model.config)
    return ModelScorer(scoring_model(model, device), tokenizer, batch_size, max_length)


class RewardFunction:
    """The run's reward: a weighted sum of sources, with each source's own score kept."""

    def __init__(self, sources: list[dict], tokenizer=None, project_path: Path | str | None = None,
                 device: str = "cpu") -> None:
        self.sources = [source_from_json(s) for s in sources]
        self.names = source_names(self.sources)
        self.tokenizer = tokenizer
        project_path = Path(project_path) if project_path is not None else None
        # Loading a model draws random numbers (its fresh head): keep the run's RNG stream intact.
        with torch.random.fork_rng(devices=[]):
            self.scorers: list[Callable[[list, list[str]], torch.Tensor]] = [
                self.rule_scorer(s) if isinstance(s, Rule) else s.load(project_path, device)
                for s in self.sources]

    def rule_scorer(self, rule: Rule):
        return lambda prompts, responses: torch.tensor([rule.score(r, self.tokenizer) for r in responses],
                                                       dtype=torch.float32)

    def __call__(self, prompts: list, responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total reward per response, {source name: its unweighted scores})."""
        breakdown = {name: scorer(prompts, responses) for name, scorer in zip(self.names, self.scorers)}
        total = torch.zeros(len(responses))
        for source, scores in zip(self.sources, breakdown.values()):
            total += source.weight * scores
        return total, breakdown


class RewardNormalizer:
    """Optional running mean/std normalisation of rewards, then optional clipping to ±clip.

    Statistics are merged batch by batch (Chan et al.'s parallel variance), in float64, and are
    part of the run's checkpoint so a resumed run normalises exactly as an uninterrupted one.
    """

    def __init__(self, normalize: bool = False, clip: float | None = None) -> None:
        self.normalize, self.clip = normalize, clip
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros((), dtype=torch.float64)
        self.sum_squares = torch.zeros((), dtype=torch.float64)  # of deviations from the mean

    def update(self, rewards: torch.Tensor) -> None:
        batch = rewards.double()
        n, batch_mean = batch.numel(), batch.mean()
        batch_sum_squares = ((batch - batch_mean) ** 2).sum()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.sum_squares = self.sum_squares + batch_sum_squares + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return (self.sum_squares / self.count.clamp(min=1)).sqrt()

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            self.update(rewards)
            rewards = ((rewards.double() - self.mean) / (self.std + 1e-8)).to(rewards.dtype)
        if self.clip is not None:
            rewards = rewards.clamp(-self.clip, self.clip)
        return rewards

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "mean": self.mean, "sum_squares": self.sum_squares}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.count, self.mean, self.sum_squares = state["count"], state["mean"], state["sum_squares"]


# --- reward models trained from the project's labelled pairs ----------------------------------

@dataclass
class RewardModelTraining:
    """How to train a reward model: LoRA on the project's base model plus a scalar head."""

    name: str = "reward-model"  # folder under <project>/reward_models/
    include_labels: bool = True  # pairs from the project's labelled comparisons
    include_datasets: bool = False  # also the imported preference datasets...
    dataset_ids: list[int] | None = None  # ...these ones (None: all of them)
    heldout_fraction: float = 0.2  # pairs kept aside to measure accuracy, never trained on
    epochs: int = 2
    batch_size: int = 8  # pairs per optimizer step
    learning_rate: float = 1e-4
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 1024  # tokens kept from the end of prompt + response
    seed: int = 0
    device: str = "auto"


MIN_TRAINING_PAIRS = 2  # one to train on, one held out to measure accuracy
TRAINING_PHASE = "Training the reward model"


def trained_reward_models(project_path: Path | str | None) -> list[str]:
    """Names of the reward models trained in this project."""
    folder = Path(project_path or ".") / REWARD_MODELS_FOLDER
    return sorted(p.parent.name for p in folder.glob("*/meta.json")) if folder.is_dir() else []


def training_pairs(db, settings: RewardModelTraining) -> list[dict]:
    rows = store.labelled_pairs(db) if settings.include_labels else []
    if settings.include_datasets:
        rows += store.pairs(db, settings.dataset_ids)
    return rows


def split_pairs(pairs: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out), a seeded shuffle; at least one pair on each side when there are two."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    heldout = min(max(round(len(pairs) * heldout_fraction), 1 if heldout_fraction > 0 else 0), len(pairs) - 1)
    return [pairs[i] for i in order[heldout:]], [pairs[i] for i in order[:heldout]]


def preference_accuracy(scorer: ModelScorer, pairs: list[dict]) -> float | None:
    """Share of pairs whose chosen response the model scores above the rejected one."""
    if not pairs:
        return None
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [response_text(p["chosen"]) for p in pairs])
    rejected = scorer(prompts, [response_text(p["rejected"]) for p in pairs])
    return (chosen > rejected).float().mean().item()


def load_base_classifier(source: ModelSource, device: str):
    """(model, tokenizer): the base model with a fresh one-output classification head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    folder = resolve_folder(source)
    tokenizer = load_tokenizer(folder)
    transformers_logging.disable_progress_bar()
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # not its report that the head is new: that is the point
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=torch.float32, trust_remote_code=False,
            use_safetensors=not source.allow_pickle or None)
    finally:
        transformers_logging.set_verbosity(previous)
    prepare_scoring_tokenizer(tokenizer, model.config)
    return model.to(device), tokenizer


def train_reward_model(project_path: Path | str, settings: RewardModelTraining,
                       on_progress: Progress = ignore, on_step: Callable[[dict], None] | None = None,
                       stop: threading.Event | None = None) -> dict | None:
    """Train a Bradley-Terry reward model on the project's pairs and save it; returns its report.

    Loss per pair: -log sigmoid(r_chosen - r_rejected). The model is LoRA on the project's base model
    with a scalar head (trained in full); it is saved as a PEFT adapter in
    <project>/reward_models/<name>/, usable as a "trained_reward_model" source. Opens its own
    database connection, so it can run in a worker thread. `on_progress` gets ("Training the reward
    model", steps done, steps in all); `on_step` gets each step's loss and accuracy. Setting `stop`
    ends training at the next step and returns None: nothing is saved (a half-trained model would
    score like a finished one).
    """
    from peft import LoraConfig, get_peft_model

    from .cpu_linears import route_frozen_linears
    from .models import pick_device

    if not SAFE_NAME.match(settings.name):
        raise RewardError(f"Reward model name {settings.name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    project_path = Path(project_path)
    with store.Project.open(project_path, read_only=True) as project:  # refuses a folder that is no project
        pairs = training_pairs(project.db, settings)
        base_model = store.get_setting(project.db, "base_model")
    if len(pairs) < MIN_TRAINING_PAIRS:
        raise RewardError(f"Training a reward model needs at least {MIN_TRAINING_PAIRS} preference pairs; "
                          f"this project has {len(pairs)}. Label {MIN_TRAINING_PAIRS - len(pairs)} more "
                          "comparisons in the Label tab"
                          + ("." if settings.include_datasets else ", or also train on the imported preference "
                             "datasets (studio train-reward --include-datasets)."))
    with_tools = [pair for pair in pairs if has_tool_calls(pair)]
    if with_tools:
        raise RewardError(f"{len(with_tools)} of the {len(pairs)} pairs have tool calls (first: dataset "
                          f"{with_tools[0].get('dataset_id')}, pair {with_tools[0].get('id')}). A reward model scores "
                          "one answer text per prompt, so it would not see the calls, their results or the tools: "
                          "train it on preference datasets without tool calls (DPO trains on these pairs as "
                          "they are).")
    train, heldout = split_pairs(pairs, settings.heldout_fraction, settings.seed)
    device, _ = pick_device(settings.device)

    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as it was
        torch.manual_seed(settings.seed)
        model, tokenizer = load_base_classifier(ModelSource.from_json(base_model), device)
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=settings.lora_r,
                                                 lora_alpha=settings.lora_alpha, target_modules="all-linear"))
        route_frozen_linears(model)
        scorer = ModelScorer(model, tokenizer, settings.batch_size, settings.max_length)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate)
        generator = torch.Generator().manual_seed(settings.seed)
        step, losses, started = 0, [], time.perf_counter()
        total_steps = settings.epochs * math.ceil(len(train) / settings.batch_size)
        on_progress(TRAINING_PHASE, 0, total_steps)
        for epoch in range(settings.epochs):
            order = torch.randperm(len(train), generator=generator).tolist()
            for start in range(0, len(order), settings.batch_size):
                if stop is not None and stop.is_set():
                    return None
                batch = [train[i] for i in order[start:start + settings.batch_size]]
                prompts = [p["prompt"] for p in batch]
                # Chosen and rejected in one forward pass: half the calls, the same result.
                scores = scorer.rewards(prompts * 2, [response_text(p["chosen"]) for p in batch]
                                        + [response_text(p["rejected"]) for p in batch])
                chosen, rejected = scores.chunk(2)
                loss = -F.logsigmoid(chosen - rejected).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss.item())
                on_progress(TRAINING_PHASE, step, total_steps)
                if on_step is not None:
                    on_step({"epoch": epoch, "step": step, "loss": loss.item(),
                             "accuracy": (chosen > rejected).float().mean().item()})
        report = {
            "name": settings.name, "train_pairs": len(train), "heldout_pairs": len(heldout),
            "heldout_accuracy": preference_accuracy(scorer, heldout),
            "train_accuracy": preference_accuracy(scorer, train),
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "steps": step, "seconds": time.perf_counter() - started,
            "base_model": base_model, "settings": dataclasses.asdict(settings), "created_at": time.time(),
        }

    folder = project_path / REWARD_MODELS_FOLDER / settings.name
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial / "adapter", safe_serialization=True)
    (partial / "meta.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return {**report, "path": str(folder)}


def load_trained_reward_model(folder: Path, device: str = "cpu", batch_size: int = 8,
                              max_length: int = 1024) -> ModelScorer:
    from peft import PeftModel

    if not (folder / "meta.json").exists():
        raise RewardError(f"No trained reward model in {folder} (meta.json missing)")
    meta = json.loads((folder / "meta.json").read_text())
    model, tokenizer = load_base_classifier(ModelSource.from_json(meta["base_model"]), device)
    model = PeftModel.from_pretrained(model, folder / "adapter")
    return ModelScorer(scoring_model(model, device), tokenizer, batch_size, max_length)


def project_folder(db) -> Path:
    """The project folder of an open project database (the folder holding studio.db)."""
    return store.project_dir(db)
