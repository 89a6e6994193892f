"""GRPO and RLOO: the maths against hand computations (plain Python loops), then both engines on the tiny model."""

import itertools
import math
import os
import signal
import statistics
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from studio.core import critic_free, grpo, ppo, rloo, runs, store
from studio.core.generation import Generation, encode_prompt
from studio.core.models import add_lora
from studio.core.run_process import RunProcess
from tests.shaping_runs import add_prompts, comparable_metrics, straight_and_interrupted

LETTERS = {"type": "regex", "pattern": "[a-z]", "forbid": True, "weight": -1.0, "name": "letters"}  # +1 per letter
SMALL = {"prompts_per_step": 2, "num_generations": 3, "max_completion_length": 6, "eval_max_new_tokens": 4,
         "reward_sources": [LETTERS]}
METHODS = ("grpo", "rloo")


def random_batch(seed: int, rows: int = 4, width: int = 5):
    """Log-probs of a policy moved a little from the sampling one, a reference, advantages, a ragged mask."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=generator) * 3
    new = old + torch.randn(rows, width, generator=generator) * 0.4
    ref = old + torch.randn(rows, width, generator=generator) * 0.3
    advantages = torch.randn(rows, generator=generator)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = torch.arange(width) < lengths[:, None]
    return new, old, ref, advantages, mask


def grpo_self(**overrides):
    """The engine's `self` as far as its loss and statistics read it: the config."""
    return SimpleNamespace(config=grpo.Config(**overrides))


# --- GRPO maths -------------------------------------------------------------------------------

def hand_group_advantages(rewards, group, scale):
    advantages = []
    for start in range(0, len(rewards), group):
        members = rewards[start:start + group]
        mean = sum(members) / group
        std = statistics.stdev(members) if scale == "group" else statistics.stdev(rewards)
        advantages += [(r - mean) / (std + 1e-4) if scale != "none" else r - mean for r in members]
    return advantages


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
def test_group_advantages_match_a_hand_computation(scale):
    rewards = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0, -1.0, 4.0, 0.5, 2.5]
    result = grpo.group_advantages(torch.tensor(rewards), 4, scale)
    assert result.tolist() == pytest.approx(hand_group_advantages(rewards, 4, scale), abs=1e-5)
    assert result[4:8].tolist() == [0.0] * 4  # a group with one reward for all teaches nothing


