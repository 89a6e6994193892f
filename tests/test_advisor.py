"""The stage advisor: measures and statistics against hand-computed numbers, one verdict per
hand-made history, gathering from the store (NaN metrics, run statuses, deleted folders), and the
switch from a PPO checkpoint to DPO end to end on the tiny model."""

import math
import random
import shutil
import time
from dataclasses import replace

import pytest

from tests.advisor_histories import PROMPTS, make_run, varied_text
from studio.core import advisor, store
from studio.core.advisor import BaseSample, Evidence
from studio.core.advisor_stats import (Estimate, gao_fit, gao_peak_kl, jackknife, robust_slope, t_factor,
                                       wilson)


# --- measures -----------------------------------------------------------------------------------

def test_words_split_latin_words_punctuation_and_cjk_characters():
    assert advisor.words("Hi, you 2! 你好") == ["Hi", ",", "you", "2", "!", "你", "好"]
    assert advisor.words("GPT模型") == ["GPT", "模", "型"]


def test_word_edit_distance_is_normalised_by_the_longer_text():
    assert advisor.edit_distance(list("kitten"), list("sitting")) == 3
    assert advisor.word_edit_distance("the cat sat", "the dog sat") == pytest.approx(1 / 3)
    assert advisor.word_edit_distance("a b c d", "a b") == pytest.approx(2 / 4)
    assert advisor.word_edit_distance("", "") == 0.0
    assert advisor.word_edit_distance("x y", "") == 1.0


def test_distinct_n_and_repetition():
    # bigrams: (a b) (b a) (a b) | (c d): 4 in all, 3 unique
    assert advisor.distinct_n(["a b a b", "c d"], 2) == pytest.approx(3 / 4)
    assert advisor.distinct_n(["a"], 2) == 0.0
    # trigrams of "a b c a b c": abc bca cab abc -> 1 of 4 repeats
    assert advisor.repetition("a b c a b c") == pytest.approx(1 / 4)
    assert advisor.repetition("one two three four") == 0.0


def test_refusals_and_empty_outputs():
    assert advisor.is_refusal_or_empty("   ")
    assert advisor.is_refusal_or_empty("I’m sorry, but I can't help with that.")
    assert advisor.is_refusal_or_empty("抱歉,我不能回答。")
    assert not advisor.is_refusal_or_empty("Blue.")
    assert advisor.refusal_rate(["", "Blue.", "As an AI, no.", "Four."]) == 0.5


# --- statistics ---------------------------------------------------------------------------------

def test_robust_slope_has_the_least_squares_error_and_ignores_one_wild_batch():
    xs = [1, 2, 3, 4, 5, 6]
    ys = [1.0, 2.1, 2.9, 4.2, 4.8, 6.0]
    estimate = robust_slope(xs, ys)
    # By hand: both means are 3.5, slope = Sxy / Sxx = 17.2 / 17.5; t(4) / z widens the residual error.
    slope = 17.2 / 17.5
    assert estimate.value == pytest.approx(slope)
    residual_sd = math.sqrt(sum((y - 3.5 - slope * (x - 3.5)) ** 2 for x, y in zip(xs, ys)) / 4)
    assert estimate.se == pytest.approx(t_factor(4) * residual_sd / math.sqrt(17.5), rel=1e-3)
    wild = robust_slope(xs + [7, 8], ys + [40.0, 8.0])  # step 7's batch is far off the line
    assert wild.value == pytest.approx(robust_slope(xs + [8], ys + [8.0]).value)
    assert robust_slope([1, 2, 3], [1, 2, 3]) is None  # too few points for an error


def test_t_factor_matches_students_table():
    assert t_factor(5) * 1.645 == pytest.approx(2.015, abs=0.01)
    assert t_factor(10) * 1.645 == pytest.approx(1.812, abs=0.005)
    assert t_factor(1000) == pytest.approx(1.0, abs=0.002)


