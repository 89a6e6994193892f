"""Chart data without Qt: growing buffers, per-run metric tables, debiased EMA, x-axis choices.

The charts panel keeps one :class:`RunData` per run. Each step record becomes one row; every
metric is a column (NaN where a step did not log it), so any metric can be drawn against any
x-axis column (step, samples seen, wall time, KL) without re-aligning anything.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHART_MIN_WIDTH = 340  # a live chart's size in the dashboard (pixels)
CHART_HEIGHT = 210

# --- metric groups, titles and units -----------------------------------------------------------

# Dashboard sections in display order; a metric not listed (nor matched by a prefix) goes to "Other".
METRIC_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("Loss", ("loss", "loss/policy_avg", "loss/value_avg")),
    ("Reward", ("objective/rlhf_reward", "objective/scores", "objective/non_score_reward", "reward", "reward_std",
                "frac_reward_zero_std")),
    ("Margins and accuracy", ("rewards/margins", "rewards/accuracies")),
    ("Chosen and rejected rewards", ("rewards/chosen", "rewards/rejected")),
    ("Log-probs", ("logps/chosen", "logps/rejected")),
    ("KL", ("objective/kl", "kl_coef", "policy/approxkl_avg", "kl")),
    ("Entropy", ("objective/entropy", "entropy")),
    ("Clipping", ("policy/clipfrac_avg", "val/clipfrac_avg", "val/ratio")),
    ("Responses", ("response_length_mean", "stop_token_rate")),
    ("Optimisation", ("grad_norm", "learning_rate")),
    ("Throughput", ("tokens_per_second", "step_seconds", "time/generation", "time/scoring",
                    "time/training")),
    ("Memory", ("memory/peak_mb",)),
    ("Progress", ("samples_seen", "epoch", "rollouts_per_process")),
    ("Other", ()),
]
GROUP_PREFIXES = {"reward/": "Reward", "rewards/": "Reward",  # per reward source: PPO reward/<s>, GRPO/RLOO rewards/<s>/*
                  "clip_ratio/": "Clipping", "completions/": "Responses"}

# Left-axis label per metric: (text, SI unit or None). An SI unit lets pyqtgraph scale ticks (s -> ms).
METRIC_UNITS: dict[str, tuple[str, str | None]] = {
    "tokens_per_second": ("tokens/s", None),
    "step_seconds": ("time", "s"),
    "time/generation": ("time", "s"),
    "time/scoring": ("time", "s"),
    "time/training": ("time", "s"),
    "memory/peak_mb": ("MB", None),
    "response_length_mean": ("tokens", None),
    "stop_token_rate": ("fraction", None),
    "rewards/accuracies": ("fraction", None),
    "policy/clipfrac_avg": ("fraction", None),
    "val/clipfrac_avg": ("fraction", None),
    "objective/kl": ("nats", None),
    "policy/approxkl_avg": ("nats", None),
    "objective/entropy": ("nats", None),
    "kl": ("nats per token", None),
    "entropy": ("nats", None),
    "completions/mean_length": ("tokens", None),
    "completions/clipped_ratio": ("fraction", None),
    "logps/chosen": ("log-prob (nats)", None),
    "logps/rejected": ("log-prob (nats)", None),
    "samples_seen": ("samples", None),
    "rollouts_per_process": ("rollouts", None),
}

# x-axis choices: key -> axis label (text, SI unit or None).
X_AXES: dict[str, tuple[str, str | None]] = {
    "step": ("step", None),
    "samples": ("samples seen", None),
    "wall": ("wall time", "s"),
    "kl": ("KL from base (nats)", None),
}
X_AXIS_NAMES = {"step": "Step", "samples": "Samples seen", "wall": "Wall time", "kl": "KL from base"}
MONOTONIC_AXES = {"step", "samples", "wall"}  # KL goes up and down, so it cannot be clipped by x

# Tableau 10, as in matplotlib and most dashboards; a run's colour depends on its id only.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def group_of(metric: str) -> str:
    for group, names in METRIC_GROUPS:
        if metric in names:
            return group
    for prefix, group in GROUP_PREFIXES.items():
        if metric.startswith(prefix):
            return group
    return "Other"


def sort_key(metric: str) -> tuple[int, int, str]:
    """Order of charts: by group, then as listed in the group, then by name."""
    group = group_of(metric)
    index = [g for g, _ in METRIC_GROUPS].index(group)
    names = dict(METRIC_GROUPS)[group]
    return index, names.index(metric) if metric in names else len(names), metric


def run_colour(run_id: int) -> str:
    return PALETTE[(run_id - 1) % len(PALETTE)]


# --- growing buffer ----------------------------------------------------------------------------

class GrowingArray:
    """A float64 array with amortised O(1) append: capacity doubles when full."""

    def __init__(self, capacity: int = 256, fill: float = math.nan, length: int = 0) -> None:
        self._buffer = np.empty(max(capacity, length, 1))
        self._buffer[:length] = fill
        self._length = length

    def __len__(self) -> int:
        return self._length

    @property
    def data(self) -> np.ndarray:
        """A view of the values (no copy; valid until the next append)."""
        return self._buffer[:self._length]

    @property
    def capacity(self) -> int:
        return len(self._buffer)

    def append(self, value: float) -> None:
        self._reserve(self._length + 1)
        self._buffer[self._length] = value
        self._length += 1

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=float)
        self._reserve(self._length + len(values))
        self._buffer[self._length:self._length + len(values)] = values
        self._length += len(values)

    def truncate(self, length: int) -> None:
        self._length = min(length, self._length)

    def _reserve(self, needed: int) -> None:
        if needed > len(self._buffer):
            grown = np.empty(max(needed, 2 * len(self._buffer)))
            grown[:self._length] = self._buffer[:self._length]
            self._buffer = grown


# --- smoothing ---------------------------------------------------------------------------------

def ema(values: np.ndarray, weight: float, last: float = 0.0, count: int = 0
        ) -> tuple[np.ndarray, float, int]:
    """Debiased exponential moving average, as TensorBoard and W&B smooth curves.

    last_t = weight * last_{t-1} + (1 - weight) * v_t, shown as last_t / (1 - weight**t), so the
    first point equals the first value instead of starting near zero. (last, count) carry the state
    over from a previous call, so a live curve is smoothed only for its new points. Values must be
    finite. Returns (smoothed, last, count).
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0 or weight <= 0:
        return values.copy(), (float(values[-1]) if n else last), count + n
    # last_t = sum_i w^(t-i) (1-w) v_i + w^(t+1) last: a linear recurrence, solved by a prefix
    # scan in log2(n) vectorised passes (a Python loop over 200k points would take ~0.1 s).
    acc = (1.0 - weight) * values
    shift, factor = 1, weight
    while shift < n and factor > 1e-18:  # beyond that the older terms no longer change a float64
        acc[shift:] += factor * acc[:-shift]  # the right side is computed first: no overlap
        shift, factor = 2 * shift, factor * factor
    log_powers = np.arange(1, n + 1) * math.log(weight)  # exp(k log w) is ~6x faster than w**k
    acc += last * np.exp(log_powers)
    debias = -np.expm1(log_powers + count * math.log(weight))  # 1 - w^(count+k)
    return acc / debias, float(acc[-1]), count + n