def hand_grpo_loss(new, old, ref, advantages, mask, loss_type, epsilon, epsilon_high, beta, max_length):
    rows, total, tokens, per_row = len(new), 0.0, 0, []
    for i in range(rows):
        row_sum, row_tokens = 0.0, 0
        for t in range(len(new[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(new[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - epsilon), 1 + epsilon_high)
            loss = -min(ratio * advantages[i], clipped * advantages[i])
            loss += beta * (math.exp(ref[i][t] - new[i][t]) - (ref[i][t] - new[i][t]) - 1)
            row_sum, row_tokens = row_sum + loss, row_tokens + 1
        per_row.append(row_sum / max(row_tokens, 1))
        total, tokens = total + row_sum, tokens + row_tokens
    if loss_type == "grpo":
        return sum(per_row) / rows
    if loss_type == "dr_grpo":
        return total / (rows * max_length)
    return total / tokens


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("seed", range(3))
def test_grpo_loss_types_match_a_per_token_hand_computation(loss_type, seed):
    new, old, ref, advantages, mask = random_batch(seed)
    engine = grpo_self(loss_type=loss_type, epsilon=0.1, epsilon_high=0.3, beta=0.2, max_completion_length=7)
    batch = critic_free.BatchSize(len(new), int(mask.sum()), 7)
    loss = grpo.Engine.loss(engine, new, old, ref, advantages, mask, batch)
    expected = hand_grpo_loss(new.tolist(), old.tolist(), ref.tolist(), advantages.tolist(), mask.tolist(),
                              loss_type, 0.1, 0.3, 0.2, 7)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_three_normalisations_weigh_tokens_as_documented():
    """One completion of 1 token and one of 4, every token's loss 1: grpo gives each completion equal weight,
    dapo each token, dr_grpo divides by a constant."""
    per_token = torch.ones(2, 4)
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    batch = critic_free.BatchSize(2, 5, 10)
    assert grpo.aggregate(per_token, mask, "grpo", batch).item() == pytest.approx(1.0)
    assert grpo.aggregate(per_token, mask, "dapo", batch).item() == pytest.approx(1.0)
    assert grpo.aggregate(per_token, mask, "dr_grpo", batch).item() == pytest.approx(5 / 20)
    per_token[1] = 2.0  # the long completion's tokens cost more: grpo averages per completion first
    assert grpo.aggregate(per_token, mask, "grpo", batch).item() == pytest.approx((1 + 2) / 2)
    assert grpo.aggregate(per_token, mask, "dapo", batch).item() == pytest.approx((1 + 8) / 5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), chunks=st.integers(1, 4), loss_type=st.sampled_from(grpo.LOSS_TYPES))
def test_chunks_of_a_batch_sum_to_the_batch_loss(seed, chunks, loss_type):
    new, old, ref, advantages, mask = random_batch(seed, rows=6)
    engine = grpo_self(loss_type=loss_type, beta=0.1)
    batch = critic_free.BatchSize(6, int(mask.sum()), 5)
    whole = grpo.Engine.loss(engine, new, old, ref, advantages, mask, batch)
    parts = sum(grpo.Engine.loss(engine, new[rows], old[rows], ref[rows], advantages[rows], mask[rows], batch)
                for rows in torch.arange(6).tensor_split(chunks))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-7)


def test_clipping_holds_back_only_the_side_the_advantage_pushes():
    # ratios e^0.5 = 1.65 and e^-0.5 = 0.61, against epsilon 0.2 below and 0.28 above
    new = torch.tensor([[0.5, -0.5], [0.5, -0.5], [0.1, 0.0]])
    old = torch.zeros(3, 2)
    advantages = torch.tensor([1.0, -1.0, 2.0])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    per_token = grpo.clipped_token_loss(new, old, advantages, 0.2, 0.28)
    # A > 0: a high ratio is clipped to 1.28, a low one is not (min keeps the unclipped, more pessimistic one)
    # A < 0: a low ratio is clipped to 0.8, a high one is not
    expected = [[-1.28, -math.exp(-0.5)], [math.exp(0.5), 0.8], [-2 * math.exp(0.1), -2.0]]
    assert per_token.tolist() == [pytest.approx(row) for row in expected]
    stats = grpo.clip_statistics(new, old, advantages, mask, 0.2, 0.28)
    assert stats["clip_ratio/high_mean"] == pytest.approx(1 / 5)  # row 0 token 0
    assert stats["clip_ratio/low_mean"] == pytest.approx(1 / 5)  # row 1 token 1
    assert stats["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    assert stats["clip_ratio/high_max"] == pytest.approx(0.5)  # the most clipped completion: 1 of its 2 tokens
    assert stats["clip_ratio/low_min"] == 0.0


def test_grpo_kl_term_is_k3_per_token_and_zero_where_the_policy_is_the_reference():
    new, old, ref, advantages, mask = random_batch(7)
    without = grpo.Engine.loss(grpo_self(beta=0.0), new, old, None, advantages, mask,
                               critic_free.BatchSize(4, int(mask.sum()), 5))
    on_reference = grpo.Engine.loss(grpo_self(beta=0.5), new, old, new.clone(), advantages, mask,
                                    critic_free.BatchSize(4, int(mask.sum()), 5))
    assert on_reference.item() == pytest.approx(without.item(), abs=1e-7)


# --- RLOO maths -------------------------------------------------------------------------------

def test_leave_one_out_baseline_matches_a_hand_computation():
    rewards = [1.0, 2.0, 6.0, 0.0, 4.0, 4.0]
    result = rloo.leave_one_out_advantages(torch.tensor(rewards), 3).tolist()
    expected = []
    for start in (0, 3):
        group = rewards[start:start + 3]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            expected.append(r - sum(others) / len(others))
    assert result == pytest.approx(expected)  # [-3, -1.5, 4.5, -4, 2, 2]


def rloo_self(**overrides):
    return SimpleNamespace(config=rloo.Config(**overrides))


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_subtract_beta_times_the_summed_k1_kl(normalize):
    _, old, ref, _, mask = random_batch(3, rows=4)
    scores = torch.tensor([1.0, 3.0, -2.0, 5.0])
    advantages, stats = rloo.Engine.advantages(rloo_self(num_generations=2, beta=0.1, normalize_advantages=normalize,
                                                         reward_clip_range=[-1.0, 4.0]),
                                               scores, mask, old, ref)
    rewards, kl_tokens = [], []
    for i, score in enumerate([1.0, 3.0, -1.0, 4.0]):  # clipped to [-1, 4] first
        kl = [old[i, t].item() - ref[i, t].item() for t in range(old.shape[1]) if mask[i, t]]
        rewards.append(score - 0.1 * sum(kl))
        kl_tokens += kl
    expected = [rewards[0] - rewards[1], rewards[1] - rewards[0], rewards[2] - rewards[3], rewards[3] - rewards[2]]
    if normalize:
        mean, std = statistics.mean(expected), statistics.stdev(expected)
        expected = [(a - mean) / (std + 1e-4) for a in expected]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-5)
    assert stats["kl"] == pytest.approx(sum(kl_tokens) / len(kl_tokens), rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_rloo_loss_clips_the_whole_completions_ratio(seed):
    new, old, _, advantages, mask = random_batch(seed)
    engine = rloo_self(epsilon=0.1, epsilon_high=0.3)
    loss = rloo.Engine.loss(engine, new, old, None, advantages, mask, critic_free.BatchSize(4, int(mask.sum()), 5))
    total, clipped_rows = 0.0, 0
    for i in range(4):
        log_ratio = sum(new[i, t].item() - old[i, t].item() for t in range(5) if mask[i, t])
        ratio = math.exp(log_ratio)
        clipped = min(max(ratio, 0.9), 1.3)
        total += -min(ratio * advantages[i].item(), clipped * advantages[i].item())
        clipped_rows += (ratio < 0.9 and advantages[i] < 0) or (ratio > 1.3 and advantages[i] > 0)
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)
    stats = rloo.Engine.iteration_statistics(engine, new, old, None, advantages, mask)
    assert stats["clip_ratio/region_mean"] == pytest.approx(clipped_rows / 4)


# --- shared metrics ---------------------------------------------------------------------------

def test_completion_and_reward_statistics_use_trl_names_and_meanings():
    stats = critic_free.completion_statistics(torch.tensor([3, 6, 6, 1]), torch.tensor([True, False, False, True]))
    assert stats == {"completions/mean_length": 4.0, "completions/min_length": 1.0, "completions/max_length": 6.0,
                     "completions/clipped_ratio": 0.5, "completions/mean_terminated_length": 2.0,
                     "completions/min_terminated_length": 1.0, "completions/max_terminated_length": 3.0}
    total = torch.tensor([1.0, 1.0, 0.0, 2.0])
    stats = critic_free.reward_statistics(total, {"letters": torch.tensor([-1.0, -1.0, 0.0, -2.0])}, 2)
    assert stats["reward"] == 1.0 and stats["reward_std"] == pytest.approx(statistics.stdev([1, 1, 0, 2]))
    assert stats["frac_reward_zero_std"] == 0.5  # the first group's two rewards are equal
    assert stats["rewards/letters/mean"] == -1.0


# --- the engines on the tiny model ------------------------------------------------------------

def make_engine(project, method, **overrides):
    config = runs.make_config(method, {**SMALL, **overrides})
    model, tokenizer = runs.load_model_state(project.db, None)
    torch.manual_seed(config.seed)
    policy = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    data = runs.gather_training_data(project.db, config)
    return runs.engine_module(method).Engine(config, policy, tokenizer, data, "cpu", project.path / "runs" / "0")


@pytest.mark.parametrize("method", METHODS)
def test_chunked_updates_equal_one_whole_batch_update(project, method):
    """num_minibatches only splits the work: the same update, up to float summation order."""
    add_prompts(project)
    results = []
    for chunks in (1, 3):
        engine = make_engine(project, method, num_minibatches=chunks, num_iterations=2, learning_rate=1e-2)
        torch.manual_seed(0)
        metrics = engine.train_step(0)
        results.append((metrics, [p.detach().clone() for p in engine.parameters]))
    (one, one_parameters), (three, three_parameters) = results
    # Adam divides each gradient by its own size, so summation-order noise in a near-zero gradient
    # entry moves it by up to ~1e-5 here: a thousandth of one update (lr 1e-2).
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one_parameters, three_parameters))
    assert three["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in one_parameters)


@pytest.mark.parametrize("method", METHODS)
def test_first_iteration_is_on_policy_and_later_ones_are_not(project, method, monkeypatch):
    add_prompts(project)
    engine = make_engine(project, method, num_iterations=3, learning_rate=5e-2, epsilon=0.01)
    seen = []
    original = engine.iteration_statistics
    monkeypatch.setattr(engine, "iteration_statistics", lambda *args: seen.append(args) or original(*args))
    engine.train_step(0)
    (first_new, first_old, *_), (last_new, last_old, *_) = seen[0], seen[-1]
    assert torch.equal(first_new, first_old)  # ratio exactly 1 before any update
    assert not torch.equal(last_new, last_old)  # the importance ratio is live in later iterations
    assert torch.equal(last_old, first_old)  # always against the sampling-time log-probs


def test_a_groups_completions_after_one_prompt_score_as_they_do_one_per_row(project):
    add_prompts(project)
    engine = make_engine(project, "grpo", max_completion_length=6)
    assert engine.takes_shared_layout
    pad, temperature = engine.tokenizer.pad_token_id, 0.7
    prompts = ["Q1:"] * 3 + ["A much longer question, the second:"] * 3  # prompts of two lengths: left padding
    lengths = [6, 2, 4, 1, 5, 3]  # completions of several lengths, some shorter than the longest
    generations = [Generation("", encode_prompt(engine.tokenizer, prompt), list(range(10, 10 + length)), True)
                   for prompt, length in zip(prompts, lengths)]
    rollout = ppo.make_rollout(prompts, generations, pad, "cpu")
    with torch.no_grad():
        one_per_row = ppo.forward_responses(engine.model, rollout, torch.arange(6), temperature, "cpu")
        # all rows; every other row (a rank's share of two); a chunk that cuts both groups
        row_sets = (torch.arange(6), torch.tensor([0, 2, 4]), torch.tensor([1, 2, 3]))
        for rows, head_only in itertools.product(row_sets, (True, False)):
            logprobs, entropies = critic_free.forward_groups(engine.model, rollout, rows, 3, temperature, pad, "cpu",
                                                             head_only)
            mask = rollout.mask[rows]
            assert torch.allclose(logprobs[mask], one_per_row.logprobs[rows][mask], atol=1e-5)
            expected_entropies = -(one_per_row.vocab_logprobs.exp() * one_per_row.vocab_logprobs).sum(-1)
            assert torch.allclose(entropies[mask], expected_entropies[rows][mask], atol=1e-5)
            assert not logprobs[~mask].any() and not entropies[~mask].any()  # nothing past a completion's end


@pytest.mark.parametrize("method", METHODS)
def test_a_step_with_shared_prompt_rows_is_the_step_with_one_row_per_completion(project, method):
    add_prompts(project)
    results = []
    for shared in (True, False):
        engine = make_engine(project, method, num_iterations=2, learning_rate=1e-2)
        engine.takes_shared_layout = shared
        metrics = engine.train_step(0)
        results.append((metrics, [p.detach().clone() for p in engine.parameters]))
    (shared_metrics, shared_parameters), (apart_metrics, apart_parameters) = results
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared_parameters, apart_parameters))
    for name in ("loss", "entropy", "reward", "kl", "clip_ratio/region_mean"):
        assert shared_metrics[name] == pytest.approx(apart_metrics[name], rel=1e-4, abs=1e-6), name


