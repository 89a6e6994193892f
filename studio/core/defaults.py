"""Training defaults per method and model size, in one place: the engines' Config defaults, the
window's run setup and the CLI all read them from here. The small-model values were chosen by a
sweep on the demo model (SmolLM2-135M, CPU); docs/defaults.md has the table and the commands.

Also here: :func:`no_progress`, the run's own "PPO is not shaping anything yet" check, a pure
function of the reward series so the loop, the CLI and tests share it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

SHAPING_METHODS = ("ppo", "grpo", "rloo")  # reward-driven methods: they sample their start state at step 0

# Upper bounds (parameters) of each size class; the demo model (135 M) is "small".
SIZE_CLASSES = (("small", 500_000_000), ("medium", 4_000_000_000), ("large", math.inf))

# Only the "small" row is measured (docs/defaults.md). Larger models take smaller LoRA steps: the
# medium and large rows follow the usual LoRA practice (1e-4 to 2e-5 for 1-8 B models) and are
# starting points, not measurements.
DEFAULTS: dict[str, dict[str, dict]] = {
    "ppo": {"small": {"learning_rate": 3e-4, "kl_coef": 0.05},
            "medium": {"learning_rate": 1e-4, "kl_coef": 0.05},
            "large": {"learning_rate": 3e-5, "kl_coef": 0.05}},
    "dpo": {"small": {"learning_rate": 2e-4},
            "medium": {"learning_rate": 2e-5},
            "large": {"learning_rate": 1e-5}},
}


def size_class(parameters: int | None) -> str:
    """The size class of a model with this many parameters; None (unknown) counts as small."""
    if parameters is None:
        return "small"
    return next(name for name, limit in SIZE_CLASSES if parameters <= limit)


def defaults_for(method: str, parameters: int | None = None) -> dict:
    """The measured defaults of `method` for a model of this size ({} for a method without any)."""
    return dict(DEFAULTS.get(method, {}).get(size_class(parameters), {}))


def small(method: str, key: str):
    """The small-model default of one setting: what an engine's Config declares as its default."""
    return DEFAULTS[method]["small"][key]


# --- the run's own "no progress" check ----------------------------------------------------------

NO_PROGRESS_MIN_STEPS = 15  # fewer steps than this cannot tell a slow start from a flat one
NO_PROGRESS_WINDOW = 5  # steps averaged at each end of the series
NO_PROGRESS_NOISE_SIGMAS = 2.0  # a gain smaller than this many standard errors is noise


@dataclass(frozen=True)
class Progress:
    moving: bool  # the reward moved beyond noise (up or down)
    message: str  # plain words for the status line; "" while moving or too early to tell


def no_progress(rewards: list[float], method: str = "PPO") -> Progress:
    """Has the reward moved beyond noise? `rewards`: the mean reward of each step, in order.

    Compares the mean of the last NO_PROGRESS_WINDOW steps with the mean of the first ones; the
    change counts as noise when it is under NO_PROGRESS_NOISE_SIGMAS standard errors of that
    difference (step-to-step spread of both windows). Too few steps: moving, no message.
    """
    if len(rewards) < NO_PROGRESS_MIN_STEPS:
        return Progress(True, "")
    first, last = rewards[:NO_PROGRESS_WINDOW], rewards[-NO_PROGRESS_WINDOW:]
    change = statistics.fmean(last) - statistics.fmean(first)
    standard_error = math.sqrt((statistics.variance(first) + statistics.variance(last)) / NO_PROGRESS_WINDOW)
    if abs(change) > NO_PROGRESS_NOISE_SIGMAS * standard_error:
        return Progress(True, "")
    return Progress(False, (
        f"{method} is not shaping anything yet: reward flat since step 1 ({statistics.fmean(first):.2f} "
        f"over the first {NO_PROGRESS_WINDOW} steps, {statistics.fmean(last):.2f} over the last "
        f"{NO_PROGRESS_WINDOW}, within noise of ±{NO_PROGRESS_NOISE_SIGMAS * standard_error:.2f}) after "
        f"{len(rewards)} steps; try a higher learning rate or check the reward"))
