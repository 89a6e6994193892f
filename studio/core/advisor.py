"""The stage advisor: which stage is the project in, and when to switch from PPO to DPO.

PPO shapes behaviour, DPO settles it (docs/advisor.md, shared/docs/stage-switching.md). This module
turns the project's own measurements into signals and a verdict, in three layers:

* measures: pure functions on texts and numbers (edit distance, distinct-n, repetition), with the
  statistics in :mod:`studio.core.advisor_stats` (slopes with standard errors, Wilson intervals);
* gathering: database -> plain dataclasses (:class:`Evidence`), the only layer that reads the store;
* judging: :func:`advise` (Evidence -> :class:`Advice`), pure, so verdicts are tested on synthetic
  histories without a model.

Below them, the actions: sampling the base, and the switch (label pairs from a checkpoint, start DPO
from it, or a quick trial of shaping (the judged run's method) against DPO).

Every signal is an estimate with a one-sided 95% interval; it fires only when the interval clears
its threshold, and a verdict that needs a signal nobody can measure yet is ``need_evidence``, naming
what is missing. Thresholds per risk tolerance (the project setting; low means "prefer DPO sooner"):
see :data:`THRESHOLDS` and docs/advisor.md, which documents each signal, its interval and threshold.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import labelling, store
from .defaults import SHAPING_METHODS  # the reward-driven runs the advisor judges
from .advisor_stats import (Z, Estimate, difference, extra_trials_needed, finite, gao_fit, gao_peak_kl,
                            jackknife, mean_estimate, proportion, ratio, robust_slope, trimmed_mean)
from .progress import Progress, ignore

TOLERANCES = ("low", "medium", "high")

THRESHOLDS: dict[str, dict[str, float]] = {
    # Signal 1: is the base messy? (base samples at the PPO run's temperature)
    "rule_violations": {"low": 0.30, "medium": 0.20, "high": 0.10},
    "reward_spread": {"low": 0.30, "medium": 0.20, "high": 0.12},
    # Signal 3: is PPO still paying?
    "gain_per_step": {"low": 0.40, "medium": 0.25, "high": 0.10},
    "gain_per_kl": {"low": 0.40, "medium": 0.25, "high": 0.10},
    "behaviour_change": {"low": 0.15, "medium": 0.10, "high": 0.05},
    # RL health
    "kl_per_token": {"low": 0.20, "medium": 0.30, "high": 0.50},
    "kl_acceleration": {"low": 2.0, "medium": 3.0, "high": 4.0},
    "entropy_ratio": {"low": 0.60, "medium": 0.50, "high": 0.35},
    "reward_decline": {"low": 0.20, "medium": 0.30, "high": 0.50},
    "oscillation": {"low": 2, "medium": 3, "high": math.inf},
    # Side effects against the run's start state
    "length_drift": {"low": 0.20, "medium": 0.30, "high": 0.50},
    "diversity_loss": {"low": 0.15, "medium": 0.25, "high": 0.40},
    "repetition": {"low": 0.05, "medium": 0.10, "high": 0.20},
    "refusals": {"low": 0.05, "medium": 0.10, "high": 0.20},
    "reward_hacking": {"low": 0.55, "medium": 0.50, "high": 0.45},
}

# Which way each signal fires, and on which bound of its interval: "above" (low bound >= threshold),
# "below" (high bound <= threshold), "outside" (|value| away from 0 by the threshold, bound-wise).
DIRECTIONS = {
    "rule_violations": "above", "reward_spread": "above",
    "gain_per_step": "below", "gain_per_kl": "below", "behaviour_change": "below",
    "kl_per_token": "above", "kl_acceleration": "above", "entropy_ratio": "below",
    "reward_decline": "above", "oscillation": "above",
    "length_drift": "outside", "diversity_loss": "above", "repetition": "above", "refusals": "above",
    "reward_hacking": "below",
}
LABELS = {
    "rule_violations": "Clear rule violations (base)",
    "reward_spread": "Reward spread within a prompt (base)",
    "gain_per_step": "Reward gain per step vs early",
    "gain_per_kl": "Reward gain per unit KL vs early",
    "behaviour_change": "Behaviour change since last checkpoint",
    "kl_per_token": "KL per token vs budget",
    "kl_acceleration": "KL growth vs early",
    "entropy_ratio": "Entropy per token vs start",
    "reward_decline": "Reward fallen from its peak",
    "oscillation": "Reward direction changes",
    "length_drift": "Length drift vs start",
    "diversity_loss": "Diversity lost vs start",
    "repetition": "Repetition vs start",
    "refusals": "Refusals / empty vs start",
    "reward_hacking": "Labelled win rate (reward-hacking alarm)",
}
BASE_SIGNALS = ("rule_violations", "reward_spread")
PROGRESS_SIGNALS = ("gain_per_step", "gain_per_kl", "behaviour_change")
HEALTH_SIGNALS = ("kl_per_token", "kl_acceleration", "entropy_ratio", "reward_decline", "oscillation")
SIDE_EFFECT_SIGNALS = ("length_drift", "diversity_loss", "repetition", "refusals", "reward_hacking")
DAMAGE_SIGNALS = ("kl_per_token", "kl_acceleration", "entropy_ratio") + SIDE_EFFECT_SIGNALS

# Diminishing-returns signals that must fire to switch on a plateau; the raw reward's own gain
# signal is always one of them. Fixed: fewer measurable signals never lowers the bar.
PLATEAU_VOTES = {"low": 1, "medium": 2, "high": 2}
MIN_WINDOW = 10  # metric steps in a slope window, at least
MIN_LABELS = 4  # labelled comparisons before a checkpoint's win rate is shown
NO_PROGRESS_STEPS = 20  # steps before "reward flat since step 1" can be said: fewer are too noisy
DAMAGED_SHARE = 0.5  # a checkpoint with damage on more outputs than this is never a switch target
REFUSAL_PHRASES = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry",
    "i apologize", "as an ai", "i'm not able to", "i am not able to", "i'm unable to", "i am unable to",
    "抱歉", "对不起", "我不能", "我无法",
)

# Metric names, first found wins: PPO's raw reward, TRL GRPO/RLOO's, then older PPO histories.
RAW_REWARD_METRICS = ("objective/raw_reward", "reward", "objective/scores", "objective/rlhf_reward")
KL_METRICS = ("objective/kl", "kl")
ENTROPY_METRICS = ("objective/entropy", "entropy")
LENGTH_METRICS = ("response_length_mean", "completions/mean_length")

VERDICTS = {
    "need_evidence": "Need more evidence",
    "ppo_first": "PPO first: the base is messy",
    "keep_ppo": "Keep shaping with PPO",
    "switch_now": "Switch to DPO now",
    "settle_dpo": "Settle with DPO",
}


# --- measures: pure functions on texts ----------------------------------------------------------

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


def mean_length(texts: list[str]) -> float:
    return statistics.fmean(len(words(t)) for t in texts) if texts else 0.0


def refusal_rate(texts: list[str]) -> float:
    return sum(map(is_refusal_or_empty, texts)) / len(texts) if texts else 0.0


def mean_repetition(texts: list[str]) -> float:
    return statistics.fmean(map(repetition, texts)) if texts else 0.0


# --- intent: what the reward sources ask for is not a side effect --------------------------------

@dataclass
class Intent:
    """Changes the reward sources target, each with the reason shown to the user."""

    length: int = 0  # -1: shorter answers are intended, +1: longer, 0: neither
    length_reason: str = ""
    refusals_reason: str = ""  # non-empty: more refusals are intended

    def reasons(self) -> list[str]:
        return [r for r in (self.length_reason, self.refusals_reason) if r]


SAFETY_NAME = re.compile(r"safe|refus|harm|decline", re.IGNORECASE)


def ends_sentence(text: str, characters: str = ".!?") -> bool:
    """Does the text end a sentence (closing quotes and brackets aside)? The terminal_punctuation rule."""
    ending = text.rstrip().rstrip("\"'”’)]*_")
    return bool(ending) and ending[-1] in characters


def intent_of(sources: list[dict], start_outputs: list[str]) -> Intent:
    """What the sources target. A length band (in words) or a line limit makes moving toward it
    intended; so does a rule asking for a finished sentence when most of the start's answers are cut
    off (they can only finish within the token budget by getting shorter). A source that rewards
    refusal phrases, or is named for safety, makes refusals intended."""
    intent = Intent()
    start_mean_words = mean_length(start_outputs) if start_outputs else None
    for source in sources:
        name = source.get("name") or source.get("type", "")
        kind, weight = source.get("type"), source.get("weight", 1.0)
        if kind == "length_band" and weight > 0 and start_mean_words is not None:
            low, high = source.get("min", 0), source.get("max", math.inf)
            if start_mean_words > high:
                intent.length = -1
                intent.length_reason = (f"shorter answers: reward source '{name}' asks for {low}-{high} "
                                        f"{source.get('unit', 'words')}, the start averages {start_mean_words:.0f} words")
            elif start_mean_words < low:
                intent.length = 1
                intent.length_reason = (f"longer answers: reward source '{name}' asks for {low}-{high} "
                                        f"{source.get('unit', 'words')}, the start averages {start_mean_words:.0f} words")
        elif kind == "max_lines" and weight > 0 and intent.length == 0:
            intent.length = -1
            intent.length_reason = f"shorter answers: reward source '{name}' limits answers to {source.get('max_lines')} lines"
        elif kind == "terminal_punctuation" and weight > 0 and intent.length == 0 and start_outputs:
            cut_off = sum(not ends_sentence(text, source.get("characters", ".!?")) for text in start_outputs)
            if cut_off > len(start_outputs) / 2:
                intent.length = -1
                intent.length_reason = (f"shorter answers: reward source '{name}' asks for a finished sentence, and "
                                        f"{cut_off} of the start's {len(start_outputs)} answers are cut off")
        rewarded_text = " ".join(source.get("words", [])) + " " + source.get("pattern", "")
        rewards_refusing = (kind in ("required_words", "regex") and not source.get("forbid") and weight > 0
                            and is_refusal_or_empty(rewarded_text) and rewarded_text.strip())
        if rewards_refusing or SAFETY_NAME.search(name or ""):
            intent.refusals_reason = f"refusals: reward source '{name}' targets them (a safety rule)"
    return intent


# --- evidence: what gathering produces and judging consumes --------------------------------------

Series = tuple[list[int], list[float]]  # (steps, values), ordered by step, finite values only


@dataclass
class BaseSample:
    prompt_id: int
    text: str
    broken_rules: list[str] = field(default_factory=list)  # rule sources clearly broken
    reward: float | None = None  # total reward from the judged reward sources


@dataclass
class CheckpointEvidence:
    checkpoint_id: int
    step: int
    outputs: dict[int, str]  # eval prompt id -> greedy output
    wins: float = 0.0  # labelled wins against earlier states (a tie counts half; labelling.games)
    labels: int = 0
    available: bool = True  # False: its folder is gone, so no run can start from it
    quality: Estimate | None = None  # Bradley-Terry score relative to the run's start, from labels


@dataclass
class RunEvidence:
    run_id: int
    name: str
    reward_metric: str  # the raw reward's metric name (RAW_REWARD_METRICS)
    reward: Series
    kl: Series
    start_outputs: dict[int, str]  # outputs of the state the run started from (step 0, base or parent)
    start_label: str  # "the base", "PPO #1, checkpoint 3 (step 24)", ...
    checkpoints: list[CheckpointEvidence]  # after step 0
    start_checkpoint_id: int | None = None  # the parent checkpoint (None: the base)
    settling_run: tuple[int, int] | None = None  # (DPO run id, checkpoint id) started from this run
    entropy: Series = ((), ())
    length: Series = ((), ())  # mean response tokens per step (turns per-response KL into per token)
    sources: list[dict] = field(default_factory=list)  # the reward sources the run optimises
    status: str = "completed"
    per_token_metrics: bool = False  # KL and entropy are per token (TRL GRPO's "kl"), not per response


@dataclass
class Evidence:
    risk_tolerance: str = "medium"
    base_samples: list[BaseSample] = field(default_factory=list)  # sampled at temperature > 0
    rules_checked: list[str] = field(default_factory=list)  # names of the rule sources
    reward_scale: float | None = None  # the reward's own scale: sum of |weight| of bounded sources
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
    low: float | None = None  # the interval's bounds (one-sided 95% each)
    high: float | None = None
    trend: str = ""  # "rising" | "falling" | "flat" | "" (no history)
    history: list[tuple[int, float | None]] = field(default_factory=list)  # (step, value) per checkpoint
    intended: str = ""  # non-empty: the change is what the reward asks for, so it never fires

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
    missing: list[str] = field(default_factory=list)  # need_evidence: exactly what is missing
    intended: list[str] = field(default_factory=list)  # changes treated as intended, with why
    quality_peak: str = ""  # the Gao et al. fit of labelled quality against sqrt(KL), when there is one

    @property
    def title(self) -> str:
        return VERDICTS[self.verdict]


# --- judging helpers ------------------------------------------------------------------------------

def fires(key: str, estimate: Estimate | None, threshold: float) -> bool:
    """Whether the estimate's interval clears the threshold in the signal's direction."""
    if estimate is None or not math.isfinite(estimate.se):
        return False
    direction = DIRECTIONS[key]
    if direction == "above":
        return estimate.low >= threshold
    if direction == "below":
        return estimate.high <= threshold
    return estimate.low >= threshold or estimate.high <= -threshold


def crosses(key: str, value: float | None, threshold: float) -> bool:
    """Whether a point value is past the threshold (no interval): for the trend over checkpoints."""
    if value is None:
        return False
    direction = DIRECTIONS[key]
    if direction == "above":
        return value >= threshold
    if direction == "below":
        return value <= threshold
    return abs(value) >= threshold


def make_signal(key: str, estimate: Estimate | None, tolerance: str, detail: str,
                history: list[tuple[int, float | None]] | None = None, intended: str = "") -> Signal:
    threshold = THRESHOLDS[key][tolerance]
    bounded = estimate is not None and math.isfinite(estimate.se)
    return Signal(key, estimate.value if estimate else None, threshold,
                  not intended and fires(key, estimate, threshold), detail,
                  estimate.low if bounded else None, estimate.high if bounded else None,
                  trend_of(history or []), history or [], intended)


def trend_of(history: list[tuple[int, float | None]], tolerance: float = 0.01) -> str:
    """Rising, falling or flat from the last two measured values."""
    values = [v for _, v in history if v is not None]
    if len(values) < 2:
        return ""
    change = values[-1] - values[-2]
    return "flat" if abs(change) <= tolerance else "rising" if change > 0 else "falling"


def pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a sentence; a dash for a missing or infinite one (never a TypeError)."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}g}"


# --- signal 1: is the base messy? ---------------------------------------------------------------

def base_signals(samples: list[BaseSample], rules: list[str], scale: float | None, tolerance: str) -> list[Signal]:
    """From samples of the base at the PPO run's temperature."""
    return [violation_signal(samples, rules, tolerance), spread_signal(samples, scale, tolerance)]


