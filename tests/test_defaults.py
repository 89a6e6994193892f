"""Defaults per method and model size (studio/core/defaults.py) and the run's no-progress check."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from studio.core import defaults, dpo, ppo, runs

# Issue 19's 40-step run at the old defaults had 10-step window means 1.09, 1.08, 1.15, 1.08; its
# per-step values were not published, so these are made up around exactly those window means.
FLAT_RUN = [1.02, 1.16, 1.09, 1.11, 1.07, 1.04, 1.13, 1.10, 1.06, 1.12,
            1.05, 1.11, 1.08, 1.02, 1.14, 1.07, 1.09, 1.10, 1.06, 1.08,
            1.21, 1.10, 1.12, 1.18, 1.15, 1.09, 1.17, 1.13, 1.20, 1.15,
            1.04, 1.11, 1.07, 1.12, 1.06, 1.10, 1.03, 1.09, 1.13, 1.05]


def test_engines_declare_the_small_model_defaults():
    assert ppo.Config().learning_rate == defaults.DEFAULTS["ppo"]["small"]["learning_rate"] == 3e-4
    assert ppo.Config().kl_coef == defaults.DEFAULTS["ppo"]["small"]["kl_coef"]
    assert dpo.Config().learning_rate == defaults.DEFAULTS["dpo"]["small"]["learning_rate"]


def test_size_classes_split_at_their_limits():
    assert defaults.size_class(None) == "small"
    assert defaults.size_class(135_000_000) == "small"
    assert defaults.size_class(500_000_001) == "medium"
    assert defaults.size_class(7_000_000_000) == "large"


def test_make_config_takes_the_model_sizes_defaults_and_overrides_win():
    assert runs.make_config("ppo", parameters=1_500_000_000).learning_rate == 1e-4
    assert runs.make_config("dpo", parameters=8_000_000_000).learning_rate == 1e-5
    assert runs.make_config("ppo", {"learning_rate": 0.5}, parameters=1_500_000_000).learning_rate == 0.5
    assert runs.make_config("ppo").learning_rate == 3e-4


def test_the_issues_flat_run_is_called_flat_in_plain_words():
    progress = defaults.no_progress(FLAT_RUN)
    assert not progress.moving
    assert progress.message.startswith("PPO is not shaping anything yet: reward flat since step 1")
    assert "try a higher learning rate or check the reward" in progress.message
    assert "after 40 steps" in progress.message


def test_a_rising_reward_is_progress():
    rising = [1.0 + 0.02 * step + (0.05 if step % 2 else -0.05) for step in range(30)]
    assert defaults.no_progress(rising) == defaults.Progress(True, "")


def test_too_few_steps_say_nothing():
    assert defaults.no_progress([1.0] * (defaults.NO_PROGRESS_MIN_STEPS - 1)).moving
    assert not defaults.no_progress([1.0] * defaults.NO_PROGRESS_MIN_STEPS).moving


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), level=st.floats(-5, 5), noise=st.floats(0.01, 0.3))
def test_a_gain_of_ten_noise_widths_is_always_progress_whatever_the_level(seed, level, noise):
    draw = random.Random(seed)
    steps = 30
    rewards = [level + draw.uniform(-noise, noise) + 10 * noise * step / (steps - 1) for step in range(steps)]
    assert defaults.no_progress(rewards).moving


def test_the_run_logs_no_progress_at_a_checkpoint(project, make_toy_run):
    run_id = make_toy_run(max_steps=20, checkpoint_every=10, rewards=[1.0, 1.1, 0.9, 1.05, 0.95])
    logged = []
    assert runs.execute(project.path, run_id, on_log=logged.append) == "completed"
    flat = [m for m in logged if "is not shaping anything yet" in m]
    assert len(flat) == 1 and flat[0].startswith("TOY is not shaping anything yet: reward flat since step 1")
    assert "after 20 steps" in flat[0]


def test_a_run_whose_reward_climbs_logs_no_warning(project, make_toy_run):
    run_id = make_toy_run(max_steps=20, checkpoint_every=10, rewards=[0.1 * step for step in range(20)])
    logged = []
    runs.execute(project.path, run_id, on_log=logged.append)
    assert not [m for m in logged if "not shaping" in m]
