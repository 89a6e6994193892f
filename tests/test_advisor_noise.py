"""The advisor under noise: heavy-tailed (Student's t) per-step reward noise on synthetic histories,
judged at every checkpoint as the run goes (later metrics left out), with the figures issue 13 sets:
a steadily gaining run is called a switch in under 5% of draws and its verdict never flips back and
forth; a hacking run is never "keep shaping"."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.advisor_histories import heavy_tailed, make_run, varied_text, verdicts_over_time

SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def steady_run(seed: int):
    """Reward gaining 0.01-0.05 per step (at least 0.2 over 20 steps), t noise of scale 0.02-0.1
    with 2, 3 or 5 degrees of freedom; 40-100 steps, a checkpoint every 5 or 10."""
    rng = random.Random(seed)
    slope, scale, dof = rng.uniform(0.01, 0.05), rng.uniform(0.02, 0.1), rng.choice([2, 3, 5])
    every, steps = rng.choice([5, 10]), rng.choice([40, 60, 100])
    return make_run(lambda s: slope * s, steps=steps, every=every,
                    noise=lambda s: heavy_tailed(rng, scale, dof))


def flips(verdicts: list[str]) -> int:
    """How often a verdict comes back right after being left (A, B, A)."""
    return sum(a == c != b for a, b, c in zip(verdicts, verdicts[1:], verdicts[2:]))


def test_a_steadily_gaining_run_is_called_a_switch_in_under_five_percent_of_draws():
    draws = [verdicts_over_time(steady_run(seed)) for seed in range(60)]
    switched = sum("switch_now" in verdicts for verdicts in draws)
    assert switched / len(draws) < 0.05
    assert all(verdicts[-1] == "keep_ppo" for verdicts in draws if "switch_now" not in verdicts)


@SLOW
@given(st.integers(min_value=1000, max_value=10 ** 6))
def test_the_verdict_of_a_steady_run_never_flips_back_and_forth(seed):
    assert flips(verdicts_over_time(steady_run(seed))) == 0


@SLOW
@given(seed=st.integers(min_value=0, max_value=10 ** 6), onset=st.integers(min_value=2, max_value=8),
       kind=st.sampled_from(["repeats", "longer", "labels"]))
def test_a_hacking_run_is_never_keep_shaping_once_the_damage_shows(seed, onset, kind):
    """Reward keeps rising (noisily) while, from checkpoint `onset` on, answers repeat a phrase, grow
    far longer, or lose to earlier states in labels."""
    rng = random.Random(seed)

    def outputs(p, i):
        if kind == "repeats" and i >= onset:
            return " ".join(["the best answer"] * 8)
        if kind == "longer" and i >= onset:
            return varied_text(p, i, length=30 + 4 * (i - onset))
        return varied_text(p, i)

    run = make_run(lambda s: 0.02 * s, steps=60, every=5, outputs=outputs,
                   noise=lambda s: heavy_tailed(rng, 0.05, 3),
                   wins=lambda i: (1.0, 16) if kind == "labels" and i >= onset else (0.0, 0))
    verdicts = verdicts_over_time(run)
    assert "keep_ppo" not in verdicts[onset:]
