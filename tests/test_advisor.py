"""The stage advisor: measures against hand-computed numbers, verdicts on synthetic histories, and
the switch from a PPO checkpoint to DPO end to end on the tiny model."""

import math

import pytest

from studio.core import advisor
from studio.core.advisor import BaseSample, CheckpointEvidence, Evidence, RunEvidence


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
    # three texts: d(1,2)=1/3, d(1,3)=1, d(2,3)=1
    assert advisor.mean_pairwise_distance(["a b c", "a b d", "x"]) == pytest.approx((1 / 3 + 1 + 1) / 3)


def test_distinct_n_and_repetition():
    # bigrams: (a b) (b a) (a b) | (c d): 4 in all, 3 unique
    assert advisor.distinct_n(["a b a b", "c d"], 2) == pytest.approx(3 / 4)
    assert advisor.distinct_n(["a"], 2) == 0.0
    # trigrams of "a b c a b c": abc bca cab abc -> 1 of 4 repeats
    assert advisor.repetition("a b c a b c") == pytest.approx(1 / 4)
    assert advisor.repetition("one two three four") == 0.0
    assert advisor.mean_repetition(["a b c a b c", "x y z"]) == pytest.approx(1 / 8)


def test_refusals_and_empty_outputs():
    assert advisor.is_refusal_or_empty("   ")
    assert advisor.is_refusal_or_empty("I’m sorry, but I can't help with that.")
    assert advisor.is_refusal_or_empty("抱歉,我不能回答。")
    assert not advisor.is_refusal_or_empty("Blue.")
    assert advisor.refusal_rate(["", "Blue.", "As an AI, no.", "Four."]) == 0.5