def test_truncated_completions_count_for_nothing_when_masked(project):
    add_prompts(project)
    engine = make_engine(project, "grpo", mask_truncated_completions=True, max_completion_length=4)
    prompts = ["Q1:"] * 6
    rollout = ppo.make_rollout(prompts, engine.generate(prompts, list(range(6))), engine.tokenizer.pad_token_id, "cpu")
    rollout.finished = torch.tensor([True, False, True, False, False, False])
    mask = engine.loss_mask(rollout)
    assert mask[[1, 3, 4, 5]].sum() == 0 and torch.equal(mask[[0, 2]], rollout.mask[[0, 2]])


@pytest.mark.parametrize("method", METHODS)
def test_the_tiny_model_learns_a_rule_reward(project, method):
    """Reward: +1 per letter. LoRA on the LM head too (see test_ppo: the tiny model's tied head is small)."""
    add_prompts(project, 16)
    config = runs.make_config(method, {
        **SMALL, "prompts_per_step": 4, "num_generations": 4, "max_completion_length": 12, "max_steps": 25,
        "checkpoint_every": 100, "learning_rate": 1e-2, "lr_scheduler": "constant",
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]})
    run_id = runs.create_run(project.db, config)
    assert runs.execute(project.path, run_id) == "completed"
    metrics = store.run_metrics(project.db, run_id)
    reward = metrics["reward"][1]
    early, late = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert late > early + 3  # about 2.4 letters in 12 random bytes at first
    assert metrics["rewards/letters/mean"][1] == pytest.approx([-r for r in reward])
    assert max(metrics["kl"][1]) < 30


