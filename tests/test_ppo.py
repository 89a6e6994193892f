"""PPO: the maths against hand computations, then the engine on the tiny model."""

import math

import pytest
import torch

from studio.core import ppo, runs, store
from studio.core.generation import encode_prompt, left_pad
from studio.core.models import add_lora
from tests.shaping_runs import add_prompts, comparable_metrics, straight_and_interrupted

LETTERS = {"type": "regex", "pattern": "[a-z]", "forbid": True, "weight": -1.0, "name": "letters"}  # +1 per letter
SMALL = {"prompts_per_step": 4, "max_new_tokens": 6, "eval_max_new_tokens": 4, "reward_sources": [LETTERS]}


def make_engine(project, **overrides) -> ppo.Engine:
    """An engine on the tiny model, as runs.execute builds it (without the run loop)."""
    config = runs.make_config("ppo", {**SMALL, **overrides})
    model, tokenizer = runs.load_model_state(project.db, None)
    torch.manual_seed(config.seed)
    policy = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    data = runs.gather_training_data(project.db, config)
    return ppo.Engine(config, policy, tokenizer, data, "cpu", project.path / "runs" / "0")


# --- the maths --------------------------------------------------------------------------------

def test_kl_estimators_match_hand_computation():
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(ppo.kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([0.5, -1.0]))
    # k3 = exp(-d) - 1 + d with d = log p - log q
    expected = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    assert torch.allclose(ppo.kl_penalty(logprobs, ref_logprobs, "k3"), expected)
    with pytest.raises(ValueError):
        ppo.kl_penalty(logprobs, ref_logprobs, "k2")


def test_adaptive_kl_controller_moves_the_coefficient_towards_the_target():
    fixed = ppo.KLController(0.1)
    fixed.update(kl=50.0, samples=10)
    assert fixed.coef == 0.1
    controller = ppo.KLController(0.1, target=6.0, horizon=100)
    controller.update(kl=9.0, samples=10)  # error 0.5, clipped to 0.2: x (1 + 0.2 * 10 / 100)
    assert controller.coef == pytest.approx(0.102)
    controller.update(kl=3.0, samples=10)  # error -0.5, clipped to -0.2
    assert controller.coef == pytest.approx(0.102 * 0.98)
    controller.update(kl=6.6, samples=10)  # error 0.1
    assert controller.coef == pytest.approx(0.102 * 0.98 * 1.01)


