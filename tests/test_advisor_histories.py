"""Real PPO runs on the demo model (tests/data/advisor/*.json, exported with
`python -m studio.core.advisor_history`), replayed: the advisor's verdict at each checkpoint as the run
went, against what a person reading the outputs would say (docs/advisor.md, "Real histories")."""

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.advisor_histories import at_checkpoint, varied_text
from studio.core import advisor, store
from studio.core.advisor_history import FORMAT, evidence_from_history, export_history

HISTORIES = Path(__file__).parent / "data" / "advisor"

# Per history: the verdict a person would give at each checkpoint after step 0 (docs/advisor.md).
EXPECTED = {
    # The walkthrough's PPO run (`studio demo --story`, demo reward, 24 steps), as it stood before its
    # DPO run. Step 12: answers 39% shorter and mostly finished (the base's are cut off at the token
    # limit), still moving: keep shaping, the shortening intended. Step 24: KL has grown to 0.42 nats
    # per token: switch, from step 12, the last state before that damage.
    "demo_reward.json": ["keep_ppo", "switch_now"],
    # +0.25 per "the": the reward stays near 0.3 (about one "the" per answer) for 28 steps; answers are
    # reworded, a little shorter, not hacked. Too early to judge, then "nothing is being shaped".
    "loves_the.json": ["keep_ppo"] * 4 + ["need_evidence"],
    # Rules the base already meets (no lists, at most 6 lines, no insults): reward at its maximum 2.0
    # from step 1; answers barely change. After 20 flat steps: nothing to shape, and the base's 5 list
    # answers in 36 samples (14%, [7%, 26%]) straddle the 20% bar, so it asks for more base samples.
    "clean_start.json": ["keep_ppo"] * 4 + ["need_evidence"] * 2,
    # +1 per "!" (a forbid regex at weight -1), default settings, 48 steps: 4 of 144 base samples have
    # a "!", so most steps' 8 rollouts score 0 and PPO has nothing to follow; the answers never gain
    # a "!" (eval reward 0.00 at every checkpoint). The base fails what the reward asks on 97% of
    # samples, so the stage is still PPO; from step 32, "not shaping anything yet" (next test).
    "sparse_exclamation.json": ["keep_ppo"] * 6,
    # The walkthrough's PPO run at today's defaults, 40 steps (2 Dec 2026), as it stood before its DPO
    # run. Eval answers: reward 1.18 -> 1.80, 1.79, 1.84, 1.85 and rules broken 77% -> 17%, 17%, 10%, 8%
    # at steps 10-40; the rollout reward's 10-step means 1.25, 1.53, 1.80, 1.77. Still moving at step 30
    # (18% of words changed); at step 40 the reward has levelled off but its trailing slope (-34%
    # [-105%, 37%] of the early rate) cannot yet be told from noise: keep shaping, check again.
    "walkthrough_40_steps.json": ["keep_ppo"] * 4,
    # The same at learning rate 1e-3 (base samples: the walkthrough's, same model, prompts and
    # sources): by step 10 short finished answers that still answer ("To make a cup of tea ... boil,
    # brew, and serve"); from step 20 generic one-liners that satisfy the reward without answering
    # ("The art of crafting a cup of tea is a timeless craft ...", "The largest country by area is
    # Antarctica."), KL 0.50-0.58 nats per token: switch, from step 10, at every later checkpoint.
    # With 15 hand-read labels; too few for the labelled win rate's interval to fire on its own.
    "fast_one_liners.json": ["keep_ppo"] + ["switch_now"] * 3,
    # Rules the base already meets (no lists, at most 6 lines, no insults), 40 steps: reward flat
    # near its maximum (1.9 of 2) from step 1. The advisor first asked for more base samples (144:
    # 15% [11%, 21%] break a rule, straddling 20%); with 288, 13% [10%, 17%]: a clean base, nothing
    # for PPO to shape, settle with DPO from the start once the flat reward is seen twice.
    "clean_start_40_steps.json": ["keep_ppo"] * 3 + ["settle_dpo"] * 2,
}