@pytest.mark.parametrize("method", METHODS)
def test_stop_and_resume_give_the_same_run_as_no_interruption(project, method):
    add_prompts(project)
    overrides = {**SMALL, "max_steps": 4, "checkpoint_every": 2, "num_minibatches": 2, "num_iterations": 2,
                 "learning_rate": 1e-2}
    straight, interrupted = straight_and_interrupted(project, method, overrides)
    assert comparable_metrics(project.db, interrupted) == comparable_metrics(project.db, straight)
    assert [c["step"] for c in store.checkpoints(project.db, interrupted)] == [0, 2, 3, 4]  # 0: the start state
    for checkpoint in store.checkpoints(project.db, interrupted):  # eval samples at every checkpoint
        assert len(store.samples(project.db, checkpoint["id"])) == 4


def test_a_run_killed_with_sigkill_resumes_to_the_same_metrics(project):
    add_prompts(project)
    overrides = {**SMALL, "max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-2}
    straight = runs.create_run(project.db, runs.make_config("grpo", overrides))
    assert runs.execute(project.path, straight) == "completed"

    killed = runs.create_run(project.db, runs.make_config("grpo", overrides))
    process = RunProcess(project.path, killed)
    for message in process.messages():
        if message[0] == "metrics" and message[1]["step"] == 3:
            os.kill(process.pid, signal.SIGKILL)
    assert store.get_run(project.db, killed)["status"] == "failed"
    assert runs.execute(project.path, killed) == "completed"  # from the checkpoint at step 2
    straight_reward, killed_reward = (store.run_metrics(project.db, r)["reward"] for r in (straight, killed))
    assert killed_reward == straight_reward


def test_validate_explains_what_stops_a_launch(project):
    add_prompts(project)
    assert grpo.validate(runs.make_config("grpo"), project.db) == []
    assert rloo.validate(runs.make_config("rloo"), project.db) == []
    bad = runs.make_config("grpo", {"num_generations": 1, "loss_type": "bnpo", "scale_rewards": "yes",
                                    "epsilon_high": -0.1, "beta": -1, "num_minibatches": 99})
    problems = "\n".join(grpo.validate(bad, project.db))
    for expected in ("num_generations must be at least 2", "loss_type must be one of dapo, grpo, dr_grpo",
                     "scale_rewards", "epsilon_high must be positive", "beta must not be negative",
                     "num_minibatches (99)"):
        assert expected in problems
    problems = rloo.validate(runs.make_config("rloo", {"reward_clip_range": [2, 1]}), project.db)
    assert problems == ["reward_clip_range must be [low, high] with low < high (got [2, 1])"]
    with pytest.raises(runs.ConfigError, match="num_generations"):
        runs.create_run(project.db, bad)