def violation_signal(samples: list[BaseSample], rules: list[str], tolerance: str) -> Signal:
    if not samples or not rules:
        why = "no base samples yet" if not samples else "no rule results: the reward has no rule sources"
        return make_signal("rule_violations", None, tolerance, why)
    broken = [s for s in samples if s.broken_rules]
    estimate = proportion(len(broken), len(samples))
    detail = (f"{len(broken)} of {len(samples)} base samples ({pct(estimate.value)}, 95% up to "
              f"{pct(estimate.high)}, from {pct(estimate.low)}) clearly break a rule")
    if broken:
        counts = {rule: sum(rule in s.broken_rules for s in samples) for rule in rules}
        detail += f", most often {max(counts, key=counts.get)}"
    return make_signal("rule_violations", estimate, tolerance, detail)


def spread_signal(samples: list[BaseSample], scale: float | None, tolerance: str) -> Signal:
    """The reward's standard deviation between samples of one prompt, on the reward's own scale
    (the sum of the bounded sources' |weight|): how often the draw, not the prompt, decides quality."""
    by_prompt: dict[int, list[float]] = {}
    for sample in samples:
        if sample.reward is not None and math.isfinite(sample.reward):
            by_prompt.setdefault(sample.prompt_id, []).append(sample.reward)
    spreads = [statistics.pstdev(rewards) for rewards in by_prompt.values() if len(rewards) >= 2]
    if not spreads or not scale:
        why = "no scored base samples with two per prompt" if not spreads else "the reward has no known scale"
        return make_signal("reward_spread", None, tolerance, why)
    estimate = mean_estimate([s / scale for s in spreads])
    detail = (f"samples of one prompt differ by {estimate.value:.2f} of the reward's scale ({scale:g}) on average "
              f"[{estimate.low:.2f}, {estimate.high:.2f}], over {len(spreads)} prompts")
    return make_signal("reward_spread", estimate, tolerance, detail)