def verdicts(evidence):
    return [advisor.advise(replace(evidence, run=at_checkpoint(evidence.run, k))).verdict
            for k in range(1, len(evidence.run.checkpoints) + 1)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_verdicts_of_a_real_run_match_what_its_outputs_show(name):
    evidence = evidence_from_history(json.loads((HISTORIES / name).read_text(encoding="utf-8")))
    assert verdicts(evidence) == EXPECTED[name]


def test_a_history_exports_and_replays_to_the_same_advice(project):
    db = project.db
    prompts = [p["id"] for p in store.eval_prompts(db)]
    run_id = store.create_run(db, "ppo", {"reward_sources": [{"type": "terminal_punctuation"}]}, status="completed")
    store.write_metrics(db, run_id, [{"step": s, "time": time.time(), "objective/raw_reward": 0.05 * s,
                                      "objective/kl": 0.1 * s, "response_length_mean": 20.0} for s in range(1, 31)])
    for step in range(0, 31, 10):
        checkpoint_id = store.add_checkpoint(db, run_id, step, f"/nowhere/{step}")
        store.add_samples(db, [{"checkpoint_id": checkpoint_id, "prompt_id": p, "sample_index": 0, "seed": 0,
                                "decoding": {"temperature": 0.0}, "text": varied_text(p, step)} for p in prompts])
    data = json.loads(json.dumps(export_history(db, run_id)))  # through JSON, as stored
    assert data["format"] == FORMAT and [c["step"] for c in data["run"]["checkpoints"]] == [10, 20, 30]
    replayed = advisor.advise(evidence_from_history(data))
    direct = advisor.advise(advisor.gather(db, run_id))
    assert (replayed.verdict, replayed.checkpoint_id, replayed.explanation) == \
        (direct.verdict, direct.checkpoint_id, direct.explanation)


def test_a_file_that_is_not_a_history_is_refused_by_name():
    with pytest.raises(ValueError, match="not an advisor history"):
        evidence_from_history({"format": "something else"})


def test_the_walkthrough_run_switches_from_its_step_12_checkpoint_not_the_base():
    evidence = evidence_from_history(json.loads((HISTORIES / "demo_reward.json").read_text(encoding="utf-8")))
    advice = advisor.advise(evidence)
    steps = {c.checkpoint_id: c.step for c in evidence.run.checkpoints}
    assert advice.verdict == "switch_now" and steps[advice.checkpoint_id] == 12
    assert any("finished sentence" in reason for reason in advice.intended)


def test_a_sparse_reward_that_never_moves_is_called_flat_not_shaping():
    evidence = evidence_from_history(json.loads((HISTORIES / "sparse_exclamation.json").read_text(encoding="utf-8")))
    explanations = [advisor.advise(replace(evidence, run=at_checkpoint(evidence.run, k))).explanation
                    for k in range(1, len(evidence.run.checkpoints) + 1)]
    flat = [e.startswith("PPO is not shaping anything yet: reward flat since step 1") for e in explanations]
    assert flat == [False] * 3 + [True] * 3  # steps 8-24: too few steps to tell; 32-48: flat
    assert "check the reward" in explanations[-1]


def test_a_fast_run_switches_from_its_last_state_before_the_kl_budget_broke_and_stays_switched():
    evidence = evidence_from_history(json.loads((HISTORIES / "fast_one_liners.json").read_text(encoding="utf-8")))
    steps = {c.checkpoint_id: c.step for c in evidence.run.checkpoints}
    for k in (2, 3, 4):  # step 40's KL window is noisy (0.575 [0.208, 0.941]): the alarm stays on
        advice = advisor.advise(replace(evidence, run=at_checkpoint(evidence.run, k)))
        assert advice.verdict == "switch_now" and steps[advice.checkpoint_id] == 10
        assert "KL is" in advice.explanation
    # 15 labels read by hand (start vs 10, 10 vs 20, 10 vs 40 on 6 eval prompts): the Gao et al. fit
    # of labelled quality against sqrt(KL) puts the peak nearest step 10 too.
    assert "closest to ppo-lr1e-3-kl0.05, checkpoint 1 (step 10); the run is past it" in advice.quality_peak