def test_slopes_and_ratios():
    assert advisor.slope([1, 2, 3, 4], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert advisor.slope([1, 2, 3], [1, 2, 0]) == pytest.approx(-0.5)
    assert advisor.slope([2, 2], [1, 5]) is None
    assert advisor.ratio_to_early(0.5, 2.0) == 0.25
    assert advisor.ratio_to_early(0.5, 0.0) is None


def test_behaviour_change_and_side_effects():
    before = {1: "a b c d", 2: "same text"}
    after = {1: "a b x d", 2: "same text", 3: "no partner"}
    distance, changed = advisor.behaviour_change(before, after)
    assert distance == pytest.approx((1 / 4 + 0) / 2) and changed == 0.5
    effects = advisor.side_effects({1: "a b", 2: "c d"}, {1: "a b a b a b", 2: "", 3: "not in start"})
    assert effects["length_drift"] == pytest.approx(3 / 2 - 1)  # 3 words on average vs 2
    assert effects["diversity_loss"] == pytest.approx(1 - (2 / 5) / 1)  # distinct-2 2/5 vs 2/2
    assert effects["repetition"] == pytest.approx((2 / 4 + 0) / 2)
    assert effects["refusals"] == pytest.approx(0.5)


def test_gain_per_step_and_per_kl_over_windows():
    run = make_run(reward=lambda s: 0.1 * s, kl=lambda s: 0.05 * s, steps=40, every=10)
    assert advisor.window_length(run) == 10
    assert advisor.gain_per_step(run, 40, 10) == pytest.approx(0.1)
    assert advisor.gain_per_kl(run, 40, 10) == pytest.approx(2.0)


# --- synthetic histories ------------------------------------------------------------------------

PROMPTS = range(1, 9)


def varied_text(prompt: int, version, length: int = 12) -> str:
    """A text unique to (prompt, version), with no repeated n-grams."""
    return " ".join(f"w{prompt}v{version}i{i}" for i in range(length))


def make_run(reward, kl, steps=100, every=20, outputs=None, wins=None, start=None):
    """A RunEvidence with metric curves reward(step) and kl(step), a checkpoint every `every` steps.

    outputs(prompt, checkpoint index) -> text; wins(checkpoint index) -> (wins, labels).
    """
    outputs = outputs or (lambda p, i: varied_text(p, i))
    wins = wins or (lambda i: (0.0, 0))
    all_steps = list(range(1, steps + 1))
    checkpoints = []
    for index, step in enumerate(range(every, steps + 1, every)):
        won, labels = wins(index)
        checkpoints.append(CheckpointEvidence(100 + index, step, {p: outputs(p, index) for p in PROMPTS},
                                              won, labels))
    return RunEvidence(
        run_id=7, name="PPO #7", reward_metric="objective/scores",
        reward=(all_steps, [reward(s) for s in all_steps]), kl=(all_steps, [kl(s) for s in all_steps]),
        start_outputs=start or {p: varied_text(p, "start") for p in PROMPTS}, start_label="the base",
        checkpoints=checkpoints)


def base_samples(broken_every: int | None, k: int = 4, same: bool = False) -> list[BaseSample]:
    """k samples per prompt; every `broken_every`-th one breaks the length rule (None: none do)."""
    samples = []
    for p in PROMPTS:
        for i in range(k):
            broken = ["length_band"] if broken_every and (p * k + i) % broken_every == 0 else []
            samples.append(BaseSample(p, varied_text(p, 0 if same else i), broken))
    return samples


def test_messy_base_means_ppo_first():
    evidence = Evidence(base_samples=base_samples(2), rules_checked=["length_band"])
    advice = advisor.advise(evidence)
    assert advice.verdict == "ppo_first" and advice.title == "PPO first: the base is messy"
    assert "50%" in advice.explanation  # the violation rate is quoted
    assert advice.checkpoint_id is None


def test_calm_base_means_settle_with_dpo_and_no_evidence_means_sample_first():
    calm = Evidence(base_samples=base_samples(None, same=True), rules_checked=["length_band"])
    advice = advisor.advise(calm)
    assert advice.verdict == "settle_dpo"
    assert "no preference pairs" in advice.explanation or "has none" in advice.explanation
    assert advisor.advise(Evidence()).verdict == "need_evidence"


def test_ppo_still_gaining_means_keep_shaping():
    run = make_run(reward=lambda s: 0.02 * s, kl=lambda s: 0.01 * s)
    advice = advisor.advise(Evidence(run=run))
    assert advice.verdict == "keep_ppo"
    assert advice.checkpoint_id == run.checkpoints[-1].checkpoint_id
    assert not any(s.fires for s in advice.run_signals)
    gain = next(s for s in advice.run_signals if s.key == "gain_per_step")
    assert gain.value == pytest.approx(1.0) and gain.trend == "flat"


def test_ppo_plateau_means_switch_now_from_the_latest_checkpoint():
    settled = {p: varied_text(p, 99) for p in PROMPTS}
    run = make_run(reward=lambda s: 1 - math.exp(-s / 8), kl=lambda s: 0.01 * s,
                   outputs=lambda p, i: varied_text(p, i) if i == 0 else settled[p])
    advice = advisor.advise(Evidence(run=run, labelled_pairs=12))
    fired = {s.key for s in advice.run_signals if s.fires}
    assert {"gain_per_step", "gain_per_kl", "behaviour_change", "outputs_changed"} <= fired
    assert not fired & set(advisor.SIDE_EFFECT_SIGNALS)
    assert advice.verdict == "switch_now"
    assert advice.checkpoint_id == run.checkpoints[-1].checkpoint_id
    assert "12 preference pairs" in advice.explanation
    changed = next(s for s in advice.run_signals if s.key == "outputs_changed")
    assert changed.history[0][1] == 1.0 and changed.history[-1][1] == 0.0


def test_reward_hacking_means_switch_from_the_last_clean_checkpoint():
    # Reward keeps rising; from the third checkpoint on, answers grow long and labels prefer older states.
    def outputs(p, i):
        return varied_text(p, i, length=12 if i < 2 else 30)

    run = make_run(reward=lambda s: 0.02 * s, kl=lambda s: 0.01 * s, outputs=outputs,
                   wins=lambda i: (3.0, 4) if i < 2 else (1.0, 5))
    advice = advisor.advise(Evidence(run=run))
    fired = {s.key for s in advice.run_signals if s.fires}
    assert {"reward_hacking", "length_drift"} <= fired
    assert advice.verdict == "switch_now"
    assert "Reward-hacking alarm" in advice.explanation and "20%" in advice.explanation
    clean = run.checkpoints[1]
    assert advice.checkpoint_id == clean.checkpoint_id
    assert f"checkpoint #{clean.checkpoint_id} (step {clean.step})" in advice.explanation


def test_risk_tolerance_moves_a_borderline_case():
    # The reward slope drops to 30% of the early slope, KL grows steadily, outputs keep changing:
    # fires at low tolerance (threshold 40%), not at medium (25%).
    def reward(s):
        return s if s <= 20 else 20 + 0.3 * (s - 20)

    run = make_run(reward=reward, kl=lambda s: 0.01 * s)
    low = advisor.advise(Evidence(risk_tolerance="low", run=run))
    medium = advisor.advise(Evidence(risk_tolerance="medium", run=run))
    assert low.verdict == "switch_now" and low.risk_tolerance == "low"
    assert medium.verdict == "keep_ppo"
    gain = next(s for s in medium.run_signals if s.key == "gain_per_step")
    assert gain.value == pytest.approx(0.3) and gain.threshold == 0.25


def test_a_dpo_run_from_this_run_means_settle():
    run = make_run(reward=lambda s: 0.02 * s, kl=lambda s: 0.01 * s)
    run.settling_run = (9, run.checkpoints[1].checkpoint_id)
    advice = advisor.advise(Evidence(run=run, labelled_pairs=3))
    assert advice.verdict == "settle_dpo" and advice.checkpoint_id == run.checkpoints[1].checkpoint_id
    assert "DPO run #9" in advice.explanation


# --- end to end on the tiny model: PPO, advice, labels, DPO from the advised checkpoint ----------

def response_logps(model, pairs):
    """Summed log-probs of each pair's chosen response under `model` (DPO's own measure)."""
    import torch

    from studio.core import dpo

    with torch.no_grad():
        chosen, _ = dpo.sequence_logps(model, dpo.collate_pairs(pairs, pad_id=0)).chunk(2)
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

    advice = advisor.advise(advisor.gather(db, ppo_run))
    ppo_checkpoints = [c["id"] for c in store.checkpoints(db, ppo_run)]
    assert advice.run_id == ppo_run and advice.verdict in ("keep_ppo", "switch_now")
    assert len(advice.run_signals[0].history) == len(ppo_checkpoints) == 2
    assert all(s.key in advisor.THRESHOLDS for s in advice.base_signals + advice.run_signals)
    checkpoint_id = advice.checkpoint_id
    assert checkpoint_id in ppo_checkpoints

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