def test_wilson_interval_of_two_wins_in_four_is_wide():
    low, high = wilson(2, 4)
    # z = 1.645: centre (0.5 + 0.338) / 1.676, half-width 1.645 * sqrt(0.0625 + 0.0423) / 1.676
    assert low == pytest.approx(0.1822, abs=1e-3) and high == pytest.approx(0.8178, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_jackknife_of_a_mean_is_its_standard_error():
    values = [1.0, 2.0, 4.0, 7.0]
    estimate = jackknife(values, lambda items: sum(items) / len(items))
    assert estimate.value == 3.5
    assert estimate.se == pytest.approx(math.sqrt(sum((v - 3.5) ** 2 for v in values) / 3 / 4))


def test_gao_fit_recovers_the_peak_of_its_own_form():
    # R(d) = d (2 - 1 * log d) peaks at log d = a / b - 1 = 1: d = e, KL = e^2.
    kls = [0.5, 2.0, 5.0, 9.0, 16.0]
    quality = [math.sqrt(k) * (2 - math.log(math.sqrt(k))) for k in kls]
    a, b = gao_fit(kls, quality)
    assert a == pytest.approx(2.0) and b == pytest.approx(1.0)
    assert gao_peak_kl(a, b) == pytest.approx(math.e ** 2)
    assert gao_peak_kl(1.0, -0.5) is None  # still rising: no peak
    assert gao_fit([1.0, 2.0], [0.1, 0.2]) is None


# --- base verdicts --------------------------------------------------------------------------------

def base_samples(broken_share: float, k: int = 4, rewards=None) -> list[BaseSample]:
    """k samples per prompt; the first broken_share of all samples break the "concise" rule."""
    samples = [BaseSample(p, varied_text(p, i)) for p in PROMPTS for i in range(k)]
    for index, sample in enumerate(samples):
        if index < broken_share * len(samples):
            sample.broken_rules = ["concise"]
        sample.reward = rewards(sample.prompt_id, index) if rewards else 1.0
    return samples


def test_a_base_breaking_rules_in_half_its_samples_is_messy():
    advice = advisor.advise(Evidence(base_samples=base_samples(0.5), rules_checked=["concise"], reward_scale=3))
    assert advice.verdict == "ppo_first"


def test_two_slips_in_forty_samples_is_a_clean_base():
    samples = base_samples(0.0, k=4)[:40]
    samples[0].broken_rules = samples[7].broken_rules = ["concise"]
    advice = advisor.advise(Evidence(base_samples=samples, rules_checked=["concise"], reward_scale=3))
    violations = advice.base_signals[0]
    assert violations.value == pytest.approx(2 / 40) and violations.high < 0.20
    assert advice.verdict == "settle_dpo"


def test_a_base_near_the_threshold_needs_more_samples():
    advice = advisor.advise(Evidence(base_samples=base_samples(0.2, k=1)[:20], rules_checked=["concise"],
                                     reward_scale=3))
    assert advice.verdict == "need_evidence"
    assert "more base samples" in advice.missing[0]


def test_reward_spread_is_judged_on_the_rewards_own_scale():
    # Within a prompt the reward swings by 0.05 on a scale of 3: ordinary sampling variety, not mess.
    calm = base_samples(0.0, rewards=lambda p, i: 2.0 + 0.05 * (i % 2))
    advice = advisor.advise(Evidence(base_samples=calm, rules_checked=["concise"], reward_scale=3))
    spread = advice.base_signals[1]
    assert spread.value == pytest.approx(0.025 / 3) and not spread.fires
    assert advice.verdict == "settle_dpo"


def test_no_base_samples_means_sample_the_base():
    advice = advisor.advise(Evidence())
    assert advice.verdict == "need_evidence" and "sample the base" in advice.missing[0]


# --- run verdicts ---------------------------------------------------------------------------------

def noisy(scale: float, seed: int = 0):
    rng = random.Random(seed)
    return lambda step: rng.gauss(0, scale)


def signal(advice, key):
    return next(s for s in advice.run_signals if s.key == key)


def test_a_steadily_gaining_run_keeps_shaping():
    run = make_run(lambda s: 0.02 * s, noise=noisy(0.05))
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "keep_ppo"


def test_a_plateau_switches_to_the_earliest_checkpoint_within_noise_of_the_best():
    run = make_run(lambda s: 1 - math.exp(-s / 8), noise=noisy(0.03), outputs=lambda p, i: varied_text(p, min(i, 5)))
    advice = advisor.advise(Evidence(run=run, labelled_pairs=12))
    assert advice.verdict == "switch_now"
    assert signal(advice, "gain_per_step").fires and signal(advice, "behaviour_change").fires
    # 1 - exp(-s/8) is within 0.03 noise of its top from about step 30: not the latest checkpoint.
    chosen = next(c for c in run.checkpoints if c.checkpoint_id == advice.checkpoint_id)
    assert 20 <= chosen.step <= 40
    assert "12 preference pairs" in advice.explanation


def test_a_linear_raw_reward_is_not_a_plateau_whatever_the_normalised_score_does():
    # The old advisor read objective/scores (normalised): here only the raw reward is given, rising.
    run = make_run(lambda s: 0.01 * s, steps=100, every=10, noise=noisy(0.02))
    assert signal(advisor.advise(Evidence(run=run)), "gain_per_step").value == pytest.approx(1.0, abs=0.3)
    assert advisor.advise(Evidence(run=run)).verdict == "keep_ppo"


def test_the_first_checkpoint_never_switches():
    run = make_run(lambda s: 0.5, steps=5, every=5, outputs=lambda p, i: varied_text(p, "start"))
    advice = advisor.advise(Evidence(run=run))
    assert signal(advice, "gain_per_step").value is None
    assert advice.verdict == "keep_ppo"


def test_reward_hacking_switches_from_the_last_checkpoint_before_damage_that_persisted():
    def outputs(p, i):  # checkpoint 1 dips (repeats itself) and recovers; from checkpoint 6 on it stays broken
        broken = i == 1 or i >= 6
        return " ".join(["great answer"] * 10) if broken else varied_text(p, i)

    run = make_run(lambda s: 0.02 * s, outputs=outputs)
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "switch_now"
    assert signal(advice, "repetition").fires
    assert advice.checkpoint_id == run.checkpoints[5].checkpoint_id


def test_a_run_hacking_from_its_first_checkpoint_goes_back_to_its_start():
    run = make_run(lambda s: 0.02 * s, outputs=lambda p, i: " ".join(["great answer"] * 10))
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "switch_now" and advice.checkpoint_id is None


def test_hacking_from_the_start_on_a_messy_base_is_not_dpo_from_the_base():
    run = make_run(lambda s: 0.02 * s, outputs=lambda p, i: " ".join(["great answer"] * 10))
    advice = advisor.advise(Evidence(run=run, base_samples=base_samples(0.5), rules_checked=["concise"],
                                     reward_scale=1))
    assert advice.verdict == "ppo_first"


def test_damage_just_under_the_threshold_on_most_outputs_is_never_the_target():
    def outputs(p, i):
        if i >= 8:
            return " ".join(["great answer"] * 10)
        if i >= 6:  # every output 42% longer: under high tolerance's 50% threshold, yet damage
            return varied_text(p, i, length=17)
        return varied_text(p, i)

    run = make_run(lambda s: 0.02 * s, outputs=outputs, start={p: varied_text(p, "s") for p in PROMPTS})
    advice = advisor.advise(Evidence(run=run, risk_tolerance="high"))
    assert advice.verdict == "switch_now"
    assert advice.checkpoint_id == run.checkpoints[5].checkpoint_id


def test_a_deleted_checkpoint_folder_is_never_the_target():
    run = make_run(lambda s: 0.02 * s, outputs=lambda p, i: " ".join(["great answer"] * 10) if i >= 6 else varied_text(p, i),
                   available=lambda i: i != 5)
    advice = advisor.advise(Evidence(run=run))
    assert advice.checkpoint_id == run.checkpoints[4].checkpoint_id


def test_kl_blow_up_stops_shaping():
    # Per token: 0.0025 per step until step 30, then growing fast, past medium's 0.3 budget.
    run = make_run(lambda s: 0.02 * s, kl=lambda s: 0.1 * s if s < 30 else 3 + 0.01 * (s - 30) ** 2.5)
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "switch_now"
    assert signal(advice, "kl_per_token").fires
    chosen = next(c for c in run.checkpoints if c.checkpoint_id == advice.checkpoint_id)
    assert chosen.step < 45  # KL per token crosses 0.3 (12 nats) near step 45


def test_kl_within_budget_is_not_a_problem():
    run = make_run(lambda s: 0.02 * s, kl=lambda s: 0.15 * s)  # 0.225 per token at step 60
    advice = advisor.advise(Evidence(run=run))
    assert not signal(advice, "kl_per_token").fires and advice.verdict == "keep_ppo"


def test_entropy_collapse_stops_shaping():
    run = make_run(lambda s: 0.02 * s, entropy=lambda s: 32 * math.exp(-s / 15))
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "switch_now" and signal(advice, "entropy_ratio").fires


def test_reward_falling_from_its_peak_switches_to_the_peak():
    run = make_run(lambda s: 0.04 * s if s < 30 else 1.2 - 0.03 * (s - 30), noise=noisy(0.05))
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "switch_now" and signal(advice, "reward_decline").fires
    chosen = next(c for c in run.checkpoints if c.checkpoint_id == advice.checkpoint_id)
    assert 25 <= chosen.step <= 35


def oscillating_run():
    return make_run(lambda s: 0.01 * s + 0.5 * math.sin(s * math.pi / 10), steps=80, noise=noisy(0.02))


def test_oscillation_switches_at_low_tolerance():
    advice = advisor.advise(Evidence(run=oscillating_run(), risk_tolerance="low"))
    assert advice.verdict == "switch_now" and signal(advice, "oscillation").fires


def test_oscillation_does_not_switch_at_high_tolerance():
    advice = advisor.advise(Evidence(run=oscillating_run(), risk_tolerance="high"))
    assert not signal(advice, "oscillation").fires
    assert signal(advice, "oscillation").value >= 3


def test_shortening_that_a_length_band_asks_for_is_intended():
    run = make_run(lambda s: 0.02 * s, outputs=lambda p, i: varied_text(p, i, max(8, 30 - 3 * i)),
                   start={p: varied_text(p, "s", 30) for p in PROMPTS},
                   sources=[{"type": "length_band", "name": "concise", "min": 5, "max": 15}])
    advice = advisor.advise(Evidence(run=run))
    drift = signal(advice, "length_drift")
    assert drift.value < -0.5 and not drift.fires and "concise" in drift.intended
    assert advice.verdict == "keep_ppo"
    assert any("shorter answers" in reason for reason in advice.intended)


def test_lengthening_against_a_length_band_is_a_side_effect():
    run = make_run(lambda s: 0.02 * s, outputs=lambda p, i: varied_text(p, i, 30 + 5 * i),
                   start={p: varied_text(p, "s", 30) for p in PROMPTS},
                   sources=[{"type": "length_band", "name": "concise", "min": 5, "max": 15}])
    advice = advisor.advise(Evidence(run=run))
    assert signal(advice, "length_drift").fires and advice.verdict == "switch_now"


def test_shortening_to_finish_answers_that_started_cut_off_is_intended():
    # The demo's case: the band (5-60 words) holds both lengths, but the start's answers are cut off
    # mid-sentence and a rule asks for a finished one: they can only finish by getting shorter.
    finished = [{"type": "length_band", "name": "band", "min": 5, "max": 60},
                {"type": "terminal_punctuation", "name": "finished"}]
    run = make_run(lambda s: 0.02 * s, outputs=lambda p, i: varied_text(p, i, max(8, 30 - 3 * i)) + ".",
                   start={p: varied_text(p, "s", 30) for p in PROMPTS}, sources=finished)
    advice = advisor.advise(Evidence(run=run))
    drift = signal(advice, "length_drift")
    assert drift.value < -0.5 and not drift.fires and "finished" in drift.intended
    assert advice.verdict == "keep_ppo"


def test_shortening_is_a_side_effect_when_the_start_already_finished_its_answers():
    finished = [{"type": "length_band", "name": "band", "min": 5, "max": 60},
                {"type": "terminal_punctuation", "name": "finished"}]
    run = make_run(lambda s: 0.02 * s, outputs=lambda p, i: varied_text(p, i, max(8, 30 - 3 * i)) + ".",
                   start={p: varied_text(p, "s", 30) + "." for p in PROMPTS}, sources=finished)
    advice = advisor.advise(Evidence(run=run))
    assert signal(advice, "length_drift").fires and advice.verdict == "switch_now"


def test_refusals_a_safety_rule_targets_are_intended():
    def outputs(p, i):  # from checkpoint 3 on, half the prompts are refused
        return f"I'm sorry, I can't help with {varied_text(p, i, 4)}." if p % 2 and i > 2 else varied_text(p, i)

    run = make_run(lambda s: 0.02 * s, outputs=outputs,
                   sources=[{"type": "required_words", "name": "safety", "words": ["I can't"]}])
    advice = advisor.advise(Evidence(run=run))
    assert signal(advice, "refusals").intended and advice.verdict == "keep_ppo"


def test_two_wins_in_four_labels_is_no_hacking_alarm():
    run = make_run(lambda s: 0.02 * s, wins=lambda i: (2.0, 4))
    advice = advisor.advise(Evidence(run=run))
    assert not signal(advice, "reward_hacking").fires and advice.verdict == "keep_ppo"


def test_a_low_win_rate_with_few_labels_asks_for_more_labels():
    run = make_run(lambda s: 0.02 * s, wins=lambda i: (1.0, 4))
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "need_evidence"
    latest = run.checkpoints[-1]  # named as the run's n-th checkpoint, not by its database id
    assert advice.missing[0].startswith("label ")
    assert f" more pairs of {run.name}, checkpoint {len(run.checkpoints)} (step {latest.step}) against " in advice.missing[0]


def test_labels_that_clearly_prefer_earlier_states_raise_the_hacking_alarm():
    run = make_run(lambda s: 0.02 * s, wins=lambda i: (1.0, 12) if i >= 6 else (0.0, 0))
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "switch_now" and "Reward-hacking alarm" in advice.explanation


def test_a_flat_run_on_a_clean_base_settles_with_dpo():
    run = make_run(lambda s: 0.5, noise=noisy(0.05))
    advice = advisor.advise(Evidence(run=run, base_samples=base_samples(0.0), rules_checked=["concise"],
                                     reward_scale=3))
    assert advice.verdict == "settle_dpo" and "PPO is not shaping anything yet" in advice.explanation


def test_a_flat_run_on_a_messy_base_keeps_ppo_and_says_to_fix_it():
    run = make_run(lambda s: 0.5, noise=noisy(0.05))
    advice = advisor.advise(Evidence(run=run, base_samples=base_samples(0.5), rules_checked=["concise"],
                                     reward_scale=3))
    assert advice.verdict == "keep_ppo" and "try a higher learning rate" in advice.explanation


def test_no_progress_speaks_only_after_enough_flat_steps():
    steps = list(range(1, 31))
    flat = [0.5 + 0.05 * ((s * 7) % 5 - 2) for s in steps]
    assert advisor.no_progress(steps[:9], flat[:9]) is None
    assert advisor.no_progress(steps, flat).startswith("PPO is not shaping anything yet: reward flat since step 1")
    assert advisor.no_progress(steps, [0.02 * s for s in steps]) is None
    assert advisor.no_progress(steps, [None, float("nan")] + flat[2:]).endswith("check the reward")


def test_a_dpo_run_from_this_run_means_settle():
    run = make_run(lambda s: 0.02 * s)
    run.settling_run = (9, run.checkpoints[1].checkpoint_id)
    advice = advisor.advise(Evidence(run=run, labelled_pairs=3))
    assert advice.verdict == "settle_dpo" and advice.checkpoint_id == run.checkpoints[1].checkpoint_id


def test_the_gao_peak_is_shown_when_labels_exist_at_three_checkpoints():
    run = make_run(lambda s: 0.02 * s, kl=lambda s: 0.5 * s)
    for checkpoint in run.checkpoints[:-1]:
        # The checkpoint's KL is the mean over steps s-2 .. s+3 around it: 0.5 * (s + 0.5).
        d = math.sqrt(0.5 * (checkpoint.step + 0.5))
        checkpoint.quality = Estimate(d * (1.5 - 0.5 * math.log(d)), 0.1)
    advice = advisor.advise(Evidence(run=run))
    # log d* = 1.5 / 0.5 - 1 = 2: KL* = e^4 = 54.6, near step 109: not reached by step 60.
    assert "peaks near KL 54.6 nats" in advice.quality_peak and "not reached yet" in advice.quality_peak


# --- gathering from the store ---------------------------------------------------------------------

def write_ppo_run(db, steps=3, every=1, status="completed", records=None, folder=None):
    """A PPO run in the store with a checkpoint (and eval outputs) every `every` steps, step 0 included."""
    prompts = [p["id"] for p in store.eval_prompts(db)]
    run_id = store.create_run(db, "ppo", {"max_steps": steps}, status=status)
    store.write_metrics(db, run_id, records or [
        {"step": s, "time": time.time(), "objective/raw_reward": 0.1 * s, "objective/scores": 0.0,
         "objective/kl": 0.2 * s, "objective/entropy": 20.0, "response_length_mean": 30.0} for s in range(1, steps + 1)])
    checkpoint_ids = []
    for step in range(0, steps + 1, every):
        path = folder / f"checkpoint-{step}" if folder else f"/nowhere/checkpoint-{step}"
        checkpoint_id = store.add_checkpoint(db, run_id, step, str(path))
        store.add_samples(db, [{"checkpoint_id": checkpoint_id, "prompt_id": p, "sample_index": 0, "seed": 0,
                                "decoding": {"temperature": 0.0}, "text": varied_text(p, step)} for p in prompts])
        checkpoint_ids.append(checkpoint_id)
    return run_id, checkpoint_ids


def test_a_three_step_run_with_a_checkpoint_every_step_explains_without_a_crash(project):
    # Issue 14: run_detail raised a TypeError formatting a None slope on this history.
    run_id, checkpoint_ids = write_ppo_run(project.db)
    evidence = advisor.gather(project.db, run_id)
    assert evidence.run.reward_metric == "objective/raw_reward"  # not the normalised objective/scores
    assert [c.step for c in evidence.run.checkpoints] == [1, 2, 3]  # step 0 is the start state
    advice = advisor.advise(evidence)
    assert advice.verdict == "keep_ppo" and "None" not in advice.explanation
    assert signal(advice, "gain_per_step").value is None and "needs 20 steps" in signal(advice, "gain_per_step").detail


def test_nan_and_null_metrics_are_left_out(project):
    records = [{"step": s, "time": time.time(), "objective/raw_reward": float("nan") if s == 2 else 0.1 * s,
                "objective/kl": 0.2 * s} for s in range(1, 4)]
    run_id, _ = write_ppo_run(project.db, records=records)
    evidence = advisor.gather(project.db, run_id)
    assert evidence.run.reward == ([1, 3], [pytest.approx(0.1), pytest.approx(0.3)])
    assert advisor.advise(evidence).verdict == "keep_ppo"


def test_grpo_names_are_read_too(project):
    records = [{"step": s, "time": time.time(), "reward": 0.1 * s, "kl": 0.01 * s, "entropy": 0.5}
               for s in range(1, 4)]
    run_id, _ = write_ppo_run(project.db, records=records)
    project.db.execute("UPDATE runs SET method = 'grpo' WHERE id = ?", [run_id])
    evidence = advisor.gather(project.db, run_id)
    assert evidence.run.reward_metric == "reward" and evidence.run.kl[1][-1] == pytest.approx(0.03)
    assert [r["id"] for r in advisor.shaping_runs(project.db)] == [run_id]


@pytest.mark.parametrize("status", ["queued", "running", "paused", "completed", "stopped", "failed"])
def test_runs_of_every_status_are_judged(project, status):
    run_id, _ = write_ppo_run(project.db, status=status)
    assert advisor.advise(advisor.gather(project.db, run_id)).verdict == "keep_ppo"


@pytest.mark.parametrize("status, settled", [("queued", False), ("failed", False), ("running", True),
                                             ("completed", True)])
def test_only_a_dpo_run_that_started_makes_the_switch(project, status, settled):
    run_id, checkpoint_ids = write_ppo_run(project.db)
    store.create_run(project.db, "dpo", {}, parent_checkpoint_id=checkpoint_ids[2], status=status)
    verdict = advisor.advise(advisor.gather(project.db, run_id)).verdict
    assert (verdict == "settle_dpo") is settled


def test_a_deleted_checkpoint_folder_is_marked_unavailable(project, tmp_path):
    run_id, checkpoint_ids = write_ppo_run(project.db, folder=tmp_path)
    for step in range(4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    shutil.rmtree(tmp_path / "checkpoint-2")
    evidence = advisor.gather(project.db, run_id)
    assert [c.available for c in evidence.run.checkpoints] == [True, False, True]


def test_the_judged_runs_sources_score_the_base(project):
    sources = [{"type": "forbidden_words", "name": "no_wow", "words": ["wow"]}]
    run_id = store.create_run(project.db, "ppo", {"reward_sources": sources}, status="completed")
    prompt = store.eval_prompts(project.db)[0]["id"]
    store.add_samples(project.db, [{"checkpoint_id": None, "prompt_id": prompt, "sample_index": i, "seed": i,
                                    "decoding": {"temperature": 0.7}, "text": text}
                                   for i, text in enumerate(["wow, blue", "Blue."])])
    evidence = advisor.gather(project.db, run_id)
    assert evidence.rules_checked == ["no_wow"]
    assert [s.broken_rules for s in evidence.base_samples] == [["no_wow"], []]
    assert [s.reward for s in evidence.base_samples] == [-1.0, 0.0]
    store.set_setting(project.db, "reward_sources", [{"type": "terminal_punctuation", "name": "ends"}])
    assert advisor.judged_sources(project.db) == [{"type": "terminal_punctuation", "name": "ends"}]
    assert advisor.judged_sources(project.db, run_id) == sources


# --- end to end on the tiny model: PPO, advice, labels, DPO from the advised checkpoint ----------

def response_logps(model, pairs):
    """Summed log-probs of each pair's chosen response under `model` (DPO's own measure)."""
    import torch

    from studio.core import dpo

    with torch.no_grad():
        chosen, _ = dpo.chosen_and_rejected(dpo.sequence_logps(model, dpo.collate_pairs(pairs, pad_id=0)))
    return chosen


def test_switch_from_a_ppo_checkpoint_to_dpo_end_to_end(project):
    import torch

    from studio.core import dpo, labelling, runs, store
    from studio.core.generation import Decoding

    db = project.db
    store.add_dataset(db, "prompts", "prompts", [{"prompt": [{"role": "user", "content": f"Question {i}?"}]}
                                                 for i in range(8)])
    store.set_setting(db, "reward_sources", [{"type": "length_band", "min": 2, "max": 6, "falloff": 4}])
    small = {"max_new_tokens": 6, "eval_max_new_tokens": 6, "prompts_per_step": 4, "max_steps": 4,
             "checkpoint_every": 2, "learning_rate": 5e-3}
    ppo_run = runs.create_run(db, runs.make_config("ppo", {**small, "reward_sources": advisor.reward_sources(db)}))
    assert runs.execute(project.path, ppo_run) == "completed"
    advisor.sample_base(db, k=2, decoding=Decoding(max_new_tokens=6, temperature=1.0))
    assert len(store.samples(db, None)) == 4 * 3  # 4 eval prompts: one greedy and two sampled answers each

    checkpoints = store.checkpoints(db, ppo_run)
    assert [c["step"] for c in checkpoints] == [0, 2, 4]  # a shaping run samples its start state at step 0
    advice = advisor.advise(advisor.gather(db, ppo_run))
    assert advice.run_id == ppo_run
    assert [step for step, _ in advice.run_signals[0].history] == [2, 4]
    assert all(s.key in advisor.THRESHOLDS for s in advice.base_signals + advice.run_signals)
    checkpoint_id = checkpoints[-1]["id"]  # the switch itself, from the latest checkpoint

    comparison_ids = advisor.label_pairs_from_checkpoint(db, checkpoint_id, limit=3,
                                                         decoding=Decoding(max_new_tokens=6, temperature=1.0))
    assert len(comparison_ids) == 3
    for comparison_id, choice in zip(comparison_ids, "aba"):
        labelling.record_label(db, comparison_id, "tester", choice)
    sides = labelling.get_comparison(db, comparison_ids[0])
    assert sides["source_a"]["checkpoint_id"] == sides["source_b"]["checkpoint_id"] == checkpoint_id

    dpo_run = advisor.start_dpo_from_checkpoint(db, checkpoint_id, {"max_steps": 2, "checkpoint_every": 2,
                                                                   "batch_size": 3, "eval_max_new_tokens": 4})
    assert store.get_run(db, dpo_run)["parent_checkpoint_id"] == checkpoint_id
    assert runs.execute(project.path, dpo_run) == "completed"
    # Step 1 is measured before any update: the policy (fresh adapter) equals its reference.
    steps, chosen_rewards = store.run_metrics(db, dpo_run)["rewards/chosen"]
    assert steps[0] == 1 and chosen_rewards[0] == pytest.approx(0.0, abs=1e-4)
    # The reference is the PPO checkpoint, not the base: its stored log-probs are that state's.
    data = dpo.RunData.load(project.run_dir(dpo_run) / dpo.DATA_FILE)
    assert len(data.pairs) == 3  # the three labelled comparisons
    checkpoint_model, _ = runs.load_model_state(db, checkpoint_id)
    base_model, _ = runs.load_model_state(db, None)
    assert torch.allclose(response_logps(checkpoint_model, data.pairs), data.ref_chosen, atol=1e-4)
    assert not torch.allclose(response_logps(base_model, data.pairs), data.ref_chosen, atol=1e-3)
    assert advisor.advise(advisor.gather(db, ppo_run)).verdict == "settle_dpo"

    trial = advisor.create_quick_trial(db, checkpoint_id, steps=4)
    trial_runs = [store.get_run(db, run_id) for run_id in trial]
    assert [r["method"] for r in trial_runs] == ["ppo", "dpo"]
    assert {r["parent_checkpoint_id"] for r in trial_runs} == {checkpoint_id}
    assert {(r["config"]["max_steps"], r["config"]["checkpoint_every"], r["config"]["seed"]) for r in trial_runs} \
        == {(4, 1, 0)}
    assert trial_runs[0]["config"]["reward_sources"] == advisor.reward_sources(db)


def test_sample_base_reports_each_batch_and_a_stop_stores_nothing(project):
    from studio.core import store
    from studio.core.generation import Decoding

    db = project.db
    decoding = Decoding(max_new_tokens=4, temperature=1.0)
    reports = []
    assert advisor.sample_base(db, k=2, decoding=decoding, on_progress=lambda *report: reports.append(report)) == 12
    phase = advisor.SAMPLING_PHASE  # 4 eval prompts, one batch per pass: greedy and two sampled passes
    assert reports == [(phase, 0, 12), (phase, 4, 12), (phase, 8, 12), (phase, 12, 12)]
    before = store.samples(db, None)

    reports.clear()
    stored = advisor.sample_base(db, k=2, decoding=replace(decoding, max_new_tokens=5),
                                 on_progress=lambda *report: reports.append(report), should_stop=lambda: True)
    assert stored == 0 and reports == [(phase, 0, 12), (phase, 4, 12)]  # stopped after the first batch
    assert store.samples(db, None) == before  # nothing of the stopped pass is stored, the earlier samples stay


def test_a_rule_with_a_negative_weight_is_broken_by_missing_what_it_counts(project):
    # +1 per "!" (a forbid regex with weight -1: the reward loves the phrase), a [0, 1] rule the
    # reward wants failed (weight -1), and a rule that does not count (weight 0).
    sources = [{"type": "regex", "name": "loves_bang", "pattern": "!", "forbid": True, "weight": -1.0},
               {"type": "terminal_punctuation", "name": "unfinished", "weight": -1.0},
               {"type": "max_lines", "name": "ignored", "max_lines": 1, "weight": 0.0}]
    scores = {text: advisor.rule_results(sources, text)[0] for text in ("Wow!", "Blue.", "two\nlines")}
    assert advisor.broken_rules(sources, scores["Wow!"]) == ["unfinished"]
    assert advisor.broken_rules(sources, scores["Blue."]) == ["loves_bang", "unfinished"]
    assert advisor.broken_rules(sources, scores["two\nlines"]) == ["loves_bang"]


def test_reward_per_nat_of_kl_is_measured_only_while_kl_is_clearly_spent():
    """On a level KL, reward regressed on KL across steps measures how a batch's reward and KL
    co-vary, not a price: the signal is left unmeasured then."""
    from tests.advisor_histories import make_run

    rising = make_run(lambda s: 0.02 * s, kl=lambda s: 0.1 * s, steps=60)
    # A level KL that moves with each batch's reward (as real batches do): the old fit read a price.
    level = make_run(lambda s: 0.02 * s + 0.1 * (s % 2), kl=lambda s: 3.0 + 0.5 * (s % 2), steps=60)
    assert advisor.reward_gain_signals(rising, 60, 10, "medium")[0]["gain_per_kl"] is not None
    estimates, notes = advisor.reward_gain_signals(level, 60, 10, "medium")
    assert estimates["gain_per_kl"] is None and "KL not clearly growing" in notes["gain_per_kl"]
    assert estimates["gain_per_step"] is not None