class EmaCache:
    """The smoothed version of one growing column, extended incrementally as rows arrive."""

    def __init__(self) -> None:
        self._key: tuple[float, int] | None = None
        self._out = GrowingArray()
        self._last, self._count = 0.0, 0

    def smooth(self, values: np.ndarray, weight: float, revision: int) -> np.ndarray:
        """Smoothed `values` (NaN stays NaN and does not move the average)."""
        if self._key != (weight, revision) or len(values) < len(self._out):
            self._key = (weight, revision)
            self._out = GrowingArray(capacity=len(values))
            self._last, self._count = 0.0, 0
        new = values[len(self._out):]
        finite = np.isfinite(new)
        smoothed = np.full(len(new), math.nan)
        smoothed[finite], self._last, self._count = ema(new[finite], weight, self._last, self._count)
        self._out.extend(smoothed)
        return self._out.data


# --- per-run metric table ----------------------------------------------------------------------

@dataclass
class Curve:
    """What one chart draws for one run: the points where both x and the value are finite."""

    run_id: int
    run_name: str
    metric: str
    steps: np.ndarray
    x: np.ndarray
    raw: np.ndarray
    smoothed: np.ndarray | None  # None when smoothing is off


@dataclass
class RunData:
    """One run's step records as columns. `revision` changes when rows are dropped (a resume)."""

    run_id: int
    name: str = ""
    beta: float | None = None  # DPO's beta, for the KL x-axis
    from_store: bool = False  # loaded from the store (else it holds only live records)
    revision: int = 0
    steps: GrowingArray = field(default_factory=GrowingArray)
    times: GrowingArray = field(default_factory=GrowingArray)
    columns: dict[str, GrowingArray] = field(default_factory=dict)
    _smoothers: dict[str, EmaCache] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or f"Run {self.run_id}"

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last_step(self) -> int | None:
        return int(self.steps.data[-1]) if len(self.steps) else None

    def metric_names(self) -> list[str]:
        return sorted(self.columns, key=sort_key)

    def values(self, metric: str) -> np.ndarray:
        return self.columns[metric].data

    def append(self, record: dict) -> None:
        """Add one step record {"step", "time", name: value...}.

        A step at or before the last one means the run was resumed from a checkpoint and is
        recomputing those steps: the rows from that step on are dropped first, as the store does.
        """
        step = record["step"]
        if len(self.steps) and step <= self.steps.data[-1]:
            self._truncate(int(np.searchsorted(self.steps.data, step)))
        length = len(self.steps)
        self.steps.append(step)
        self.times.append(record.get("time", math.nan))
        for name, value in record.items():
            if name not in ("step", "time") and name not in self.columns:
                self.columns[name] = GrowingArray(capacity=self.steps.capacity, length=length)
        for name, column in self.columns.items():
            value = record.get(name)
            column.append(math.nan if value is None else float(value))

    def extend_after(self, other: "RunData", step: int | None) -> None:
        """Append the rows of `other` that come after `step` (live rows the store has not yet)."""
        start = 0 if step is None else int(np.searchsorted(other.steps.data, step, side="right"))
        for row in range(start, len(other)):
            record = {"step": int(other.steps.data[row]), "time": other.times.data[row]}
            record.update({name: column.data[row] for name, column in other.columns.items()})
            self.append(record)

    def _truncate(self, length: int) -> None:
        for column in (self.steps, self.times, *self.columns.values()):
            column.truncate(length)
        self.revision += 1

    @classmethod
    def from_metrics(cls, run_id: int, metrics: dict[str, tuple[list, list]],
                     step_times: dict[int, float] | None = None, **info) -> "RunData":
        """Build from the store's {name: (steps, values)} and {step: time}."""
        step_times = step_times or {}
        all_steps = np.unique(np.concatenate(
            [np.asarray(steps, dtype=float) for steps, _ in metrics.values()]
            + [np.asarray(list(step_times), dtype=float)]))
        data = cls(run_id=run_id, from_store=True, **info)
        data.steps.extend(all_steps)
        data.times.extend([step_times.get(int(s), math.nan) for s in all_steps])
        for name, (steps, values) in metrics.items():
            column = GrowingArray(capacity=len(all_steps), length=len(all_steps))
            column.data[np.searchsorted(all_steps, np.asarray(steps, dtype=float))] = values
            data.columns[name] = column
        return data

    # --- x-axes and curves ---

    def x_values(self, axis: str) -> np.ndarray | None:
        """The x of every row on `axis`, or None when this run has no usable value for it."""
        if axis == "step":
            return self.steps.data
        if axis == "samples":
            x = self.columns["samples_seen"].data if "samples_seen" in self.columns else None
        elif axis == "wall":
            x = self.times.data - _first_finite(self.times.data)
        elif axis == "kl":
            x = self._kl_from_base()
        else:
            raise ValueError(f"unknown x-axis {axis!r}")
        return x if x is not None and np.isfinite(x).any() else None

    def _kl_from_base(self) -> np.ndarray | None:
        """PPO: objective/kl (nats per response). GRPO, RLOO: kl (nats per token). DPO: mean log-ratio policy/reference of the chosen and rejected
        answers, (rewards/chosen + rewards/rejected) / (2 beta), since rewards/* = beta * log-ratio.
        That is a KL estimate on the preference data, not on the policy's own samples, and it can be
        negative."""
        for name in ("objective/kl", "kl"):
            if name in self.columns:
                return self.columns[name].data
        if {"rewards/chosen", "rewards/rejected"} <= self.columns.keys() and self.beta:
            return (self.values("rewards/chosen") + self.values("rewards/rejected")) / (2 * self.beta)
        return None

    def missing_axis_reason(self, axis: str) -> str:
        return {
            "samples": "no samples_seen logged",
            "wall": "no step times",
            "kl": "no objective/kl or kl, nor rewards/chosen and rewards/rejected with a beta",
        }.get(axis, "no value for this axis")

    def curve(self, metric: str, x: np.ndarray, weight: float) -> Curve | None:
        """The finite points of `metric` against `x` (from x_values), smoothed when weight > 0."""
        raw = self.values(metric)
        smoothed = None
        if weight > 0 and is_noisy(metric):
            smoothed = self._smoothers.setdefault(metric, EmaCache()).smooth(raw, weight, self.revision)
        keep = np.isfinite(x) & np.isfinite(raw)
        steps = self.steps.data
        if not keep.all():  # copies only when needed: live curves are usually complete
            steps, x, raw = steps[keep], x[keep], raw[keep]
            smoothed = None if smoothed is None else smoothed[keep]
        if len(raw) == 0:
            return None
        return Curve(self.run_id, self.name, metric, steps, x, raw, smoothed)