def test_score_goes_on_the_last_response_token_and_kl_on_every_token():
    scores, kl = torch.tensor([1.0, -2.0]), torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    rewards, non_score = ppo.token_rewards(scores, kl, kl_coef=0.5, lengths=torch.tensor([3, 1]))
    assert torch.allclose(non_score, torch.tensor([[-0.05, -0.1, -0.15], [-0.2, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-2.2, 0.0, 0.0]]))


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 5.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, backwards: d2 = 2 - 1.5 = 0.5; d1 = 0.9 * 1.5 - 1 = 0.35, A1 = 0.35 + 0.72 * 0.5;
    # d0 = 1 + 0.9 * 1 - 0.5 = 1.4, A0 = 1.4 + 0.72 * A1. Row 1 ends after one token: A0 = 3 - 2.
    assert torch.allclose(advantages, torch.tensor([[1.9112, 0.71, 0.5], [1.0, 0.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[2.4112, 1.71, 2.0], [3.0, 0.0, 0.0]]))


def test_masked_whitening_uses_only_real_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    std = math.sqrt(5 / 3)  # of 1, 2, 3, 4 (unbiased)
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    assert torch.allclose(ppo.masked_whiten(values, mask), expected, atol=1e-6)


def test_clipped_policy_loss_matches_a_hand_computation():
    logprobs = torch.tensor([[-1.0, -0.5], [-1.0, -2.0]])
    old_logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    advantages = torch.tensor([[1.0, 2.0], [-1.0, 5.0]])
    mask = torch.tensor([[True, True], [True, False]])
    result = ppo.policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # ratios 1, e^0.5 = 1.6487 (clipped to 1.2 for A = 2 > 0), 1: losses -1, -2 * 1.2, +1
    assert result.loss.item() == pytest.approx((-1 - 2.4 + 1) / 3)
    assert result.clipfrac.item() == pytest.approx(1 / 3)
    assert result.approxkl.item() == pytest.approx(0.5 * 0.25 / 3)
    assert result.ratio.item() == pytest.approx((2 + math.exp(0.5)) / 3)


def test_clipped_value_loss_matches_a_hand_computation():
    values, old_values = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.5, 2.0, 0.0]])
    returns, mask = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([[True, True, False]])
    loss, clipfrac = ppo.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: unclipped (1 - 3)^2 = 4, clipped (0.7 - 3)^2 = 5.29; token 1: 1 and 1
    assert loss.item() == pytest.approx(0.5 * (5.29 + 1) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_entropy_from_logprobs():
    # A masked vocabulary gives -inf log-probs: those tokens add nothing (0 * -inf must not be NaN).
    logprobs = torch.tensor([[[math.log(0.25)] * 4, [math.log(0.25), math.log(0.75), -math.inf, -math.inf]]])
    expected = [math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert ppo.entropy_from_logprobs(logprobs).squeeze(0).tolist() == pytest.approx(expected)
    logits = torch.tensor([0.0, 1.0, -math.inf], requires_grad=True)  # and so is its gradient
    ppo.entropy_from_logprobs(torch.log_softmax(logits, -1)).backward()
    assert torch.isfinite(logits.grad).all()


def test_response_lengths_end_at_the_first_stop_token():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    lengths, finished = ppo.response_lengths(tokens, stop_ids=[2])
    assert lengths.tolist() == [2, 4, 1]
    assert finished.tolist() == [True, False, True]


def test_prompt_order_is_a_seeded_permutation_per_epoch():
    order = [ppo.prompt_indices(seed=3, step=step, per_step=5, num_prompts=5) for step in range(3)]
    assert all(sorted(epoch) == [0, 1, 2, 3, 4] for epoch in order)
    assert order[0] != order[1]  # a new permutation each epoch
    assert ppo.prompt_indices(3, 1, 3, 5) == order[0][3:] + order[1][:1]  # a step may span two epochs
    assert ppo.prompt_indices(4, 0, 5, 5) != order[0]  # the seed matters


# --- the engine -------------------------------------------------------------------------------

def test_first_minibatch_ratio_is_exactly_one_and_kl_is_zero_before_any_update(project, monkeypatch):
    add_prompts(project)
    losses = []
    original = ppo.policy_loss
    monkeypatch.setattr(ppo, "policy_loss", lambda *args: losses.append(original(*args)) or losses[-1])

    metrics = make_engine(project, num_minibatches=2, ppo_epochs=2, learning_rate=1e-2).train_step(0)
    assert metrics["objective/kl"] == 0.0  # LoRA's B starts at 0: the policy is the reference
    assert len(losses) == 4
    assert losses[0].ratio.item() == 1.0 and losses[0].approxkl.item() == 0.0
    assert losses[-1].approxkl.item() > 0  # later minibatches see the updated policy

    # With nothing moving (lr 0), the rollout pass and every training pass agree exactly.
    losses.clear()
    make_engine(project, num_minibatches=2, ppo_epochs=2, learning_rate=0.0).train_step(0)
    assert [loss.ratio.item() for loss in losses] == [1.0] * 4
    assert [loss.approxkl.item() for loss in losses] == [0.0] * 4


def handmade_rollout(engine: ppo.Engine, responses: list[list[int]]) -> ppo.Rollout:
    prompts = ["Q1:", "Q2:"]
    prompt_ids, prompt_mask = left_pad([encode_prompt(engine.tokenizer, p) for p in prompts],
                                       engine.tokenizer.pad_token_id, "cpu")
    response_ids = torch.tensor(responses)
    lengths, finished = ppo.response_lengths(response_ids, engine.stop_ids)
    response_mask = torch.arange(response_ids.shape[1]) < lengths[:, None]
    return ppo.Rollout(prompts, torch.cat([prompt_ids, response_ids], dim=1),
                       torch.cat([prompt_mask, response_mask.long()], dim=1), prompt_ids.shape[1],
                       lengths, finished, texts=["", ""])


def test_nothing_after_the_stop_token_counts(project):
    add_prompts(project)
    results = []
    for after_stop in ([10, 11, 12], [50, 60, 70]):  # the same responses up to the stop, then different tokens
        engine = make_engine(project, prompts_per_step=2)
        stop = engine.stop_ids[0]
        rollout = handmade_rollout(engine, [[65, 66, stop, *after_stop], [67, 68, 69, 70, 71, 72]])
        assert rollout.lengths.tolist() == [3, 6]
        torch.manual_seed(0)
        metrics = engine.optimize(rollout, torch.tensor([1.0, -1.0]), engine.reference_logprobs(rollout))
        results.append((metrics, [p.detach().clone() for p in engine.parameters]))
    (first_metrics, first_parameters), (second_metrics, second_parameters) = results
    assert first_metrics == second_metrics
    assert all(torch.equal(a, b) for a, b in zip(first_parameters, second_parameters))


def test_the_tiny_model_learns_a_rule_reward_while_kl_stays_bounded(project):
    """Reward: +1 per letter. LoRA on the LM head too: the tiny random model's tied head is so small
    that no change inside the body can make any token much likelier."""
    add_prompts(project, 16)
    config = runs.make_config("ppo", {
        **SMALL, "prompts_per_step": 8, "max_new_tokens": 12, "max_steps": 30, "checkpoint_every": 100,
        "learning_rate": 5e-3, "lr_scheduler": "constant", "temperature": 1.0, "kl_coef": 0.1,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]})
    run_id = runs.create_run(project.db, config)
    assert runs.execute(project.path, run_id) == "completed"
    metrics = store.run_metrics(project.db, run_id)
    scores, kl = metrics["objective/scores"][1], metrics["objective/kl"][1]
    early, late = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert late > early + 3  # about 2.4 letters in 12 random bytes at first
    assert metrics["reward/letters"][1] == [-s for s in scores]  # the raw score is minus the count
    assert max(kl) < 30  # nats per response: the policy moved, but far from the 12 * log(258) it could


def test_stop_and_resume_give_the_same_run_as_no_interruption(project):
    add_prompts(project)
    overrides = {**SMALL, "max_steps": 4, "checkpoint_every": 2, "num_minibatches": 2, "learning_rate": 1e-2,
                 "adaptive_kl": True, "target_kl": 0.5, "kl_horizon": 20, "reward_normalization": True,
                 "reward_clip": 3.0}
    straight, interrupted = straight_and_interrupted(project, "ppo", overrides)
    assert comparable_metrics(project.db, interrupted) == comparable_metrics(project.db, straight)
    kl_coef = comparable_metrics(project.db, straight)["kl_coef"][1]
    assert len(set(kl_coef)) > 1  # the adaptive controller moved, and its state survived the resume
    assert [c["step"] for c in store.checkpoints(project.db, interrupted)] == [0, 2, 3, 4]  # 0: the start state
    # The raw reward is the sources' total (minus the letter count's weight -1) before normalisation.
    metrics = comparable_metrics(project.db, straight)
    assert metrics["objective/raw_reward"][1] == [-v for v in metrics["reward/letters"][1]]
    assert metrics["objective/raw_reward"][1] != metrics["objective/scores"][1]
    for checkpoint in store.checkpoints(project.db, interrupted):  # eval samples at every checkpoint
        assert len(store.samples(project.db, checkpoint["id"])) == 4


def test_validate_explains_what_stops_a_launch(project, tmp_path):
    config = runs.make_config("ppo", {"reward_sources": []})
    problems = ppo.validate(config, project.db)
    assert any("no training prompts" in p for p in problems)  # the fixture has eval prompts only
    assert any("no reward sources" in p for p in problems)

    add_prompts(project)
    assert ppo.validate(runs.make_config("ppo"), project.db) == []
    bad = runs.make_config("ppo", {"temperature": 0, "top_p": 1.5, "gamma": 2, "num_minibatches": 16,
                                   "kl_estimator": "k2", "prompt_dataset_ids": [1],
                                   "reward_sources": [{"type": "reward_model", "path": str(tmp_path / "none")}]})
    problems = "\n".join(ppo.validate(bad, project.db))
    for expected in ("temperature must be positive", "top_p", "gamma", "num_minibatches (16)", "kl_estimator",
                     "dataset 1 is not a training prompt dataset", "folder not found"):
        assert expected in problems
    with pytest.raises(runs.ConfigError, match="temperature"):
        runs.create_run(project.db, bad)


def test_default_reward_is_the_demo_preset():
    from studio.core import rewards

    config = runs.make_config("ppo")
    assert config.reward_sources == rewards.demo_preset()
    assert ppo.Config.from_json(config.to_json()) == config