def base_is(base: list[Signal]) -> str:
    """"messy", "clean" or "unknown", each signal judged on its interval."""
    if any(s.fires for s in base):
        return "messy"
    measured = [s for s in base if s.value is not None]
    if measured and all(s.high is not None and s.high < s.threshold for s in measured):
        return "clean"
    return "unknown"


# --- the run: metric windows --------------------------------------------------------------------

def window(series: Series, first: int, last: int) -> Series:
    """The points with first <= step <= last."""
    kept = [(s, v) for s, v in zip(*series) if first <= s <= last]
    return [s for s, _ in kept], [v for _, v in kept]


def window_length(run: RunEvidence) -> int:
    """Slope windows are as long as the run's checkpoint interval, at least MIN_WINDOW steps."""
    first = run.checkpoints[0].step if run.checkpoints else MIN_WINDOW
    return max(MIN_WINDOW, first)


def level_at(series: Series, step: int, half: int) -> Estimate | None:
    """The metric's (trimmed) mean around a checkpoint: the steps it trained just before and after."""
    _, values = window(series, step - half + 1, step + half)
    return trimmed_mean(values)


def per_token(run: RunEvidence, series: Series) -> Series:
    """A per-response metric (PPO's KL and entropy are sums over the response) divided by the step's
    mean response length; GRPO/RLOO's are per token already. Empty without lengths to divide by."""
    if run.per_token_metrics:
        return series
    lengths = dict(zip(*run.length))
    steps = [s for s in series[0] if lengths.get(s)]
    values = dict(zip(*series))
    return steps, [values[s] / lengths[s] for s in steps]