# Schedules and counters: nothing to average, and a smoothed learning rate would misstate the schedule.
NOT_NOISY = {"learning_rate", "epoch", "samples_seen", "memory/peak_mb", "kl_coef", "rollouts_per_process"}


def is_noisy(metric: str) -> bool:
    """Whether a metric is smoothed (a measured quantity), rather than a schedule, counter or data count."""
    return metric not in NOT_NOISY and not metric.startswith("data/")


def _first_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[0]) if len(finite) else math.nan


# --- export ------------------------------------------------------------------------------------

def write_csv(path: Path | str, curves: list[Curve]) -> int:
    """Write run, step, x, value rows (raw values) for each curve; returns the row count."""
    rows = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "x", "value"])
        for curve in curves:
            for step, x, value in zip(curve.steps, curve.x, curve.raw):
                writer.writerow([curve.run_name, int(step), repr(float(x)), repr(float(value))])
                rows += 1
    return rows


def peak_decimate(x: np.ndarray, ys: list[np.ndarray], left: float, right: float, buckets: int
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The points of sorted `x` within [left, right] (and one more each side, so lines reach the
    edges), reduced to the min and max of each of `buckets` runs of points: the same picture at
    one bucket per pixel, for a fraction of the drawing cost. The ys share x and its buckets."""
    start, stop = np.searchsorted(x, [left, right])
    start, stop = max(int(start) - 1, 0), min(int(stop) + 1, len(x))
    size = max((stop - start) // buckets, 1)
    if size < 2:
        return x[start:stop], [y[start:stop] for y in ys]
    whole = start + (stop - start) // size * size  # the points after it form a short last bucket
    x_out = np.concatenate([np.repeat(x[start:whole:size], 2), x[whole:stop]])
    ys_out = []
    for y in ys:
        runs = y[start:whole].reshape(-1, size)
        peaks = np.column_stack([runs.min(axis=1), runs.max(axis=1)]).ravel()
        ys_out.append(np.concatenate([peaks, y[whole:stop]]))
    return x_out, ys_out


def nearest_index(x: np.ndarray, x0: float, monotonic: bool) -> int:
    """Index of the point of `x` nearest to x0 (binary search when x is sorted)."""
    if not monotonic:
        return int(np.argmin(np.abs(x - x0)))
    i = int(np.searchsorted(x, x0))
    if i == 0:
        return 0
    if i == len(x):
        return len(x) - 1
    return i if x[i] - x0 < x0 - x[i - 1] else i - 1
