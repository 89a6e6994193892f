"""The stage advisor: which stage is the project in, and when to switch from PPO to DPO.

PPO shapes behaviour, DPO settles it (docs/advisor.md, shared/docs/stage-switching.md). This module
turns the project's own measurements into signals and a verdict, in three layers:

* measures: pure functions on texts and numbers (edit distance, distinct-n, repetition, slopes);
* gathering: database -> plain dataclasses (:class:`Evidence`), the only layer that reads the store;
* judging: :func:`advise` (Evidence -> :class:`Advice`), pure, so verdicts are tested on synthetic
  histories without a model.

Below them, the actions: sampling the base, and the switch (label pairs from a checkpoint, start DPO
from it, or a quick PPO-vs-DPO trial).

Thresholds per risk tolerance (the project setting). A low tolerance means "prefer DPO sooner":
messiness must be stronger before PPO is advised, diminishing returns count sooner, side effects
count smaller, and fewer diminishing-returns signals are needed to switch (PLATEAU_VOTES).

==================  ===============================================================  ====  ======  ====
signal              fires when                                                       low   medium  high
==================  ===============================================================  ====  ======  ====
rule_violations     share of base samples breaking a rule >=                         0.30  0.20    0.10
reward_spread       base reward std within a prompt / std over all samples >=        0.50  0.35    0.20
disagreement        word edit distance between samples of one prompt >=              0.90  0.80    0.70
distinct_samples    distinct-2 among samples of one prompt >=                        0.95  0.90    0.80
gain_per_step       reward slope per step, trailing window / early window <=         0.40  0.25    0.10
gain_per_kl         reward slope per unit of KL, trailing / early <=                 0.40  0.25    0.10
behaviour_change    word edit distance of eval outputs to the previous state <=      0.15  0.10    0.05
outputs_changed     share of eval outputs changed since the previous state <=        0.50  0.25    0.10
length_drift        mean length / start length - 1, in absolute value >=             0.20  0.30    0.50
diversity_loss      1 - distinct-2 / distinct-2 of the start state >=                0.15  0.25    0.40
repetition          repeated 3-gram share minus the start state's >=                 0.05  0.10    0.20
refusals            refusal-or-empty rate minus the start state's >=                 0.05  0.10    0.20
reward_hacking      labelled win rate vs earlier states <=, while reward rose        0.55  0.50    0.45
==================  ===============================================================  ====  ======  ====

Diminishing-returns votes needed to switch: low 1, medium 2, high 3 (of those measurable). A base
sample breaks a rule when the rule scores below :func:`violation_threshold`. The numbers are
starting points chosen by reasoning about the measures, not calibrated on real runs; they live in
:data:`THRESHOLDS` and the panel shows them next to every value.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import labelling, store

TOLERANCES = ("low", "medium", "high")

THRESHOLDS: dict[str, dict[str, float]] = {
    "rule_violations": {"low": 0.30, "medium": 0.20, "high": 0.10},
    "reward_spread": {"low": 0.50, "medium": 0.35, "high": 0.20},
    "disagreement": {"low": 0.90, "medium": 0.80, "high": 0.70},
    "distinct_samples": {"low": 0.95, "medium": 0.90, "high": 0.80},
    "gain_per_step": {"low": 0.40, "medium": 0.25, "high": 0.10},
    "gain_per_kl": {"low": 0.40, "medium": 0.25, "high": 0.10},
    "behaviour_change": {"low": 0.15, "medium": 0.10, "high": 0.05},
    "outputs_changed": {"low": 0.50, "medium": 0.25, "high": 0.10},
    "length_drift": {"low": 0.20, "medium": 0.30, "high": 0.50},
    "diversity_loss": {"low": 0.15, "medium": 0.25, "high": 0.40},
    "repetition": {"low": 0.05, "medium": 0.10, "high": 0.20},
    "refusals": {"low": 0.05, "medium": 0.10, "high": 0.20},
    "reward_hacking": {"low": 0.55, "medium": 0.50, "high": 0.45},
}

# How many diminishing-returns signals must fire before switching (capped by how many are measurable).
PLATEAU_VOTES = {"low": 1, "medium": 2, "high": 3}
MIN_LABELS = 4  # labelled comparisons a checkpoint needs before its win rate counts
MIN_WINDOW = 5  # metric steps in a slope window, at least
REFUSAL_PHRASES = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry",
    "i apologize", "as an ai", "i'm not able to", "i am not able to", "i'm unable to", "i am unable to",
    "抱歉", "对不起", "我不能", "我无法",
)

# Which way each signal fires: "above" (value >= threshold), "below" (value <= threshold),
# "outside" (|value| >= threshold).
DIRECTIONS = {
    "rule_violations": "above", "reward_spread": "above", "disagreement": "above",
    "distinct_samples": "above", "gain_per_step": "below", "gain_per_kl": "below",
    "behaviour_change": "below", "outputs_changed": "below", "length_drift": "outside",
    "diversity_loss": "above", "repetition": "above", "refusals": "above", "reward_hacking": "below",
}
LABELS = {
    "rule_violations": "Rule violations (base)",
    "reward_spread": "Reward spread within a prompt (base)",
    "disagreement": "Disagreement between samples (base)",
    "distinct_samples": "Distinct-2 among samples (base)",
    "gain_per_step": "Reward gain per step vs early",
    "gain_per_kl": "Reward gain per unit KL vs early",
    "behaviour_change": "Behaviour change since last checkpoint",
    "outputs_changed": "Outputs changed since last checkpoint",
    "length_drift": "Length drift vs start",
    "diversity_loss": "Diversity lost vs start",
    "repetition": "Repetition vs start",
    "refusals": "Refusals / empty vs start",
    "reward_hacking": "Labelled win rate (reward-hacking alarm)",
}
BASE_SIGNALS = ("rule_violations", "reward_spread", "disagreement", "distinct_samples")
PROGRESS_SIGNALS = ("gain_per_step", "gain_per_kl", "behaviour_change", "outputs_changed")
SIDE_EFFECT_SIGNALS = ("length_drift", "diversity_loss", "repetition", "refusals", "reward_hacking")

VERDICTS = {
    "need_evidence": "Sample the base first",
    "ppo_first": "PPO first: the base is messy",
    "keep_ppo": "Keep shaping with PPO",
    "switch_now": "Switch to DPO now",
    "settle_dpo": "Settle with DPO",
}


# --- measures: pure functions on texts and numbers ---------------------------------------------

# A CJK character is a word of its own (those scripts have no spaces); punctuation marks count too.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (insert, delete, substitute cost 1)."""
    previous = list(range(len(b) + 1))
    for i, item_a in enumerate(a, 1):
        current = [i]
        for j, item_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item_a != item_b)))
        previous = current
    return previous[-1]