def no_progress(steps: list[int], rewards: list[float | None]) -> str | None:
    """A plain sentence when the raw reward has not moved beyond noise after NO_PROGRESS_STEPS
    steps, else None. For the advisor and the run's status line."""
    points = [(s, r) for s, r in zip(steps, rewards) if r is not None and math.isfinite(r)]
    if len(points) < NO_PROGRESS_STEPS:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    trend = robust_slope(xs, ys)
    third = max(2, len(ys) // 3)
    change = difference(trimmed_mean(ys[-third:]), trimmed_mean(ys[:third]))
    if trend is None or trend.low > 0 or trend.high < 0 or change.low > 0 or change.high < 0:
        return None
    return (f"PPO is not shaping anything yet: reward flat since step {xs[0]} "
            f"({statistics.fmean(ys[:third]):.3g} then, {statistics.fmean(ys[-third:]):.3g} over the last "
            f"{third} steps, within noise); try a higher learning rate or check the reward")


# --- the run: every signal at each checkpoint ----------------------------------------------------

@dataclass
class Measures:
    """Every run signal's estimate at one checkpoint, with the numbers its detail quotes."""

    checkpoint: CheckpointEvidence
    estimates: dict[str, Estimate | None]
    notes: dict[str, str]
    reward_level: Estimate | None
    kl_level: Estimate | None
    damaged_share: float  # share of outputs with visible damage against the start


def slope_window(step: int, length: int) -> int:
    """Early and trailing windows are each a third of the steps so far, at least `length`: longer
    windows as the run grows, so a plateau becomes clear of noise instead of staying borderline."""
    return max(length, step // 3)


def gain_ratio(now: Estimate | None, early: Estimate | None, threshold: float) -> Estimate | None:
    """now / early, with the error of the one-sided test "now - threshold * early < 0" expressed on
    the ratio's scale, so the ratio's high bound clears the threshold exactly when the test does.
    None when the early slope gained nothing (there is no rate to compare with)."""
    if now is None or early is None or early.value <= 0:
        return None
    return Estimate(now.value / early.value, math.hypot(now.se, threshold * early.se) / early.value)


def reward_gain_signals(run: RunEvidence, step: int, length: int, tolerance: str) -> tuple[dict, dict]:
    """gain_per_step and gain_per_kl: the trailing window's slope against the early window's."""
    length = slope_window(step, length)
    first, last = 1, length
    if step - length + 1 <= last:
        why = f"needs {2 * length} steps (an early and a trailing window of {length}); at step {step}"
        return {"gain_per_step": None, "gain_per_kl": None}, {"gain_per_step": why, "gain_per_kl": why}
    estimates, notes = {}, {}
    early_reward, now_reward = window(run.reward, first, last), window(run.reward, step - length + 1, step)
    early, now = robust_slope(*early_reward), robust_slope(*now_reward)
    estimates["gain_per_step"] = gain_ratio(now, early, THRESHOLDS["gain_per_step"][tolerance])
    notes["gain_per_step"] = (
        f"{run.reward_metric} moves {fmt(now.value)} ± {now.se:.2g}/step over steps {step - length + 1}-{step} "
        f"vs {fmt(early.value)} ± {early.se:.2g}/step over steps {first}-{last}"
        if estimates["gain_per_step"] else
        "not measurable: the early steps gained nothing, or too few steps")
    kl_by_step = dict(zip(*run.kl))

    def reward_per_kl(points: Series) -> Estimate | None:
        """Reward against KL across the window's steps: a price of reward in KL only while KL is
        clearly being spent. With KL level, the fit measures how one batch's reward and KL co-vary
        (a real walkthrough run read 167% "now vs early" on a flat KL), not a rate of gain."""
        pairs = [(s, kl_by_step[s], r) for s, r in zip(*points) if s in kl_by_step]
        kl_trend = robust_slope([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
        if kl_trend is None or kl_trend.value - kl_trend.se <= 0:
            return None
        return robust_slope([p[1] for p in pairs], [p[2] for p in pairs])

    estimates["gain_per_kl"] = gain_ratio(reward_per_kl(now_reward), reward_per_kl(early_reward),
                                          THRESHOLDS["gain_per_kl"][tolerance])
    notes["gain_per_kl"] = ("reward bought per nat of KL now vs early" if estimates["gain_per_kl"] else
                            "not measurable: no KL metric, KL not clearly growing in a window, or no early gain")
    return estimates, notes


def kl_signals(run: RunEvidence, step: int, length: int, tolerance: str) -> tuple[dict, dict]:
    kl_tokens = per_token(run, run.kl)
    level = level_at(kl_tokens, step, max(2, length // 2))
    estimates = {"kl_per_token": level, "kl_acceleration": None}
    notes = {"kl_per_token": (f"KL is {fmt(level.value, 3)} nats per token around step {step}"
                              if level else "no KL metric")}
    length = slope_window(step, length)
    first, last = 1, length
    if step - length + 1 > last:
        early = robust_slope(*window(kl_tokens, first, last))
        now = robust_slope(*window(kl_tokens, step - length + 1, step))
        budget = THRESHOLDS["kl_per_token"][tolerance]
        # Acceleration only matters once KL is a real share of the budget: early growth from 0 is normal.
        if level and level.value >= budget / 2:
            estimates["kl_acceleration"] = gain_ratio(now, early, THRESHOLDS["kl_acceleration"][tolerance])
        if estimates["kl_acceleration"]:
            notes["kl_acceleration"] = (f"KL per token grows {fmt(now.value)}/step over steps {step - length + 1}-{step} "
                                        f"vs {fmt(early.value)}/step over steps {first}-{last}")
    notes.setdefault("kl_acceleration", "not measured: KL below half its budget, or too few steps")
    return estimates, notes


def entropy_signal(run: RunEvidence, step: int, length: int) -> tuple[Estimate | None, str]:
    entropy = per_token(run, run.entropy)
    start, now = level_at(entropy, 0, length), level_at(entropy, step, max(2, length // 2))
    if start is None or now is None or step <= length:
        return None, "no entropy metric, or too few steps"
    estimate = ratio(now, start)
    return estimate, f"entropy per token {now.value:.3g} now vs {start.value:.3g} in the first {length} steps"


def side_effect_estimates(start: dict[int, str], outputs: dict[int, str]) -> dict[str, Estimate | None]:
    """Length drift, diversity loss, repetition and refusal increase against the start state, over
    the eval prompts both answered, each with a jackknife standard error over those prompts."""
    shared = sorted(set(start) & set(outputs))
    keys = ("length_drift", "diversity_loss", "repetition", "refusals")
    if not shared:
        return dict.fromkeys(keys)
    pairs = [(start[p], outputs[p]) for p in shared]

    def drift(items):
        base = mean_length([a for a, _ in items])
        return mean_length([b for _, b in items]) / base - 1 if base else None

    def diversity(items):
        base = distinct_n([a for a, _ in items])
        return 1 - distinct_n([b for _, b in items]) / base if base else None

    return {
        "length_drift": jackknife(pairs, drift),
        "diversity_loss": jackknife(pairs, diversity),
        "repetition": mean_estimate([repetition(b) - repetition(a) for a, b in pairs]),
        "refusals": mean_estimate([float(is_refusal_or_empty(b)) - is_refusal_or_empty(a) for a, b in pairs]),
    }


def damaged_share(start: dict[int, str], outputs: dict[int, str], intent: Intent, tolerance: str) -> float:
    """Share of outputs showing damage against their start output, at half the signals' thresholds
    (damage below a threshold is still damage): more repetition, a new refusal or empty answer, or an
    unintended length change."""
    shared = sorted(set(start) & set(outputs))
    if not shared:
        return 0.0
    drift_limit = THRESHOLDS["length_drift"][tolerance] / 2

    def damaged(before: str, after: str) -> bool:
        if repetition(after) - repetition(before) >= THRESHOLDS["repetition"][tolerance] / 2:
            return True
        if is_refusal_or_empty(after) and not is_refusal_or_empty(before) and not intent.refusals_reason:
            return True
        before_words = len(words(before)) or 1
        change = len(words(after)) / before_words - 1
        return abs(change) >= drift_limit and (intent.length == 0 or change * intent.length < 0)

    return sum(damaged(start[p], outputs[p]) for p in shared) / len(shared)


def measure_checkpoints(run: RunEvidence, intent: Intent, tolerance: str) -> list[Measures]:
    length = window_length(run)
    half = max(3, run.checkpoints[0].step // 2 if run.checkpoints else 3)
    start_level = level_at(run.reward, 0, half)
    measured = []
    previous = run.start_outputs
    for checkpoint in run.checkpoints:
        estimates, notes = reward_gain_signals(run, checkpoint.step, length, tolerance)
        kl_estimates, kl_notes = kl_signals(run, checkpoint.step, length, tolerance)
        estimates.update(kl_estimates)
        notes.update(kl_notes)
        estimates["entropy_ratio"], notes["entropy_ratio"] = entropy_signal(run, checkpoint.step, length)
        shared = sorted(set(previous) & set(checkpoint.outputs))
        estimates["behaviour_change"] = mean_estimate([word_edit_distance(previous[p], checkpoint.outputs[p])
                                                       for p in shared])
        notes["behaviour_change"] = f"outputs moved by this share of their words since the previous state ({len(shared)} prompts)"
        estimates.update(side_effect_estimates(run.start_outputs, checkpoint.outputs))
        estimates["reward_hacking"] = None
        measured.append(Measures(checkpoint, estimates, notes, level_at(run.reward, checkpoint.step, half),
                                 level_at(run.kl, checkpoint.step, half),
                                 damaged_share(run.start_outputs, checkpoint.outputs, intent, tolerance)))
        previous = checkpoint.outputs
    add_trend_signals(measured, start_level)
    add_hacking_signal(run, measured, start_level)
    return measured


def add_trend_signals(measured: list[Measures], start_level: Estimate | None) -> None:
    """reward_decline and oscillation, from the reward's level at each checkpoint."""
    levels = [m.reward_level for m in measured]
    for index, m in enumerate(measured):
        known = [(i, level) for i, level in enumerate(levels[:index + 1]) if level is not None]
        m.estimates["reward_decline"], m.estimates["oscillation"] = None, None
        if not known or start_level is None or m.reward_level is None:
            m.notes["reward_decline"] = m.notes["oscillation"] = "no reward metric around the checkpoints"
            continue
        peak_index, peak = max(known, key=lambda item: item[1].value)
        gain = peak.value - start_level.value
        drop = difference(peak, m.reward_level)
        scale = max(gain, 1e-9)
        m.estimates["reward_decline"] = Estimate(drop.value / scale, drop.se / scale)
        m.notes["reward_decline"] = (f"reward {fmt(m.reward_level.value, 3)} now vs a peak of {fmt(peak.value, 3)} at "
                                     f"step {measured[peak_index].checkpoint.step} (start {fmt(start_level.value, 3)}): "
                                     f"this share of the gain is lost")
        # Direction changes: consecutive level changes that are clear of noise, sign changes among them.
        chain = [start_level] + [level for _, level in known]
        # A swing counts when it is clear of noise and at least a fifth of the gain so far.
        swing = 0.2 * abs(peak.value - start_level.value)
        signs = [math.copysign(1, d.value) for d in (difference(b, a) for a, b in zip(chain, chain[1:]))
                 if abs(d.value) > max(Z * d.se, swing)]
        changes = sum(1 for a, b in zip(signs, signs[1:]) if a != b)
        m.estimates["oscillation"] = Estimate(changes, 0.0)
        m.notes["oscillation"] = f"{changes} clear changes of the reward's direction between checkpoints"


def add_hacking_signal(run: RunEvidence, measured: list[Measures], start_level: Estimate | None) -> None:
    """Labelled win rate against earlier states, while the reward rose clearly since the start."""
    for m in measured:
        checkpoint = m.checkpoint
        rose = (start_level is not None and m.reward_level is not None
                and difference(m.reward_level, start_level).low > 0)
        # People preferring earlier states is damage whether or not the noisy reward has clearly risen
        # yet: the alarm is measured either way, and the note says which.
        m.estimates["reward_hacking"] = proportion(checkpoint.wins, checkpoint.labels)
        if checkpoint.labels == 0:
            m.notes["reward_hacking"] = "no labels of this checkpoint against earlier states yet"
        else:
            m.notes["reward_hacking"] = (f"labels prefer this checkpoint over earlier states in "
                                         f"{checkpoint.wins:g} of {checkpoint.labels} comparisons"
                                         + ("" if rose else ", while the reward has not clearly risen since the start"))


def run_signals(run: RunEvidence, measured: list[Measures], intent: Intent, tolerance: str) -> list[Signal]:
    """Each run signal at the latest checkpoint, with its point values over all checkpoints."""
    latest = measured[-1]
    signals = []
    for key in PROGRESS_SIGNALS + HEALTH_SIGNALS + SIDE_EFFECT_SIGNALS:
        history = [(m.checkpoint.step, m.estimates[key].value if m.estimates[key] else None) for m in measured]
        estimate = latest.estimates[key]
        intended = intended_reason(key, estimate, intent)
        detail = latest.notes.get(key) or side_effect_detail(key, estimate, run.start_label)
        signal = make_signal(key, estimate, tolerance, detail, history, intended)
        since = latched_since(measured, key, tolerance) if key in DAMAGE_SIGNALS and not intended else None
        if not signal.fires and since is not None:
            signal.fires = True
            signal.detail += (f"; fired at step {since} and still past the threshold, so it stays on until "
                              f"it falls back below it")
        signals.append(signal)
    return signals


def latched_since(measured: list[Measures], key: str, tolerance: str) -> int | None:
    """A damage alarm is released only when the value falls back under its threshold, not when a
    noisy window merely widens its interval: a real run at KL 0.50-0.57 nats per token fired at two
    checkpoints, then read 0.575 [0.208, 0.941] and went back to "keep shaping". Returns the step of
    the checkpoint where the signal last fired, when every checkpoint since is still past the
    threshold (point value); else None."""
    threshold = THRESHOLDS[key][tolerance]
    for m in reversed(measured):
        estimate = m.estimates[key]
        if fires(key, estimate, threshold):
            return m.checkpoint.step
        if not crosses(key, estimate.value if estimate else None, threshold):
            return None
    return None


def intended_reason(key: str, estimate: Estimate | None, intent: Intent) -> str:
    if estimate is None:
        return ""
    if key == "length_drift" and intent.length and estimate.value * intent.length > 0:
        return intent.length_reason
    if key == "refusals" and intent.refusals_reason:
        return intent.refusals_reason
    return ""


def side_effect_detail(key: str, estimate: Estimate | None, start: str) -> str:
    if estimate is None:
        return f"no eval outputs of {start} to compare with"
    value = estimate.value
    return {
        "length_drift": f"answers are {abs(value) * 100:.0f}% {'longer' if value >= 0 else 'shorter'} than {start}'s",
        "diversity_loss": f"distinct-2 is {abs(value) * 100:.0f}% {'lower' if value >= 0 else 'higher'} than {start}'s",
        "repetition": f"repeated 3-gram share is {value:+.2f} vs {start}",
        "refusals": f"refusal-or-empty rate is {value:+.2f} vs {start}",
    }[key]


# --- choosing the checkpoint ------------------------------------------------------------------------

def damage_onset(measured: list[Measures], keys: list[str], tolerance: str, intent: Intent) -> int:
    """Index of the first checkpoint from which a damage signal stays past its threshold to the end
    (a dip that recovered is not damage); len(measured) when none persists."""
    onset = len(measured)
    for key in keys:
        threshold = THRESHOLDS[key][tolerance]
        index = len(measured)
        while index > 0:
            estimate = measured[index - 1].estimates[key]
            if intended_reason(key, estimate, intent) or not crosses(key, estimate.value if estimate else None, threshold):
                break
            index -= 1
        onset = min(onset, index)
    return onset


def persists(measured: list[Measures], key: str, tolerance: str) -> bool:
    """The signal fires at the latest checkpoint and at the one before it."""
    threshold = THRESHOLDS[key][tolerance]
    return len(measured) >= 2 and all(fires(key, m.estimates[key], threshold) for m in measured[-2:])


def usable(m: Measures) -> bool:
    return m.checkpoint.available and m.damaged_share <= DAMAGED_SHARE


def best_within_noise(candidates: list[Measures]) -> Measures | None:
    """The earliest checkpoint whose raw reward is within noise of the best one (less KL spent)."""
    scored = [m for m in candidates if m.reward_level is not None]
    if not scored:
        return candidates[-1] if candidates else None
    best = max(scored, key=lambda m: m.reward_level.value)
    for m in scored:
        if difference(best.reward_level, m.reward_level).low <= 0:
            return m
    return best


def quality_peak(run: RunEvidence, measured: list[Measures]) -> str:
    """Gao et al.'s R(d) = d (a - b log d) fitted to labelled quality against sqrt(KL), when labels
    exist at three checkpoints or more; the estimated peak in words (empty otherwise)."""
    points = [(m.kl_level.value, m.checkpoint.quality) for m in measured
              if m.checkpoint.quality is not None and m.kl_level is not None and m.kl_level.value > 0]
    if len(points) < 3:
        return ""
    weights = [1 / max(q.se, 0.05) ** 2 for _, q in points]
    fit = gao_fit([k for k, _ in points], [q.value for _, q in points], weights)
    peak = gao_peak_kl(*fit) if fit else None
    if peak is None:
        return "labelled quality against sqrt(KL) shows no peak yet (Gao et al. 2022 form)"
    nearest = min(measured, key=lambda m: abs((m.kl_level.value if m.kl_level else math.inf) - peak))
    where = "past it" if measured[-1].kl_level and measured[-1].kl_level.value > peak else "not reached yet"
    return (f"labelled quality fitted against sqrt(KL) (Gao et al. 2022: R = d(a - b log d)) peaks near "
            f"KL {peak:.3g} nats, closest to {in_run(run, nearest.checkpoint)}; "
            f"the run is {where}")


# --- the verdict ------------------------------------------------------------------------------

def advise(evidence: Evidence) -> Advice:
    """The verdict, the checkpoint it refers to, and every signal behind it."""
    tolerance = evidence.risk_tolerance if evidence.risk_tolerance in TOLERANCES else "medium"
    base = base_signals(evidence.base_samples, evidence.rules_checked, evidence.reward_scale, tolerance)
    run = evidence.run
    if run is None or not run.checkpoints:
        advice = advise_from_base(evidence, base, tolerance)
        if run is not None:
            advice.run_id = run.run_id
            advice.missing.insert(0, f"a checkpoint of {run.name} after step 0")
        return advice
    intent = intent_of(run.sources, list(run.start_outputs.values()))
    measured = measure_checkpoints(run, intent, tolerance)
    signals = run_signals(run, measured, intent, tolerance)
    advice = (advise_settling(evidence, base, signals, tolerance) if run.settling_run is not None
              else advise_from_run(evidence, base, signals, measured, intent, tolerance))
    advice.intended = intent.reasons()
    advice.quality_peak = quality_peak(run, measured)
    return advice


def advise_from_base(evidence: Evidence, base: list[Signal], tolerance: str) -> Advice:
    state = base_is(base)
    measured = [s for s in base if s.value is not None]
    if state == "messy":
        text = (f"The base model is messy: {quote([s for s in base if s.fires])}. DPO only re-orders behaviour "
                "the model already has; use PPO first to push it into line.")
        return Advice("ppo_first", text, tolerance, None, "the base", base, [])
    if state == "clean":
        text = (f"The base model is on track: {quote(measured)}. Only details are off, so DPO is enough. "
                + pairs_note(evidence))
        return Advice("settle_dpo", text, tolerance, None, "the base", base, [])
    missing = base_missing(base)
    if not measured:
        text = "No evidence yet: " + missing[0] + ", to see whether it is messy (PPO first) or only off in details (DPO)."
    else:
        text = "The base is borderline: " + "; ".join(missing) + "."
    return Advice("need_evidence", text, tolerance, None, "the base", base, [], missing=missing)


def base_missing(base: list[Signal]) -> list[str]:
    """What would tell whether the base is messy: samples at all, or more of them."""
    measured = [s for s in base if s.value is not None]
    if not measured:
        return ["sample the base (its answers at the PPO temperature, scored by the reward sources)"]
    return [f"more base samples: {s.label.lower()}: {s.detail}, {value_text(s)}, straddles the threshold "
            f"{threshold_text(s)}" for s in measured if s.high is None or s.high >= s.threshold]


def advise_settling(evidence: Evidence, base: list[Signal], signals: list[Signal], tolerance: str) -> Advice:
    run = evidence.run
    dpo_run_id, checkpoint_id = run.settling_run
    checkpoint = next((c for c in run.checkpoints if c.checkpoint_id == checkpoint_id), None)
    where = in_run(run, checkpoint) if checkpoint else run.start_label
    text = (f"The switch is made: DPO run #{dpo_run_id} settles from {where}. "
            "Keep labelling and settle with DPO. " + pairs_note(evidence))
    return Advice("settle_dpo", text, tolerance, checkpoint_id, where, base, signals, run.run_id)


def advise_from_run(evidence: Evidence, base: list[Signal], signals: list[Signal], measured: list[Measures],
                    intent: Intent, tolerance: str) -> Advice:
    run = evidence.run
    by_key = {s.key: s for s in signals}
    latest = measured[-1]
    here = in_run(run, latest.checkpoint)

    def advice(verdict, text, target: Measures | None, missing=()):
        checkpoint_id = target.checkpoint.checkpoint_id if target else run.start_checkpoint_id
        label = in_run(run, target.checkpoint) if target else run.start_label
        return Advice(verdict, text, tolerance, checkpoint_id, label, base, signals, run.run_id, list(missing))

    # 1. Damage: hacking side effects, KL blow-up, entropy collapse. Never "keep shaping" through it.
    damage = [by_key[k] for k in DAMAGE_SIGNALS if by_key[k].fires]
    if damage:
        onset = damage_onset(measured, [s.key for s in damage], tolerance, intent)
        clean = [m for m in measured[:onset] if usable(m)]
        target = clean[-1] if clean else None
        alarm = (" Reward-hacking alarm: reward rose while labels prefer earlier states."
                 if by_key["reward_hacking"].fires else "")
        where = in_run(run, target.checkpoint) if target else run.start_label
        if target is None and base_is(base) == "messy":
            text = (f"Stop this run: {quote(damage)}.{alarm} The damage started at the first checkpoint, and the "
                    f"base is messy, so DPO from it is not enough: fix the reward (or raise the KL penalty) and run "
                    f"PPO again from the base.")
            return advice("ppo_first", text, None)
        text = (f"Stop shaping: {quote(damage)} at {here}.{alarm} Switch to DPO from {where}, the last state before "
                f"damage that persisted. " + pairs_note(evidence))
        return advice("switch_now", text, target)

    # 2. Reward falling from its peak, or oscillating where the project cannot afford it; seen at
    # two checkpoints in a row, so one noisy window does not end a run.
    trouble = [by_key[k] for k in ("reward_decline", "oscillation") if persists(measured, k, tolerance)]
    if trouble:
        target = best_within_noise([m for m in measured if usable(m)])
        where = in_run(run, target.checkpoint) if target else run.start_label
        text = (f"PPO has stopped paying at {here}: {quote(trouble)}. Switch to DPO from {where}, the best "
                f"checkpoint by raw reward within noise (the earliest on a tie: less KL spent). " + pairs_note(evidence))
        return advice("switch_now", text, target)

    # 3. Nothing happening at all, at this checkpoint and the one before.
    flat = no_progress(*run.reward)
    if flat and len(measured) >= 2 and no_progress(*window(run.reward, 0, measured[-2].checkpoint.step)):
        state = base_is(base)
        if state == "clean":
            text = (f"{flat}. The base is already on track ({quote([s for s in base if s.value is not None])}): "
                    f"PPO has nothing to shape, so settle with DPO from {run.start_label}. " + pairs_note(evidence))
            return advice("settle_dpo", text, None)
        if state == "messy":
            return advice("keep_ppo", f"{flat}. The base is messy, so PPO is still the right stage.", latest)
        missing = base_missing(base)
        text = (f"{flat}. A flat reward means either nothing to shape (DPO) or a PPO setup that does not work "
                f"(fix it); to know which: {'; '.join(missing)}.")
        return advice("need_evidence", text, latest, missing)

    # 4. A plateau: the raw reward's gain has fallen clearly at two checkpoints in a row, with the
    # votes the tolerance asks (never fewer because fewer signals are measurable).
    progress = [by_key[k] for k in PROGRESS_SIGNALS]
    tired = [s for s in progress if s.fires]
    votes = PLATEAU_VOTES[tolerance]
    if persists(measured, "gain_per_step", tolerance):
        if len(tired) >= votes:
            target = best_within_noise([m for m in measured if usable(m)])
            where = in_run(run, target.checkpoint) if target else run.start_label
            text = (f"PPO's returns are diminishing at {here}: {quote(tired)} ({len(tired)} of {len(progress)} "
                    f"signals; {votes} needed at {tolerance} risk tolerance). No damage signal fires. Switch to DPO "
                    f"from {where}, the best checkpoint by raw reward within noise. " + pairs_note(evidence))
            return advice("switch_now", text, target)
        unmeasured = [s.label.lower() for s in progress if s.value is None]
        missing = [f"{votes - len(tired)} more diminishing-returns signal(s) at {tolerance} tolerance"
                   + (f" (not measurable yet: {', '.join(unmeasured)})" if unmeasured else "")
                   + ": another checkpoint"]
        text = f"PPO may be levelling off at {here}: {quote(tired)}. Not enough yet to switch: {missing[0]}."
        return advice("need_evidence", text, latest, missing)

    # 5. Suspicious labels whose interval does not clear yet: say how many more labels.
    hacking = by_key["reward_hacking"]
    if hacking.value is not None and hacking.value < hacking.threshold:
        more = extra_trials_needed(hacking.value, hacking.threshold, latest.checkpoint.labels)
        missing = [f"label {more} more pairs of {here} "
                   f"against {run.start_label} or earlier checkpoints"]
        text = (f"Possible reward hacking at {here}: {hacking.detail}, which does not clear the threshold yet. "
                f"To decide: {missing[0]}.")
        return advice("need_evidence", text, latest, missing)

    gaining = [s for s in progress if s.value is not None]
    why = quote(gaining) if gaining else (
        f"the reward is still moving and there are too few steps to compare with the early rate "
        f"(needs {2 * window_length(run)} steps)")
    text = (f"PPO is still shaping at {here}: {why}. No damage signal fires. Keep training with PPO and check "
            f"again at the next checkpoint.")
    return advice("keep_ppo", text, latest)


def in_run(run: RunEvidence, checkpoint: CheckpointEvidence) -> str:
    """The checkpoint's name as the labelling and compare views give it (the run's n-th checkpoint)."""
    number = labelling.checkpoint_number([c.step for c in run.checkpoints], checkpoint.step)
    return labelling.checkpoint_title(run.name, number, checkpoint.step)


def quote(signals: list[Signal]) -> str:
    """Each signal's detail with its value, interval and threshold, joined into one sentence."""
    return "; ".join(f"{s.detail}: {value_text(s)} (fires at {threshold_text(s)})" for s in signals)


def value_text(signal: Signal) -> str:
    value = format_number(signal.key, signal.value)
    if signal.low is None:
        return value
    return f"{value} [{format_number(signal.key, signal.low)}, {format_number(signal.key, signal.high)}]"


def threshold_text(signal: Signal) -> str:
    if signal.direction == "outside":
        return f"± {pct(signal.threshold)}"
    if not math.isfinite(signal.threshold):
        return "never (high tolerance)"
    sign = "≥ " if signal.direction == "above" else "≤ "
    return sign + format_number(signal.key, signal.threshold)


def format_number(key: str, value: float | None) -> str:
    """A signal's value as the cards and explanations show it."""
    if value is None or not math.isfinite(value):
        return "—"
    if key in ("repetition", "refusals"):
        return f"{value:+.2f}"
    if key == "length_drift":
        return f"{value * 100:+.0f}%"
    if key in ("kl_per_token", "reward_spread"):
        return f"{value:.3g}"
    if key in ("kl_acceleration",):
        return f"{value:.1f}×"
    if key == "oscillation":
        return f"{value:.0f}"
    return pct(value)


def pairs_note(evidence: Evidence) -> str:
    """DPO's precondition: preference data. Say how much there is."""
    total = evidence.labelled_pairs + evidence.imported_pairs
    if total == 0:
        return "DPO needs preference pairs and the project has none yet: label pairs from this checkpoint first."
    return (f"DPO will learn from {total} preference pairs ({evidence.labelled_pairs} labelled, "
            f"{evidence.imported_pairs} imported).")


# --- gathering: the store -> Evidence (reads only; no model runs) -------------------------------

def judged_sources(db, run_id: int | None = None) -> list[dict]:
    """The reward sources judged with: the run's own, else the project's `reward_sources` setting
    (written when the user edits sources), else the demo preset."""
    from . import rewards

    if run_id is not None:
        sources = store.get_run(db, run_id)["config"].get("reward_sources")
        if sources:
            return sources
    return store.get_setting(db, "reward_sources") or rewards.demo_preset()


reward_sources = judged_sources  # the name the quick trial, the compare view and older callers use


def reward_scale(sources: list[dict]) -> float | None:
    """The reward's own scale: every source scores on a unit scale (a rule in [0, 1] or [-1, 0], one
    offence of a penalty, one logit of a reward model), so the scale is the sum of |weight|."""
    scale = sum(abs(s.get("weight", 1.0)) for s in sources)
    return scale or None


def gather(db, run_id: int | None = None) -> Evidence:
    """Everything :func:`advise` needs, read from the project. `run_id`: the shaping run to judge, or None."""
    sources = judged_sources(db, run_id)
    base, rules = gather_base(db, sources)
    return Evidence(
        risk_tolerance=store.get_setting(db, "risk_tolerance", "medium"),
        base_samples=base, rules_checked=rules, reward_scale=reward_scale(sources),
        run=gather_run(db, run_id, sources) if run_id is not None else None,
        labelled_pairs=len(store.labelled_pairs(db)), imported_pairs=db["pairs"].count)


def rule_results(sources: list[dict], text: str) -> tuple[dict[str, float], float | None]:
    """({rule name: score}, total reward or None when a source needs a model or a tokenizer)."""
    from . import rewards

    parsed = [rewards.source_from_json(s) for s in sources]
    scores, total = {}, 0.0
    for name, source in zip(rewards.source_names(parsed), parsed):
        if not isinstance(source, rewards.Rule) or getattr(source, "unit", "words") == "tokens":
            total = None
            continue
        scores[name] = source.score(text, None)
        if total is not None:
            total += source.weight * scores[name]
    return scores, total


def broken_rules(sources: list[dict], scores: dict[str, float]) -> list[str]:
    """The rules a sample clearly fails, as the reward sees them: a rule with a negative weight is
    one the reward wants broken (a penalty turned into "more of this phrase is better"), so missing
    what it counts is the violation; a rule with zero weight never counts."""
    from . import rewards

    parsed = [rewards.source_from_json(s) for s in sources]
    return [name for name, source in zip(rewards.source_names(parsed), parsed)
            if name in scores and source.weight * (scores[name] - violation_threshold(source)) < 0]


def gather_base(db, sources: list[dict]) -> tuple[list[BaseSample], list[str]]:
    """The base's samples at temperature > 0, judged with `sources`: rules are scored again here
    (cheap, no model), so a base sampled under other sources is judged on the run's own."""
    from . import rewards

    try:
        parsed = [rewards.source_from_json(x) for x in sources]
    except (rewards.RewardError, TypeError):
        return [], []  # sources no longer valid: the base cannot be judged on them
    rules = [name for name, source in zip(rewards.source_names(parsed), parsed) if isinstance(source, rewards.Rule)]
    samples = []
    for row in store.samples(db, None):
        if not is_sampled(row):
            continue
        scores, total = rule_results(sources, row["text"])
        if total is None:
            total = row["scores"].get("reward")
        samples.append(BaseSample(row["prompt_id"], row["text"], broken_rules(sources, scores), total))
    return samples, rules


def shaping_runs(db) -> list[dict]:
    """The shaping runs (PPO, GRPO, RLOO) the advisor can judge, newest first, with their checkpoint count."""
    marks = ",".join("?" * len(SHAPING_METHODS))
    return list(db.query(
        "SELECT runs.id, runs.name, runs.method, runs.status, COUNT(checkpoints.id) AS checkpoints FROM runs "
        f"LEFT JOIN checkpoints ON checkpoints.run_id = runs.id WHERE runs.method IN ({marks}) "
        "GROUP BY runs.id ORDER BY runs.id DESC", list(SHAPING_METHODS)))


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


def clean_series(metrics: dict, names: tuple[str, ...]) -> tuple[str, Series]:
    """(name, series) of the first of `names` with finite values; NaN and NULL points dropped."""
    for name in names:
        steps, values = metrics.get(name, ([], []))
        kept = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
        if kept:
            return name, ([s for s, _ in kept], [v for _, v in kept])
    return names[0], ([], [])


def wins_against(games: list[tuple], state, earlier: set) -> tuple[float, int]:
    """(wins, games) of `state` against any of the `earlier` states, over labelled games."""
    won, played = 0.0, 0
    for state_a, state_b, score_a in games:
        if state_a == state and state_b in earlier:
            won, played = won + score_a, played + 1
        elif state_b == state and state_a in earlier:
            won, played = won + 1 - score_a, played + 1
    return won, played


def label_quality(games: list[tuple], start_states: set) -> dict:
    """state -> Bradley-Terry score minus the start state's, with its standard error (labelling's fit)."""
    players = list(dict.fromkeys(p for a, b, _ in games for p in (a, b)))
    start = next((p for p in players if p in start_states), None)
    if start is None:
        return {}
    scores, errors = labelling.bradley_terry(labelling.win_matrix(players, games))
    i0 = players.index(start)
    return {p: Estimate(float(scores[i] - scores[i0]), float(math.hypot(errors[i], errors[i0])))
            for i, p in enumerate(players)}


def gather_run(db, run_id: int, sources: list[dict] | None = None) -> RunEvidence:
    from .runs import checkpoint_chain  # imports torch: only here, so the panel imports this module fast

    run = store.get_run(db, run_id)
    metrics = store.run_metrics(db, run_id)
    reward_metric, reward = clean_series(metrics, RAW_REWARD_METRICS)
    kl_metric, kl = clean_series(metrics, KL_METRICS)
    parent = run["parent_checkpoint_id"]
    stored = store.checkpoints(db, run_id)
    zero = next((c for c in stored if c["step"] == 0), None)
    if zero is not None:
        start_outputs, start_label = greedy_outputs(db, zero["id"]), "the start (step 0)"
    elif parent is None:
        start_outputs, start_label = base_reference_outputs(db), "the base"
    else:
        start_outputs = greedy_outputs(db, parent)
        start_label = labelling.describe_state(db, parent)
    games = labelling.games(db)
    start_states = {labelling.BASE if parent is None else parent, *([zero["id"]] if zero else [])}
    earlier = {labelling.BASE, *start_states, *(c["id"] for c in checkpoint_chain(db, parent))}
    quality = label_quality(games, start_states)
    checkpoints = []
    for checkpoint in stored:
        if checkpoint["step"] == 0:
            continue
        won, played = wins_against(games, checkpoint["id"], earlier)
        checkpoints.append(CheckpointEvidence(
            checkpoint["id"], checkpoint["step"], greedy_outputs(db, checkpoint["id"]), won, played,
            available=store.checkpoint_folder(db, checkpoint).is_dir(), quality=quality.get(checkpoint["id"])))
        earlier.add(checkpoint["id"])
    return RunEvidence(
        run_id, run["name"] or f"run #{run_id}", reward_metric, reward, kl,
        start_outputs, start_label, checkpoints, parent, settling_run(db, [c["id"] for c in stored]),
        entropy=clean_series(metrics, ENTROPY_METRICS)[1], length=clean_series(metrics, LENGTH_METRICS)[1],
        sources=sources if sources is not None else judged_sources(db, run_id), status=run["status"],
        per_token_metrics=kl_metric == "kl")


SETTLING_STATUSES = ("running", "paused", "completed", "stopped")  # queued or failed: the switch is not made


def settling_run(db, checkpoint_ids: list[int]) -> tuple[int, int] | None:
    """(run id, checkpoint id) of the newest DPO run that started (or finished) from one of these checkpoints."""
    if not checkpoint_ids:
        return None
    rows = list(db.query(
        f"SELECT id, parent_checkpoint_id FROM runs WHERE method = 'dpo' AND status IN "
        f"({','.join('?' * len(SETTLING_STATUSES))}) AND parent_checkpoint_id IN "
        f"({','.join('?' * len(checkpoint_ids))}) ORDER BY id DESC LIMIT 1", [*SETTLING_STATUSES, *checkpoint_ids]))
    return (rows[0]["id"], rows[0]["parent_checkpoint_id"]) if rows else None


# --- actions: sample the base, and the switch ---------------------------------------------------

# The base's own behaviour at PPO's default rollout temperature (ppo.Config.temperature), not greedy:
# at 1.0 every model looks varied, and PPO never samples that hot. sample_base uses the judged run's.
SAMPLING = {"max_new_tokens": 64, "temperature": 0.7, "top_p": 1.0}
BASE_SAMPLES = 4  # samples per eval prompt: enough for a spread, cheap enough to wait for
SAMPLING_PHASE = "Sampling the base"  # the progress phase of sample_base
TRIAL_STEPS = 20
LABEL_PROMPTS = 16  # prompts sampled for a label batch from a checkpoint


def violation_threshold(source) -> float:
    """A sample breaks a rule when the rule scores below this (rewards.py's scales)."""
    if source.type == "repetition":
        return -0.2  # a fifth of the n-grams repeated
    if source.type == "forbidden_words" or (source.type == "regex" and source.forbid):
        return -0.5  # penalties: minus the count of offences, so any offence
    return 0.5  # rules scoring in [0, 1]: failed, or less than half met


def score_samples(db, prompts: list, texts: list[str], tokenizer, device: str,
                  sources: list[dict] | None = None) -> list[dict]:
    """Per text: the total reward, each rule's score and the rules it breaks (`sources`: the judged
    run's, default the project's)."""
    from . import rewards

    sources = sources if sources is not None else judged_sources(db)
    function = rewards.RewardFunction(sources, tokenizer, rewards.project_folder(db), device)
    total, breakdown = function(prompts, texts)
    rules = {name for name, source in zip(function.names, function.sources) if isinstance(source, rewards.Rule)}
    scored = []
    for index in range(len(texts)):
        rule_scores = {name: float(breakdown[name][index]) for name in function.names if name in rules}
        scored.append({"reward": float(total[index]), "rule_scores": rule_scores,
                       "broken_rules": broken_rules(sources, rule_scores)})
    return scored


def sampling_decoding(**changes):
    from .generation import Decoding  # imports torch

    return Decoding(**{**SAMPLING, **changes})


def base_sampling(db, run_id: int | None = None) -> dict:
    """The decoding settings the base is sampled with: SAMPLING at the judged run's rollout temperature and top-p."""
    config = store.get_run(db, run_id)["config"] if run_id is not None else {}
    return {**SAMPLING, **{k: config[k] for k in ("temperature", "top_p") if k in config}}


def sample_base(target, k: int = BASE_SAMPLES, decoding=None, device: str = "cpu", run_id: int | None = None,
                on_progress: Progress = ignore, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Sample every eval prompt k times from the base (seeds 0..k-1) plus once greedily; store them
    with their scores from the judged run's reward sources (what the base's messiness is judged on),
    at that run's rollout temperature and top-p.

    `target` is a project path or a database. The samples replace earlier ones with the same decoding
    settings. Returns how many samples were stored: 0 when `should_stop()` turned true (checked after
    each batch of prompts; nothing is stored then, the earlier samples stay). `on_progress` counts the
    samples generated. Runs the model: call it from a worker.
    """
    from dataclasses import replace

    from .compare import GenerationCancelled
    from .generation import Decoding, generate
    from .runs import load_model_state

    if isinstance(target, (str, Path)):  # a path: a connection of this thread, closed after
        db = store.connect(target)
        try:
            return sample_base(db, k, decoding, device, run_id, on_progress, should_stop)
        finally:
            db.close()
    db = target
    if decoding is None:
        decoding = sampling_decoding(**base_sampling(db, run_id))
    sources = judged_sources(db, run_id)
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
    total = len(decodings) * len(prompts)
    on_progress(SAMPLING_PHASE, 0, total)

    def batch_done(first: int, generations: list) -> None:
        on_progress(SAMPLING_PHASE, len(rows) + first + len(generations), total)
        if should_stop():
            raise GenerationCancelled()  # generate() has no other way out between batches

    for sample_index, each in decodings:
        try:
            generations = generate(model, tokenizer, [p["prompt"] for p in prompts], each, on_batch=batch_done)
        except GenerationCancelled:
            return 0
        scores = score_samples(db, [p["prompt"] for p in prompts], [g.text for g in generations],
                               tokenizer, device, sources)
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
                                limit: int = LABEL_PROMPTS, decoding=None, device: str = "cpu") -> list[int]:
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


def dpo_config(db, checkpoint_id: int | None, overrides: dict | None = None):
    """The config of a DPO run whose starting policy and reference are `checkpoint_id` (None: the base),
    with the defaults for the project model's size.

    It trains on the project's labelled pairs and every imported preference dataset, unless
    `overrides` says otherwise.
    """
    from . import runs
    from .models import model_parameters

    settings = {"include_labels": True, **(overrides or {}), "parent_checkpoint_id": checkpoint_id}
    return runs.make_config("dpo", settings, model_parameters(db))


def start_dpo_from_checkpoint(db, checkpoint_id: int | None, overrides: dict | None = None,
                              name: str | None = None) -> int:
    """Queue the DPO run of :func:`dpo_config`. Returns the run id (queued: the caller starts it)."""
    from . import runs

    config = dpo_config(db, checkpoint_id, overrides)
    return runs.create_run(db, config, name=name or f"DPO from {state_name(db, checkpoint_id)}")


def trial_method(judged_method: str | None) -> str:
    """The shaping method of a quick trial: the judged run's own (a GRPO run gets a GRPO trial), PPO
    when no shaping run is judged."""
    return judged_method if judged_method in SHAPING_METHODS else "ppo"


def create_quick_trial(db, start_checkpoint_id: int | None = None, steps: int = TRIAL_STEPS,
                       shaping_overrides: dict | None = None, dpo_overrides: dict | None = None,
                       judged_run_id: int | None = None) -> tuple[int, int]:
    """Two short runs from the same start, shaping and DPO, to compare side by side on the eval prompts.

    The shaping run uses the method (see :func:`trial_method`) and the reward sources of the judged run:
    `judged_run_id`, else the run the start checkpoint belongs to; the project's sources when there is
    none. DPO trains on the labelled and imported pairs. Same seed, same length, same checkpoint
    interval, so their eval samples line up step by step. Returns (shaping run id, DPO run id), both
    queued; the shaping run's name says its method.
    """
    from . import runs
    from .models import model_parameters

    shared = {"max_steps": steps, "checkpoint_every": max(1, steps // 4), "seed": 0,
              "parent_checkpoint_id": start_checkpoint_id}
    where = state_name(db, start_checkpoint_id)
    if judged_run_id is None and start_checkpoint_id is not None:
        judged_run_id = store.get_checkpoint(db, start_checkpoint_id)["run_id"]
    method = trial_method(store.get_run(db, judged_run_id)["method"] if judged_run_id is not None else None)
    sources = judged_sources(db, judged_run_id)
    parameters = model_parameters(db)
    shaping_config = runs.make_config(method, {**shared, "reward_sources": sources, **(shaping_overrides or {})},
                                      parameters)
    dpo_config = runs.make_config("dpo", {"include_labels": True, **shared, **(dpo_overrides or {})}, parameters)
    with db.atomic():  # both or neither: a trial with one side is no comparison
        shaping_id = runs.create_run(db, shaping_config, name=f"Trial {method.upper()} from {where}")
        dpo_id = runs.create_run(db, dpo_config, name=f"Trial DPO from {where}")
    return shaping_id, dpo_id


def state_name(db, checkpoint_id: int | None) -> str:
    return labelling.describe_state(db, labelling.BASE if checkpoint_id is None else checkpoint_id)