def word_edit_distance(text_a: str, text_b: str) -> float:
    """Edit distance on words divided by the longer text's word count: 0 same, 1 nothing shared."""
    a, b = words(text_a), words(text_b)
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def mean_pairwise_distance(texts: list[str]) -> float | None:
    pairs = list(itertools.combinations(texts, 2))
    return statistics.fmean(word_edit_distance(a, b) for a, b in pairs) if pairs else None


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams over the texts (1: nothing repeats; 0: no n-grams at all)."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 3) -> float:
    """Share of a text's n-grams that repeat an earlier one (0 for a text with no repeats)."""
    grams = ngrams(words(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def is_refusal_or_empty(text: str) -> bool:
    lowered = text.strip().lower().replace("’", "'")
    return not lowered or any(phrase in lowered for phrase in REFUSAL_PHRASES)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys on xs; None with fewer than two distinct xs."""
    if len(xs) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if var_x == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var_x


def mean_length(texts: list[str]) -> float:
    return statistics.fmean(len(words(t)) for t in texts) if texts else 0.0


def refusal_rate(texts: list[str]) -> float:
    return sum(map(is_refusal_or_empty, texts)) / len(texts) if texts else 0.0


def mean_repetition(texts: list[str]) -> float:
    return statistics.fmean(map(repetition, texts)) if texts else 0.0


# --- evidence: what gathering produces and judging consumes --------------------------------------

Series = tuple[list[int], list[float]]  # (steps, values), ordered by step


@dataclass
class BaseSample:
    prompt_id: int
    text: str
    broken_rules: list[str] = field(default_factory=list)  # rule sources scoring below threshold
    reward: float | None = None  # total reward from the project's reward sources


@dataclass
class CheckpointEvidence:
    checkpoint_id: int
    step: int
    outputs: dict[int, str]  # eval prompt id -> greedy output
    wins: float = 0.0  # labelled wins against earlier states (a tie counts half; labelling.games)
    labels: int = 0


@dataclass
class RunEvidence:
    run_id: int
    name: str
    reward_metric: str  # "objective/scores", or "objective/rlhf_reward" when scores are absent
    reward: Series
    kl: Series
    start_outputs: dict[int, str]  # outputs of the state the run started from (base or parent)
    start_label: str  # "the base", "checkpoint #12", ...
    checkpoints: list[CheckpointEvidence]
    start_checkpoint_id: int | None = None
    settling_run: tuple[int, int] | None = None  # (DPO run id, checkpoint id) started from this run


@dataclass
class Evidence:
    risk_tolerance: str = "medium"
    base_samples: list[BaseSample] = field(default_factory=list)  # sampled at temperature > 0
    rules_checked: list[str] = field(default_factory=list)  # names of the rule sources
    run: RunEvidence | None = None
    labelled_pairs: int = 0
    imported_pairs: int = 0


@dataclass
class Signal:
    key: str
    value: float | None  # None: not measurable yet
    threshold: float
    fires: bool
    detail: str  # plain words with the numbers behind the value
    trend: str = ""  # "rising" | "falling" | "flat" | "" (no history)
    history: list[tuple[int, float | None]] = field(default_factory=list)  # (step, value) per checkpoint

    @property
    def label(self) -> str:
        return LABELS[self.key]

    @property
    def direction(self) -> str:
        return DIRECTIONS[self.key]


@dataclass
class Advice:
    verdict: str  # a key of VERDICTS
    explanation: str
    risk_tolerance: str
    checkpoint_id: int | None  # the checkpoint the advice refers to (None: the base)
    checkpoint_label: str
    base_signals: list[Signal]
    run_signals: list[Signal]
    run_id: int | None = None

    @property
    def title(self) -> str:
        return VERDICTS[self.verdict]


# --- judging: evidence -> signals -> verdict ----------------------------------------------------

def fires(key: str, value: float | None, threshold: float) -> bool:
    if value is None:
        return False
    direction = DIRECTIONS[key]
    if direction == "above":
        return value >= threshold
    if direction == "below":
        return value <= threshold
    return abs(value) >= threshold


def make_signal(key: str, value: float | None, tolerance: str, detail: str,
                history: list[tuple[int, float | None]] | None = None) -> Signal:
    threshold = THRESHOLDS[key][tolerance]
    return Signal(key, value, threshold, fires(key, value, threshold), detail,
                  trend_of(history or []), history or [])


def trend_of(history: list[tuple[int, float | None]], tolerance: float = 0.01) -> str:
    """Rising, falling or flat from the last two measured values."""
    values = [v for _, v in history if v is not None]
    if len(values) < 2:
        return ""
    change = values[-1] - values[-2]
    return "flat" if abs(change) <= tolerance else "rising" if change > 0 else "falling"


def pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def base_signals(samples: list[BaseSample], rules: list[str], tolerance: str) -> list[Signal]:
    """Signal 1, "is the base messy?", from samples of the base at temperature > 0."""
    by_prompt: dict[int, list[BaseSample]] = {}
    for sample in samples:
        by_prompt.setdefault(sample.prompt_id, []).append(sample)
    return [violation_signal(samples, rules, tolerance), spread_signal(by_prompt, tolerance),
            disagreement_signal(by_prompt, tolerance), distinct_samples_signal(by_prompt, tolerance)]


def violation_signal(samples: list[BaseSample], rules: list[str], tolerance: str) -> Signal:
    if not samples or not rules:
        why = "no base samples yet" if not samples else "no rule results: the project has no rule rewards"
        return make_signal("rule_violations", None, tolerance, why)
    broken = [s for s in samples if s.broken_rules]
    rate = len(broken) / len(samples)
    detail = f"{len(broken)} of {len(samples)} base samples ({pct(rate)}) break a rule"
    if broken:
        counts = {rule: sum(rule in s.broken_rules for s in samples) for rule in rules}
        detail += f", most often {max(counts, key=counts.get)}"
    return make_signal("rule_violations", rate, tolerance, detail)


def spread_signal(by_prompt: dict[int, list[BaseSample]], tolerance: str) -> Signal:
    """How much the reward of one prompt's samples varies, relative to its spread over all samples.

    A ratio, so it does not depend on the reward's scale: near 1, the model's quality is a coin toss
    for any prompt; near 0, quality depends on the prompt, not on the draw.
    """
    scored = {p: [s.reward for s in group if s.reward is not None] for p, group in by_prompt.items()}
    scored = {p: rewards for p, rewards in scored.items() if len(rewards) >= 2}
    everything = [r for rewards in scored.values() for r in rewards]
    if not scored or statistics.pstdev(everything) == 0:
        return make_signal("reward_spread", None, tolerance, "no scored base samples, or all rewards equal")
    within = statistics.fmean(statistics.pstdev(rewards) for rewards in scored.values())
    overall = statistics.pstdev(everything)
    detail = (f"the reward varies {within / overall:.2f}× as much between samples of one prompt as "
              f"over all samples (std {within:.3g} vs {overall:.3g})")
    return make_signal("reward_spread", within / overall, tolerance, detail)


def disagreement_signal(by_prompt: dict[int, list[BaseSample]], tolerance: str) -> Signal:
    distances = [mean_pairwise_distance([s.text for s in group]) for group in by_prompt.values()]
    distances = [d for d in distances if d is not None]
    if not distances:
        return make_signal("disagreement", None, tolerance, "fewer than two base samples per prompt")
    value = statistics.fmean(distances)
    detail = f"samples of one prompt differ in {pct(value)} of their words"
    return make_signal("disagreement", value, tolerance, detail)


def distinct_samples_signal(by_prompt: dict[int, list[BaseSample]], tolerance: str) -> Signal:
    groups = [[s.text for s in group] for group in by_prompt.values() if len(group) >= 2]
    if not groups:
        return make_signal("distinct_samples", None, tolerance, "fewer than two base samples per prompt")
    value = statistics.fmean(distinct_n(texts) for texts in groups)
    detail = f"{pct(value)} of word pairs are unique among samples of one prompt"
    return make_signal("distinct_samples", value, tolerance, detail)


# --- signal 3: PPO's diminishing returns, per checkpoint ----------------------------------------

def window(series: Series, end_step: int, length: int) -> Series:
    steps, values = series
    kept = [(s, v) for s, v in zip(steps, values) if end_step - length < s <= end_step]
    return [s for s, _ in kept], [v for _, v in kept]


def window_length(run: RunEvidence) -> int:
    """Slope windows are as long as the run's first checkpoint interval (the early phase)."""
    first = run.checkpoints[0].step if run.checkpoints else MIN_WINDOW
    return max(MIN_WINDOW, first)


def gain_per_step(run: RunEvidence, end_step: int, length: int) -> float | None:
    steps, values = window(run.reward, end_step, length)
    return slope(steps, values)


def gain_per_kl(run: RunEvidence, end_step: int, length: int) -> float | None:
    """Reward slope / KL slope over the window: reward bought per unit of KL spent."""
    reward_slope = gain_per_step(run, end_step, length)
    kl_steps, kl_values = window(run.kl, end_step, length)
    kl_slope = slope(kl_steps, kl_values)
    if reward_slope is None or kl_slope is None or kl_slope <= 1e-9:
        return None
    return reward_slope / kl_slope


def ratio_to_early(trailing: float | None, early: float | None) -> float | None:
    """Trailing / early; None when the early phase gained nothing to compare with."""
    if trailing is None or early is None or early <= 0:
        return None
    return trailing / early


def behaviour_change(before: dict[int, str], after: dict[int, str]) -> tuple[float, float] | None:
    """(mean word edit distance, share of outputs changed) over the eval prompts both states answered."""
    shared = sorted(set(before) & set(after))
    if not shared:
        return None
    distances = [word_edit_distance(before[p], after[p]) for p in shared]
    changed = sum(before[p] != after[p] for p in shared)
    return statistics.fmean(distances), changed / len(shared)


def side_effects(start_outputs: dict[int, str], outputs: dict[int, str]) -> dict[str, float | None]:
    """Length drift, diversity loss, repetition and refusal increase of `outputs` vs the start
    state's, over the eval prompts both answered (all None when they share none)."""
    shared = sorted(set(start_outputs) & set(outputs))
    if not shared:
        return dict.fromkeys(("length_drift", "diversity_loss", "repetition", "refusals"))
    start, outputs = [start_outputs[p] for p in shared], [outputs[p] for p in shared]
    start_length, start_distinct = mean_length(start), distinct_n(start)
    return {
        "length_drift": mean_length(outputs) / start_length - 1 if start_length else None,
        "diversity_loss": 1 - distinct_n(outputs) / start_distinct if start_distinct else None,
        "repetition": mean_repetition(outputs) - mean_repetition(start),
        "refusals": refusal_rate(outputs) - refusal_rate(start),
    }


def reward_level(run: RunEvidence, end_step: int, length: int) -> float | None:
    _, values = window(run.reward, end_step, length)
    return statistics.fmean(values) if values else None


@dataclass
class CheckpointMeasures:
    """Every run signal's value at one checkpoint, with the numbers the explanation quotes."""

    checkpoint: CheckpointEvidence
    values: dict[str, float | None]
    slope_now: float | None
    slope_early: float | None
    reward_gain: float | None  # reward level now minus in the early window
    win_rate: float | None


def measure_checkpoints(run: RunEvidence) -> list[CheckpointMeasures]:
    length = window_length(run)
    first_step = run.checkpoints[0].step if run.checkpoints else 0
    early_slope = gain_per_step(run, first_step, length)
    early_per_kl = gain_per_kl(run, first_step, length)
    early_level = reward_level(run, first_step, length)
    previous_outputs = run.start_outputs
    measured = []
    for checkpoint in run.checkpoints:
        now_slope = gain_per_step(run, checkpoint.step, length)
        level = reward_level(run, checkpoint.step, length)
        change = behaviour_change(previous_outputs, checkpoint.outputs)
        win_rate = checkpoint.wins / checkpoint.labels if checkpoint.labels >= MIN_LABELS else None
        reward_gain = level - early_level if level is not None and early_level is not None else None
        values = {
            "gain_per_step": ratio_to_early(now_slope, early_slope),
            "gain_per_kl": ratio_to_early(gain_per_kl(run, checkpoint.step, length), early_per_kl),
            "behaviour_change": change[0] if change else None,
            "outputs_changed": change[1] if change else None,
            **side_effects(run.start_outputs, checkpoint.outputs),
            # The alarm only means something while reward rises: otherwise it is not measured.
            "reward_hacking": win_rate if reward_gain is not None and reward_gain > 0 else None,
        }
        measured.append(CheckpointMeasures(checkpoint, values, now_slope, early_slope, reward_gain, win_rate))
        previous_outputs = checkpoint.outputs
    return measured


def run_signals(run: RunEvidence, measured: list[CheckpointMeasures], tolerance: str) -> list[Signal]:
    """Each run signal at the latest checkpoint, with its history over all checkpoints."""
    latest = measured[-1]
    signals = []
    for key in PROGRESS_SIGNALS + SIDE_EFFECT_SIGNALS:
        history = [(m.checkpoint.step, m.values[key]) for m in measured]
        signals.append(make_signal(key, latest.values[key], tolerance,
                                   run_detail(key, run, latest), history))
    return signals


def run_detail(key: str, run: RunEvidence, m: CheckpointMeasures) -> str:
    """The plain-words numbers behind a run signal's value at one checkpoint."""
    value = m.values[key]
    if key == "reward_hacking":
        if m.win_rate is None:
            return f"{m.checkpoint.labels} labels against earlier states so far (needs {MIN_LABELS})"
        if value is None:
            return f"reward is not rising; labels prefer this checkpoint {pct(m.win_rate)} of the time"
        return (f"reward rose {m.reward_gain:+.3g} since the early steps, yet labels prefer this "
                f"checkpoint over earlier states only {pct(value)} of the time, over {m.checkpoint.labels} labels")
    if value is None:
        return {
            "gain_per_step": "not measurable yet: no reward gain in the early steps, or too few steps",
            "gain_per_kl": "not measurable yet: KL is not growing, or no early gain",
            "behaviour_change": "no eval outputs to compare",
            "outputs_changed": "no eval outputs to compare",
        }.get(key, f"no eval outputs of {run.start_label} to compare with")
    start = run.start_label
    return {
        "gain_per_step": f"{run.reward_metric} moves {m.slope_now:+.2g}/step now vs {m.slope_early:+.2g}/step "
                         f"early: {pct(value)} of the early rate",
        "gain_per_kl": f"reward bought per unit of KL is {pct(value)} of the early rate",
        "behaviour_change": f"outputs moved by {pct(value)} of their words since the previous state",
        "outputs_changed": f"{pct(value)} of eval outputs changed since the previous state",
        "length_drift": f"answers are {abs(value) * 100:.0f}% {'longer' if value >= 0 else 'shorter'} "
                        f"than {start}'s",
        "diversity_loss": f"distinct-2 is {abs(value) * 100:.0f}% {'lower' if value >= 0 else 'higher'} "
                          f"than {start}'s",
        "repetition": f"repeated 3-gram share is {value:+.2f} vs {start}",
        "refusals": f"refusal-or-empty rate is {value:+.2f} vs {start}",
    }[key]


# --- the verdict ------------------------------------------------------------------------------

def advise(evidence: Evidence) -> Advice:
    """The verdict, the checkpoint it refers to, and every signal behind it."""
    tolerance = evidence.risk_tolerance if evidence.risk_tolerance in TOLERANCES else "medium"
    base = base_signals(evidence.base_samples, evidence.rules_checked, tolerance)
    run = evidence.run
    if run is None or not run.checkpoints:
        return advise_from_base(evidence, base, tolerance)
    measured = measure_checkpoints(run)
    signals = run_signals(run, measured, tolerance)
    if run.settling_run is not None:
        return advise_settling(evidence, base, signals, tolerance)
    return advise_from_run(evidence, base, signals, measured, tolerance)


def advise_from_base(evidence: Evidence, base: list[Signal], tolerance: str) -> Advice:
    fired = [s for s in base if s.fires]
    measured = [s for s in base if s.value is not None]
    if fired:
        verdict = "ppo_first"
        text = (f"The base model is messy: {quote(fired)}. DPO only re-orders behaviour the model "
                "already has; use PPO first to push it into line.")
    elif measured:
        verdict = "settle_dpo"
        text = (f"The base model is roughly on track: {quote(measured)}. Only details are off, "
                "so DPO is enough. " + pairs_note(evidence))
    else:
        verdict = "need_evidence"
        text = ("No evidence yet. Sample the base to see whether it is messy (PPO first) or only "
                "off in details (DPO).")
    return Advice(verdict, text, tolerance, None, "the base", base, [],
                  evidence.run.run_id if evidence.run else None)


def advise_settling(evidence: Evidence, base: list[Signal], signals: list[Signal],
                    tolerance: str) -> Advice:
    run = evidence.run
    dpo_run_id, checkpoint_id = run.settling_run
    where = in_run(run, next(c for c in run.checkpoints if c.checkpoint_id == checkpoint_id))
    text = (f"The switch is made: DPO run #{dpo_run_id} settles from {where}. "
            "Keep labelling and settle with DPO. " + pairs_note(evidence))
    return Advice("settle_dpo", text, tolerance, checkpoint_id, where, base, signals, run.run_id)


def advise_from_run(evidence: Evidence, base: list[Signal], signals: list[Signal],
                    measured: list[CheckpointMeasures], tolerance: str) -> Advice:
    run = evidence.run
    latest = measured[-1].checkpoint
    by_key = {s.key: s for s in signals}
    side = [by_key[k] for k in SIDE_EFFECT_SIGNALS if by_key[k].fires]
    progress = [by_key[k] for k in PROGRESS_SIGNALS]
    available = [s for s in progress if s.value is not None]
    tired = [s for s in available if s.fires]
    votes = min(PLATEAU_VOTES[tolerance], len(available))
    here = in_run(run, latest)

    if side:
        clean = last_clean_checkpoint(measured, tolerance)
        if clean is None:
            target_id, target = run.start_checkpoint_id, run.start_label
        else:
            target_id, target = clean.checkpoint_id, in_run(run, clean)
        alarm = (" Reward-hacking alarm: reward rises while labelled win rate does not."
                 if by_key["reward_hacking"].fires else "")
        text = (f"Side effects have grown by {here}: {quote(side)}.{alarm} PPO's gain is now smaller than "
                f"its risk. Switch to DPO from {target}, the last state before side effects "
                f"crossed their thresholds. " + pairs_note(evidence))
        return Advice("switch_now", text, tolerance, target_id, target, base, signals, run.run_id)

    if available and len(tired) >= votes:
        text = (f"PPO's returns are diminishing at {here}: {quote(tired)} ({len(tired)} of "
                f"{len(available)} signals; {votes} needed at {tolerance} risk tolerance). No side "
                f"effect has crossed its threshold, so switch to DPO from {here}. " + pairs_note(evidence))
        return Advice("switch_now", text, tolerance, latest.checkpoint_id, here, base, signals, run.run_id)

    still = [s for s in available if not s.fires]
    gaining = quote(still) if still else "too few steps yet to measure diminishing returns"
    text = (f"PPO is still shaping at {here}: {gaining}. No side effect has crossed its threshold. "
            f"Keep training with PPO and check again at the next checkpoint.")
    return Advice("keep_ppo", text, tolerance, latest.checkpoint_id, here, base, signals, run.run_id)


def last_clean_checkpoint(measured: list[CheckpointMeasures], tolerance: str) -> CheckpointEvidence | None:
    """The latest checkpoint before the first one where any side effect fired."""
    clean = None
    for m in measured:
        if any(fires(k, m.values[k], THRESHOLDS[k][tolerance]) for k in SIDE_EFFECT_SIGNALS):
            break
        clean = m.checkpoint
    return clean


def in_run(run: RunEvidence, checkpoint: CheckpointEvidence) -> str:
    return f"{checkpoint_name(checkpoint.checkpoint_id, checkpoint.step)} of {run.name}"


def checkpoint_name(checkpoint_id: int | None, step: int | None) -> str:
    if checkpoint_id is None:
        return "the base"
    return f"checkpoint #{checkpoint_id}" + (f" (step {step})" if step is not None else "")


def quote(signals: list[Signal]) -> str:
    """Each signal's plain-words detail with its threshold, joined into one sentence."""
    return "; ".join(f"{s.detail} (threshold {threshold_text(s)})" for s in signals)


def threshold_text(signal: Signal) -> str:
    if signal.direction == "outside":
        return f"± {pct(signal.threshold)}"
    sign = "≥ " if signal.direction == "above" else "≤ "
    return sign + format_number(signal.key, signal.threshold)


def format_number(key: str, value: float | None) -> str:
    """A signal's value as the cards and explanations show it."""
    if value is None:
        return "—"
    if key in ("repetition", "refusals"):
        return f"{value:+.2f}"
    if key == "length_drift":
        return f"{value * 100:+.0f}%"
    return pct(value)


def pairs_note(evidence: Evidence) -> str:
    """DPO's precondition: preference data. Say how much there is."""
    total = evidence.labelled_pairs + evidence.imported_pairs
    if total == 0:
        return "DPO needs preference pairs and the project has none yet: label pairs from this checkpoint first."
    return (f"DPO will learn from {total} preference pairs ({evidence.labelled_pairs} labelled, "
            f"{evidence.imported_pairs} imported).")


# --- gathering: the store -> Evidence (reads only; no model runs) -------------------------------

REWARD_METRICS = ("objective/scores", "objective/rlhf_reward")  # raw reward first: it has no KL penalty


def gather(db, run_id: int | None = None) -> Evidence:
    """Everything :func:`advise` needs, read from the project. `run_id`: the PPO run to judge, or None."""
    base, rules = gather_base(db)
    return Evidence(
        risk_tolerance=store.get_setting(db, "risk_tolerance", "medium"),
        base_samples=base, rules_checked=rules,
        run=gather_run(db, run_id) if run_id is not None else None,
        labelled_pairs=len(store.labelled_pairs(db)), imported_pairs=db["pairs"].count)


def gather_base(db) -> tuple[list[BaseSample], list[str]]:
    """The base's samples at temperature > 0 with their stored rule results, and the rules checked."""
    samples, rules = [], {}
    for row in store.samples(db, None):
        if not is_sampled(row):
            continue
        scores = row["scores"]
        rules.update(dict.fromkeys(scores.get("rule_scores", {})))
        samples.append(BaseSample(row["prompt_id"], row["text"], scores.get("broken_rules", []),
                                  scores.get("reward")))
    return samples, list(rules)


def ppo_runs(db) -> list[dict]:
    """The PPO runs the advisor can judge, newest first, with their checkpoint count."""
    return list(db.query(
        "SELECT runs.id, runs.name, runs.status, COUNT(checkpoints.id) AS checkpoints FROM runs "
        "LEFT JOIN checkpoints ON checkpoints.run_id = runs.id WHERE runs.method = 'ppo' "
        "GROUP BY runs.id ORDER BY runs.id DESC"))


def is_sampled(sample: dict) -> bool:
    return (sample["decoding"].get("temperature") or 0) > 0


def greedy_outputs(db, checkpoint_id: int | None) -> dict[int, str]:
    """prompt id -> the state's greedy output (what every checkpoint stores for the eval prompts)."""
    outputs: dict[int, str] = {}
    for sample in store.samples(db, checkpoint_id):
        if not is_sampled(sample):
            outputs.setdefault(sample["prompt_id"], sample["text"])
    return outputs


def base_reference_outputs(db) -> dict[int, str]:
    """The base's greedy outputs, or its first sample per prompt when it was only sampled."""
    outputs = greedy_outputs(db, None)
    if not outputs:
        for sample in store.samples(db, None):
            outputs.setdefault(sample["prompt_id"], sample["text"])
    return outputs


def metric_series(db, run_id: int, name: str) -> Series:
    rows = list(db.query("SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step",
                         [run_id, name]))
    return [r["step"] for r in rows], [r["value"] for r in rows]


def wins_against(games: list[tuple], state: int, earlier: set) -> tuple[float, int]:
    """(wins, games) of `state` against any of the `earlier` states, over labelled games."""
    won, played = 0.0, 0
    for state_a, state_b, score_a in games:
        if state_a == state and state_b in earlier:
            won, played = won + score_a, played + 1
        elif state_b == state and state_a in earlier:
            won, played = won + 1 - score_a, played + 1
    return won, played


def gather_run(db, run_id: int) -> RunEvidence:
    from .runs import checkpoint_chain  # imports torch: only here, so the panel imports this module fast

    run = store.get_run(db, run_id)
    metrics = {name: metric_series(db, run_id, name) for name in (*REWARD_METRICS, "objective/kl")}
    reward_metric = next((m for m in REWARD_METRICS if metrics[m][0]), REWARD_METRICS[0])
    parent = run["parent_checkpoint_id"]
    games = labelling.games(db)
    earlier = {labelling.BASE, *(c["id"] for c in checkpoint_chain(db, parent))}
    checkpoints = []
    for checkpoint in store.checkpoints(db, run_id):
        won, played = wins_against(games, checkpoint["id"], earlier)
        checkpoints.append(CheckpointEvidence(checkpoint["id"], checkpoint["step"],
                                              greedy_outputs(db, checkpoint["id"]), won, played))
        earlier.add(checkpoint["id"])
    if parent is None:
        start_outputs, start_label = base_reference_outputs(db), "the base"
    else:
        start_outputs = greedy_outputs(db, parent)
        start_label = checkpoint_name(parent, store.get_checkpoint(db, parent)["step"])
    return RunEvidence(run_id, run["name"], reward_metric, metrics[reward_metric], metrics["objective/kl"],
                       start_outputs, start_label, checkpoints, parent, settling_run(db, checkpoints))


def settling_run(db, checkpoints: list[CheckpointEvidence]) -> tuple[int, int] | None:
    """(run id, checkpoint id) of the newest DPO run started from one of these checkpoints."""
    ids = [c.checkpoint_id for c in checkpoints]
    if not ids:
        return None
    rows = list(db.query(
        f"SELECT id, parent_checkpoint_id FROM runs WHERE method = 'dpo' AND parent_checkpoint_id IN "
        f"({','.join('?' * len(ids))}) ORDER BY id DESC LIMIT 1", ids))
    return (rows[0]["id"], rows[0]["parent_checkpoint_id"]) if rows else None


# --- actions: sample the base, and the switch ---------------------------------------------------

SAMPLING = {"max_new_tokens": 64, "temperature": 1.0, "top_p": 0.95}  # the base's own behaviour, not greedy
BASE_SAMPLES = 4  # samples per eval prompt: enough pairs to see disagreement, cheap enough to wait for
TRIAL_STEPS = 20


def violation_threshold(source) -> float:
    """A sample breaks a rule when the rule scores below this (rewards.py's scales)."""
    if source.type == "repetition":
        return -0.2  # a fifth of the n-grams repeated
    if source.type == "forbidden_words" or (source.type == "regex" and source.forbid):
        return -0.5  # penalties: minus the count of offences, so any offence
    return 0.5  # rules scoring in [0, 1]: failed, or less than half met


def reward_sources(db) -> list[dict]:
    """The project's reward sources: its `reward_sources` setting, else the demo preset."""
    from . import rewards

    return store.get_setting(db, "reward_sources") or rewards.demo_preset()


def score_samples(db, prompts: list, texts: list[str], tokenizer, device: str) -> list[dict]:
    """Per text: the total reward, each rule's score and the rules it breaks."""
    from . import rewards

    function = rewards.RewardFunction(reward_sources(db), tokenizer, rewards.project_folder(db), device)
    total, breakdown = function(prompts, texts)
    rules = [(name, source) for name, source in zip(function.names, function.sources)
             if isinstance(source, rewards.Rule)]
    scored = []
    for index in range(len(texts)):
        rule_scores = {name: float(breakdown[name][index]) for name, _ in rules}
        broken = [name for name, source in rules if rule_scores[name] < violation_threshold(source)]
        scored.append({"reward": float(total[index]), "rule_scores": rule_scores, "broken_rules": broken})
    return scored


def sampling_decoding(**changes):
    from .generation import Decoding  # imports torch

    return Decoding(**{**SAMPLING, **changes})


def sample_base(target, k: int = BASE_SAMPLES, decoding=None, device: str = "cpu") -> int:
    """Sample every eval prompt k times from the base (seeds 0..k-1) plus once greedily; store them
    with their scores from the project's reward sources (what the base's messiness is judged on).

    `target` is a project path or a database. The samples replace earlier ones with the same decoding
    settings. Returns how many samples were stored. Runs the model: call it from a worker.
    """
    from dataclasses import replace

    from .generation import Decoding, generate
    from .runs import load_model_state

    if isinstance(target, (str, Path)):  # a path: a connection of this thread, closed after
        db = store.connect(target)
        try:
            return sample_base(db, k, decoding, device)
        finally:
            db.close()
    db = target
    decoding = decoding or sampling_decoding()
    if decoding.temperature <= 0:
        raise ValueError("Sampling the base needs a temperature above 0")
    prompts = store.eval_prompts(db)
    if not prompts:
        raise ValueError("The project has no eval prompts to sample")
    model, tokenizer = load_model_state(db, None, device)
    # The greedy sample is what every checkpoint stores: the reference for drift from the base.
    decodings = [(0, Decoding(max_new_tokens=decoding.max_new_tokens))]
    decodings += [(index, replace(decoding, seed=index)) for index in range(k)]
    rows = []
    for sample_index, each in decodings:
        generations = generate(model, tokenizer, [p["prompt"] for p in prompts], each)
        scores = score_samples(db, [p["prompt"] for p in prompts], [g.text for g in generations],
                               tokenizer, device)
        rows += [{"checkpoint_id": None, "prompt_id": p["id"], "sample_index": sample_index,
                  "seed": each.seed, "decoding": each.to_json(), "text": g.text,
                  "scores": {"length": len(g.response_ids), "finished": g.finished, **score}}
                 for p, g, score in zip(prompts, generations, scores)]
    with db.atomic():
        for _, each in decodings:
            db.execute("DELETE FROM samples WHERE checkpoint_id IS NULL AND decoding = ?",
                       [json.dumps(each.to_json())])
        store.add_samples(db, rows)
    return len(rows)


def label_pairs_from_checkpoint(db, checkpoint_id: int | None, against_base: bool = False,
                                limit: int = 16, decoding=None, device: str = "cpu") -> list[int]:
    """Comparisons for the labelling view: two samples of the checkpoint per prompt (or the
    checkpoint against the base), on the training prompts (the eval prompts when there are none).

    `checkpoint_id` None means the base. Returns the comparison ids. Runs the model: call it from a worker.
    """
    state = labelling.BASE if checkpoint_id is None else checkpoint_id
    prompts = labelling.prompt_rows(db, "train", limit) or labelling.prompt_rows(db, "eval", limit)
    decoding = decoding or sampling_decoding()
    if against_base:
        return list(labelling.compare_states(db, state, labelling.BASE, prompts, decoding, device=device))
    return list(labelling.compare_samples(db, state, prompts, decoding, device=device))


def start_dpo_from_checkpoint(db, checkpoint_id: int | None, overrides: dict | None = None,
                              name: str | None = None) -> int:
    """Queue a DPO run whose starting policy and reference are `checkpoint_id` (None: the base).

    It trains on the project's labelled pairs and every imported preference dataset, unless
    `overrides` says otherwise. Returns the run id (queued: the caller starts it).
    """
    from . import runs

    settings = {"include_labels": True, **(overrides or {}), "parent_checkpoint_id": checkpoint_id}
    config = runs.make_config("dpo", settings)
    return runs.create_run(db, config, name=name or f"DPO from {state_name(db, checkpoint_id)}")


def create_quick_trial(db, start_checkpoint_id: int | None = None, steps: int = TRIAL_STEPS,
                       ppo_overrides: dict | None = None, dpo_overrides: dict | None = None) -> tuple[int, int]:
    """Two short runs from the same start, PPO and DPO, to compare side by side on the eval prompts.

    Same seed, same length, same checkpoint interval, so their eval samples line up step by step.
    PPO uses the project's reward sources; DPO its labelled and imported pairs. Returns (PPO run id,
    DPO run id), both queued.
    """
    from . import runs

    shared = {"max_steps": steps, "checkpoint_every": max(1, steps // 4), "seed": 0,
              "parent_checkpoint_id": start_checkpoint_id}
    where = state_name(db, start_checkpoint_id)
    ppo_config = runs.make_config("ppo", {**shared, "reward_sources": reward_sources(db), **(ppo_overrides or {})})
    dpo_config = runs.make_config("dpo", {"include_labels": True, **shared, **(dpo_overrides or {})})
    with db.atomic():  # both or neither: a trial with one side is no comparison
        ppo_id = runs.create_run(db, ppo_config, name=f"Trial PPO from {where}")
        dpo_id = runs.create_run(db, dpo_config, name=f"Trial DPO from {where}")
    return ppo_id, dpo_id


def state_name(db, checkpoint_id: int | None) -> str:
    return labelling.describe_state(db, labelling.BASE if checkpoint_id is None else checkpoint_id)
