"""The PPO engine: the maths first (small pure functions), then rollouts and the training step.

Proximal Policy Optimization, as RLHF uses it (Ziegler et al. 2019; TRL's PPOTrainer; CleanRL's
ppo.py for the shape of this file). Each step:

1. **Rollout**: sample one response per prompt from the policy (the model with its LoRA adapter),
   with the KV cache, at ``temperature`` / ``top_p``, up to ``max_new_tokens`` or the end-of-turn
   token. Everything after the first stop token is masked out (masks come from lengths: the pad
   token is often the stop token). Each response's random numbers come from its own generator,
   seeded from (run seed, step, its row in the batch), so data-parallel processes can each sample
   a share of the prompts and together give the one-process batch (``sample_and_score``).
2. **Score**: the reward sources (``studio.core.rewards``) score each response; the reference
   (the same model with its adapter disabled) gives the log-probs the KL penalty is measured from.
3. **Advantages**: per-token reward = the score at the last response token, minus ``kl_coef`` times
   the per-token KL everywhere; then GAE over the response tokens with the values of the value head.
4. **Update**: ``ppo_epochs`` passes over ``num_minibatches`` minibatches of the clipped policy loss
   plus ``vf_coef`` times the clipped value loss (minus an optional entropy bonus).

The value head is a ``Linear(hidden, 1)`` on the policy's own last hidden state: no second model.
The policy stays in eval mode for the whole run, so dropout never makes the rollout and the training
forward passes differ (TRL disables dropout too). Rollout log-probs and values come from the very
function training uses (for the first minibatch, from the very same forward pass, which saves one
pass per step), so the probability ratio is exactly 1 on the first minibatch of the first epoch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import defaults, distributed, rewards, store
from .generation import Generation, encode_prompt, left_pad, row_uniforms, sample, stop_token_ids
from .progress import Progress, ignore
from .runs import TrainConfig, autocast, make_optimizer, peak_memory_mb


# --- the maths: tensors in, tensors out ---------------------------------------------------------
# Shapes: [batch, response_tokens] unless said otherwise; `mask` is True on real response tokens.

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std over the masked entries (unbiased variance, as TRL); 0 elsewhere."""
    mean = masked_mean(values, mask)
    centered = torch.where(mask, values - mean, 0)
    variance = (centered ** 2).sum() / (mask.sum() - 1).clamp(min=1)
    return centered * torch.rsqrt(variance + 1e-8)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens (Schulman, "Approximating KL").

    k1 = log p - log q: unbiased, noisy, can be negative per token. k3 = (r - 1) - log r with
    r = q / p: unbiased, never negative, lower variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019) when a target KL is given.

    Adaptive: after each batch, coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * samples / horizon,
    so the coefficient rises while the policy drifts further than the target, and falls otherwise.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, samples: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * samples / self.horizon


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, non_score_rewards): -kl_coef * kl on every token, plus the score on the last one.

    `scores`: [batch]; `kl`: zero after each response's end; `lengths`: response tokens per row.
    """
    non_score_rewards = -kl_coef * kl
    rewards = non_score_rewards.clone()
    rewards[torch.arange(len(scores)), lengths - 1] += scores
    return rewards, non_score_rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over each masked response.

    The episode ends at the last response token: nothing after it is worth anything.
    """
    rewards, values = torch.where(mask, rewards, 0), torch.where(mask, values, 0)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor  # share of tokens where the clipped objective was the binding one
    approxkl: torch.Tensor  # 0.5 * mean (log ratio)^2: how far this update moved from the rollout
    ratio: torch.Tensor  # mean probability ratio new / rollout


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> PolicyLoss:
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 ± cliprange))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return PolicyLoss(loss=masked_mean(torch.max(unclipped, clipped), mask),
                      clipfrac=masked_mean((clipped > unclipped).float(), mask),
                      approxkl=0.5 * masked_mean(log_ratio.detach() ** 2, mask),
                      ratio=masked_mean(ratio.detach(), mask))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipfrac): 0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within ± of the rollout's."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    return (0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask),
            masked_mean((clipped_error > unclipped_error).float(), mask))


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, from its log-softmax: [..., vocab] -> [...]."""
    finite = logprobs.clamp(min=torch.finfo(logprobs.dtype).min)  # masked tokens: 0 * -inf would be NaN
    return -(logprobs.exp() * finite).sum(-1)


def response_lengths(tokens: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, finished): tokens up to and including the first stop token, or all when none."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))
    finished = is_stop.any(dim=1)
    lengths = torch.where(finished, is_stop.int().argmax(dim=1) + 1, tokens.shape[1])
    return lengths, finished


# --- configuration ----------------------------------------------------------------------------

@dataclass
class Config(TrainConfig):
    method: str = "ppo"
    learning_rate: float = defaults.small("ppo", "learning_rate")  # measured on the demo: docs/defaults.md
    prompts_per_step: int = 8  # rollouts per step: one sampled response per prompt
    max_new_tokens: int = 48  # longest response; a response is cut there if it has not stopped
    temperature: float = 0.7  # sampling temperature; log-probs use the same temperature (as TRL)
    top_p: float = 1.0  # nucleus sampling; log-probs still come from the full distribution (as TRL)
    ppo_epochs: int = 1  # optimisation passes over each batch of rollouts
    num_minibatches: int = 1  # each pass splits the batch into this many optimizer steps
    cliprange: float = 0.2  # the policy ratio is clipped to 1 ± this
    cliprange_value: float = 0.2  # values move at most this far from the rollout's per update
    vf_coef: float = 0.1  # weight of the value loss next to the policy loss (both train the shared adapter)
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda: lower trades variance for bias
    kl_coef: float = defaults.small("ppo", "kl_coef")  # per-token penalty for drifting from the reference (starting value if adaptive)
    kl_estimator: str = "k1"  # "k1" (log-ratio) or "k3" (never negative, lower variance)
    adaptive_kl: bool = False  # move kl_coef to keep the KL near target_kl (Ziegler et al.)
    target_kl: float = 6.0  # adaptive only: KL per response (nats, summed over tokens) to aim for
    kl_horizon: int = 10000  # adaptive only: samples over which the coefficient adapts
    whiten_advantages: bool = True  # normalise advantages over each batch's response tokens
    entropy_coef: float = 0.0  # bonus for the policy's entropy: keeps exploring
    missing_eos_penalty: float | None = None  # subtracted from the score of responses that never stop
    reward_sources: list[dict] = field(default_factory=rewards.demo_preset)  # see rewards.describe_sources()
    reward_normalization: bool = False  # scores become (score - running mean) / running std
    reward_clip: float | None = None  # scores are clipped to ± this (after normalisation)
    prompt_dataset_ids: list[int] | None = None  # prompt datasets to train on; None: every non-eval one


def training_prompts(db, dataset_ids: list[int] | None) -> list[dict]:
    rows = store.prompts(db, train_only=True)
    return rows if dataset_ids is None else [r for r in rows if r["dataset_id"] in dataset_ids]


def select_data(config: Config, db) -> dict:
    """The run's TrainingData fields (see ``runs.gather_training_data``)."""
    return {"prompts": [{"id": row["id"], "prompt": row["prompt"]}
                        for row in training_prompts(db, config.prompt_dataset_ids)]}


def run_prompts(data) -> tuple[list[int], dict]:
    """(ids of the prompts a shaping run trains on, {id: prompt}) from its TrainingData."""
    return [row["id"] for row in data.prompts], {row["id"]: row["prompt"] for row in data.prompts}


def validate(config: Config, db) -> list[str]:
    problems = []
    at_least_one = ("prompts_per_step", "max_new_tokens", "ppo_epochs", "num_minibatches", "max_steps", "kl_horizon")
    problems += [f"{name} must be at least 1 (got {getattr(config, name)})"
                 for name in at_least_one if getattr(config, name) < 1]
    positive = ("temperature", "cliprange", "cliprange_value", "learning_rate", "target_kl")
    problems += [f"{name} must be positive (got {getattr(config, name)})"
                 for name in positive if not getattr(config, name) > 0]
    not_negative = ("vf_coef", "kl_coef", "entropy_coef")
    problems += [f"{name} must not be negative (got {getattr(config, name)})"
                 for name in not_negative if not getattr(config, name) >= 0]
    problems += [f"{name} must be between 0 and 1 (got {getattr(config, name)})"
                 for name in ("gamma", "lam") if not 0 <= getattr(config, name) <= 1]
    if not 0 < config.top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (got {config.top_p})")
    if config.num_minibatches > config.prompts_per_step:
        problems.append(f"num_minibatches ({config.num_minibatches}) cannot exceed prompts_per_step "
                        f"({config.prompts_per_step})")
    if config.kl_estimator not in ("k1", "k3"):
        problems.append(f"kl_estimator must be 'k1' or 'k3' (got {config.kl_estimator!r})")
    if config.missing_eos_penalty is not None and config.missing_eos_penalty < 0:
        problems.append(f"missing_eos_penalty must not be negative (got {config.missing_eos_penalty})")
    if config.reward_clip is not None and not config.reward_clip > 0:
        problems.append(f"reward_clip must be positive (got {config.reward_clip})")
    return problems + data_problems(config, db)


def data_problems(config, db) -> list[str]:
    """What a shaping run (PPO, GRPO, RLOO) needs from the project: training prompts and usable reward sources."""
    problems = []
    if config.prompt_dataset_ids is not None:
        usable = {r["dataset_id"] for r in store.prompts(db, train_only=True)}
        problems += [f"dataset {i} is not a training prompt dataset of this project"
                     for i in config.prompt_dataset_ids if i not in usable]
    if not training_prompts(db, config.prompt_dataset_ids):
        problems.append("no training prompts: import a prompt dataset (eval prompts are never trained on)")
    problems += rewards.check_sources(config.reward_sources, rewards.project_folder(db))
    return problems


# --- data order: a pure function of the step and the run's prompts (fixed at its start) -------

@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_prompts: int) -> tuple[int, ...]:
    return tuple(torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def prompt_indices(seed: int, step: int, per_step: int, num_prompts: int) -> list[int]:
    """The prompts of `step`: the next `per_step` positions of a seeded permutation per epoch."""
    positions = range(step * per_step, (step + 1) * per_step)
    return [epoch_order(seed, p // num_prompts, num_prompts)[p % num_prompts] for p in positions]


def saved_prompt_ids(state: dict, prompts_by_id: dict) -> list[int]:
    """The prompt ids a checkpoint's run started with. Prompts imported since then stay out of the
    run: the data order stays the same."""
    prompt_ids = state["prompt_ids"].tolist()
    missing = [i for i in prompt_ids if i not in prompts_by_id]
    if missing:
        raise ValueError(f"{len(missing)} of the run's training prompts are no longer in the project")
    return prompt_ids


# --- rollouts ---------------------------------------------------------------------------------

@dataclass
class Rollout:
    """A batch of prompts (left-padded) with their sampled responses (right-padded)."""

    prompts: list  # as stored: chat messages or plain text
    input_ids: torch.Tensor  # [batch, context_length + response width]
    attention_mask: torch.Tensor  # 1 on prompt and response tokens, 0 on padding and after the stop token
    context_length: int  # width of the padded prompts: responses start there
    lengths: torch.Tensor  # [batch] response tokens, the stop token included
    finished: torch.Tensor  # [batch] True when the response ended with a stop token
    texts: list[str]  # the responses as text, special tokens left out

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.context_length:]

    @property
    def mask(self) -> torch.Tensor:
        """[batch, response width] True on each response's real tokens."""
        positions = torch.arange(self.responses.shape[1], device=self.lengths.device)
        return positions < self.lengths[:, None]


def rollout_seed(seed: int, step: int, row: int) -> int:
    """The seed of the random numbers that sample row `row` of step `step`'s batch: a function of the
    run's seed and the row's place in the batch, never of the process that samples it or of the rows
    sampled beside it, so the batch is the same whatever the number of processes."""
    digest = hashlib.blake2b(f"{seed}/{step}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_generations(model, tokenizer, prompts: list, seeds: list[int], max_new_tokens: int, temperature: float,
                       top_p: float, stop_ids: list[int], device: str) -> list[Generation]:
    """Sample one response per prompt, prompt i's with the random numbers of seeds[i].
    Log-probs are not taken from sampling but from `forward_responses`."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    prompt_ids, prompt_mask = left_pad(encoded, tokenizer.pad_token_id, device)
    with autocast(device):
        generated = sample(model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, tokenizer.pad_token_id,
                           temperature, top_p, uniforms=row_uniforms(seeds, max_new_tokens, device))
    lengths, finished = response_lengths(generated, stop_ids)
    responses = [row[:n] for row, n in zip(generated.tolist(), lengths.tolist())]
    return [Generation(tokenizer.decode(response, skip_special_tokens=True), ids, response, done)
            for ids, response, done in zip(encoded, responses, finished.tolist())]


def make_rollout(prompts: list, generations: list[Generation], pad_id: int, device: str) -> Rollout:
    """The batch of `generations` (of `prompts`): prompts left-padded, responses right-padded."""
    prompt_ids, prompt_mask = left_pad([g.prompt_ids for g in generations], pad_id, device)
    lengths = torch.tensor([len(g.response_ids) for g in generations], device=device)
    responses = torch.full((len(generations), int(lengths.max())), pad_id, dtype=torch.long)
    for row, generation in enumerate(generations):
        responses[row, :len(generation.response_ids)] = torch.tensor(generation.response_ids)
    response_mask = torch.arange(responses.shape[1], device=device) < lengths[:, None]
    return Rollout(prompts, torch.cat([prompt_ids, responses.to(device)], dim=1),
                   torch.cat([prompt_mask, response_mask.long()], dim=1), prompt_ids.shape[1], lengths,
                   torch.tensor([g.finished for g in generations], device=device), [g.text for g in generations])


class StepSample(NamedTuple):
    """A step's rollouts and their rewards, whole, on every rank."""

    rollout: Rollout
    rewards: torch.Tensor  # [batch] the reward sources' weighted total
    breakdown: dict[str, torch.Tensor]  # each source's raw scores
    most_per_process: int  # the most rows one process sampled and scored
    generation_seconds: float  # this process's sampling


def sample_and_score(prompts: list, seeds: list[int], group_size: int,
                     generate: Callable[[list, list[int]], list[Generation]],
                     reward_function: rewards.RewardFunction, pad_id: int, device: str) -> StepSample:
    """This process samples and scores its share of the step's rows (whole groups of `group_size`
    adjacent rows; all of them in one process), then every process gets every row back, in order."""
    started = time.perf_counter()
    mine = distributed.shard_groups(len(prompts), group_size)
    generations = generate([prompts[i] for i in mine], [seeds[i] for i in mine]) if mine else []
    generated = time.perf_counter()
    rows = []  # (generation, total reward, each source's score) per row
    if mine:
        total, breakdown = reward_function([prompts[i] for i in mine], [g.text for g in generations])
        sources = [scores.tolist() for scores in breakdown.values()]
        rows = [(g, reward, [scores[k] for scores in sources])
                for k, (g, reward) in enumerate(zip(generations, total.tolist()))]
    shares = distributed.all_gather_object((mine, rows))
    batch = [None] * len(prompts)
    for indices, share in shares:
        for index, row in zip(indices, share):
            batch[index] = row
    breakdown = {name: torch.tensor([row[2][j] for row in batch]) for j, name in enumerate(reward_function.names)}
    return StepSample(make_rollout(prompts, [row[0] for row in batch], pad_id, device),
                      torch.tensor([row[1] for row in batch]), breakdown,
                      max(len(indices) for indices, _ in shares), generated - started)


class ResponseForward(NamedTuple):
    output: object  # the model's output (hidden states in it when asked for)
    predicting: torch.Tensor  # the positions whose logits predict a response token
    logprobs: torch.Tensor  # [rows, response width] of the response tokens, at the sampling temperature
    vocab_logprobs: torch.Tensor  # [rows, response width, vocab]: log-softmax of the logits at the temperature


def forward_responses(model, rollout: Rollout, rows: torch.Tensor, temperature: float, device: str,
                      hidden_states: bool = False) -> ResponseForward:
    """The policy's log-probs at the response positions of rollout rows `rows`: one forward pass.

    The LM head runs only on the positions that predict a response token (logits_to_keep).
    """
    attention_mask = rollout.attention_mask[rows]
    width, length = rollout.responses.shape[1], rollout.input_ids.shape[1]
    # Position i predicts token i + 1: the positions before each response token, the last one left out.
    # As indices (not a count), the LM head gets a contiguous input: one plain matmul, not a batched one.
    predicting = torch.arange(length - width - 1, length - 1, device=device)
    with autocast(device):
        output = model(input_ids=rollout.input_ids[rows], attention_mask=attention_mask,
                       position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
                       logits_to_keep=predicting, output_hidden_states=hidden_states, use_cache=False)
    # One vocabulary-sized log-softmax serves the sampled tokens' log-probs and the entropy.
    vocab_logprobs = torch.log_softmax(output.logits.float() / temperature, dim=-1)
    logprobs = vocab_logprobs.gather(-1, rollout.responses[rows].unsqueeze(-1)).squeeze(-1)
    return ResponseForward(output, predicting, logprobs, vocab_logprobs)


def sharded_logprobs(forward: Callable[[torch.Tensor], torch.Tensor], rollout: Rollout, chunks: int,
                     device: str) -> torch.Tensor:
    """[batch, response width] log-probs of the whole rollout, `forward(rows)` giving those of rows
    `rows`, in `chunks` chunks: this rank computes its share of each chunk, the others' arrive by an
    all-reduce (the other rows are 0 on each rank until then)."""
    logprobs = torch.zeros(rollout.responses.shape, device=device)
    for rows in map(distributed.shard, torch.arange(len(rollout)).tensor_split(chunks)):
        if len(rows):
            logprobs[rows] = forward(rows)
    return distributed.all_reduce_sum(logprobs)


class ForwardOutput(NamedTuple):
    logprobs: torch.Tensor  # [rows, response width] of the response tokens, at the sampling temperature
    values: torch.Tensor  # [rows, response width] value-head estimate before each response token
    vocab_logprobs: torch.Tensor  # [rows, response width, vocab]: log-softmax of the logits at the temperature


# --- the engine -------------------------------------------------------------------------------

class Engine:
    def __init__(self, config: Config, policy, tokenizer, data, device: str, run_dir: Path,
                 on_progress: Progress = ignore) -> None:
        self.config, self.model, self.tokenizer, self.device = config, policy, tokenizer, device
        self.prompt_ids, self.prompts_by_id = run_prompts(data)  # the run's prompts, fixed when it starts
        self.stop_ids = stop_token_ids(tokenizer, policy)
        policy.eval()  # for the whole run: see the module docstring

        hidden_size = policy.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden_size, 1).to(device)
        torch.nn.init.zeros_(self.value_head.weight)  # values start at 0, and no random number is drawn
        torch.nn.init.zeros_(self.value_head.bias)
        self.parameters = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer, self.scheduler = make_optimizer(config, self.parameters)

        self.kl_controller = KLController(config.kl_coef, config.target_kl if config.adaptive_kl else None,
                                          config.kl_horizon)
        self.normalizer = rewards.RewardNormalizer(config.reward_normalization, config.reward_clip)
        on_progress("Loading the reward sources", 0, 1)  # a trained reward model is a second model to load
        self.reward_function = rewards.RewardFunction(config.reward_sources, tokenizer, data.reward_root, device)
        on_progress("Loading the reward sources", 1, 1)

    # -- the one forward pass: rollout statistics and training both use it --

    def forward(self, rollout: Rollout, rows: torch.Tensor) -> ForwardOutput:
        """Log-probs, values and logits at the response positions of rollout rows `rows`."""
        forward = forward_responses(self.model, rollout, rows, self.config.temperature, self.device,
                                    hidden_states=True)
        with autocast(self.device):
            values = self.value_head(forward.output.hidden_states[-1][:, forward.predicting]).squeeze(-1).float()
        return ForwardOutput(forward.logprobs, values, forward.vocab_logprobs)

    # -- rollout and scoring --

    @torch.no_grad()
    def generate(self, prompts: list, seeds: list[int]) -> list[Generation]:
        config = self.config
        return sample_generations(self.model, self.tokenizer, prompts, seeds, config.max_new_tokens,
                                  config.temperature, config.top_p, self.stop_ids, self.device)

    def score(self, rollout: Rollout, total: torch.Tensor) -> torch.Tensor:
        """The scores used for training, from the reward sources' weighted total: normalised, clipped, penalised."""
        scores = self.normalizer(total).to(self.device)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~rollout.finished).float()
        return scores

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Log-probs of the responses under the reference: the same model with its adapter disabled."""
        with self.model.disable_adapter():
            return sharded_logprobs(lambda rows: self.forward(rollout, rows).logprobs, rollout,
                                    self.config.num_minibatches, self.device)

    # -- the update --

    def optimize(self, rollout: Rollout, scores: torch.Tensor, ref_logprobs: torch.Tensor) -> dict:
        """Advantages from the rollout, then the PPO epochs; returns the step's statistics."""
        config = self.config
        mask = rollout.mask
        epochs = [torch.randperm(len(rollout)).tensor_split(config.num_minibatches) for _ in range(config.ppo_epochs)]
        # Data-parallel: every rank holds the whole rollout (each sampled its share; see
        # `sample_and_score`) and runs the forward passes of its share of each minibatch; the rest
        # is computed whole on every rank.
        mine = [[distributed.shard(rows) for rows in minibatches] for minibatches in epochs]

        # The first minibatch's forward pass serves twice: the policy has not moved yet, so it gives
        # those rows' rollout log-probs and values, and then their first training loss (a pass saved).
        first = self.forward(rollout, mine[0][0]) if len(mine[0][0]) else None
        old_logprobs, old_values = torch.zeros_like(ref_logprobs), torch.zeros_like(ref_logprobs)
        if first is not None:
            old_logprobs[mine[0][0]], old_values[mine[0][0]] = first.logprobs.detach(), first.values.detach()
        with torch.no_grad():
            for rows in mine[0][1:]:
                if len(rows):
                    output = self.forward(rollout, rows)
                    old_logprobs[rows], old_values[rows] = output.logprobs, output.values
        distributed.all_reduce_sum(old_logprobs)
        distributed.all_reduce_sum(old_values)

        kl = torch.where(mask, kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator), 0)
        kl_coef = self.kl_controller.coef
        token_reward, non_score_reward = token_rewards(scores, kl, kl_coef, rollout.lengths)
        advantages, returns = gae(token_reward, old_values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        names = ("policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                 "val/clipfrac_avg", "val/ratio", "policy/entropy_avg")
        history = defaultdict(list)
        for minibatches, my_minibatches in zip(epochs, mine):
            for rows, my_rows in zip(minibatches, my_minibatches):
                # Each mean below is over this rank's tokens; weighted by their share of the
                # minibatch's tokens, the ranks' terms add up to the mean over the whole minibatch.
                share = mask[my_rows].sum() / mask[rows].sum().clamp(min=1)
                statistics = torch.zeros(len(names), device=self.device)
                if len(my_rows):
                    if first is not None:  # epoch 0, minibatch 0: its forward pass is done already
                        output, first = first, None
                    else:
                        output = self.forward(rollout, my_rows)
                    rows_mask = mask[my_rows]
                    policy = policy_loss(output.logprobs, old_logprobs[my_rows], advantages[my_rows], rows_mask,
                                         config.cliprange)
                    value, value_clipfrac = value_loss(output.values, old_values[my_rows], returns[my_rows],
                                                       rows_mask, config.cliprange_value)
                    with torch.set_grad_enabled(config.entropy_coef > 0):
                        entropy = masked_mean(entropy_from_logprobs(output.vocab_logprobs), rows_mask)
                    loss = policy.loss + config.vf_coef * value - config.entropy_coef * entropy
                    (share * loss).backward()
                    statistics = share * torch.stack([policy.approxkl, policy.clipfrac, policy.loss.detach(),
                                                      value.detach(), value_clipfrac, policy.ratio, entropy.detach()])
                distributed.sum_gradients(self.parameters)
                distributed.all_reduce_sum(statistics)
                torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm or math.inf)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for name, number in zip(names, statistics.tolist()):
                    history[name].append(number)

        mean_kl = kl.sum(1).mean().item()
        self.kl_controller.update(mean_kl, len(rollout))
        return {
            "objective/kl": mean_kl,
            "objective/entropy": torch.where(mask, -old_logprobs, 0).sum(1).mean().item(),
            "objective/non_score_reward": non_score_reward.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score_reward.sum(1)).mean().item(),
            "objective/scores": scores.mean().item(),
            **{name: sum(numbers) / len(numbers) for name, numbers in history.items()},
            "kl_coef": kl_coef,
        }

    def train_step(self, step: int) -> dict:
        config = self.config
        started = time.perf_counter()
        indices = prompt_indices(config.seed, step, config.prompts_per_step, len(self.prompt_ids))
        prompts = [self.prompts_by_id[self.prompt_ids[i]] for i in indices]
        seeds = [rollout_seed(config.seed, step, row) for row in range(len(prompts))]
        batch = sample_and_score(prompts, seeds, 1, self.generate, self.reward_function, self.tokenizer.pad_token_id,
                                 self.device)
        rollout = batch.rollout
        scores = self.score(rollout, batch.rewards)
        ref_logprobs = self.reference_logprobs(rollout)
        scored = time.perf_counter()
        learning_rate = self.scheduler.get_last_lr()[0]
        statistics = self.optimize(rollout, scores, ref_logprobs)
        self.scheduler.step()  # once per step, however many minibatch updates it made (as TRL)
        trained = time.perf_counter()
        tokens = int(rollout.attention_mask.sum())
        return {
            **statistics,
            # What the advisor judges: objective/scores is after normalisation, clipping and penalties.
            "objective/raw_reward": batch.rewards.mean().item(),
            **{f"reward/{name}": values.mean().item() for name, values in batch.breakdown.items()},
            "response_length_mean": rollout.lengths.float().mean().item(),
            "stop_token_rate": rollout.finished.float().mean().item(),
            "learning_rate": learning_rate,
            "samples_seen": (step + 1) * config.prompts_per_step,
            "rollouts_per_process": batch.most_per_process,
            "tokens_per_second": tokens / (trained - started),
            "time/generation": batch.generation_seconds,
            "time/scoring": scored - started - batch.generation_seconds,
            "time/training": trained - scored,
            "memory/peak_mb": peak_memory_mb(self.device),
        }

    # -- checkpoint state beyond adapter, optimizer, scheduler and RNG --

    def extra_state(self) -> dict:
        return {"value_head": self.value_head.state_dict(),
                "kl_coef": torch.tensor(self.kl_controller.coef, dtype=torch.float64),
                "reward_normalizer": self.normalizer.state_dict(),
                "prompt_ids": torch.tensor(self.prompt_ids)}

    def load_extra_state(self, state: dict) -> None:
        self.prompt_ids = saved_prompt_ids(state, self.prompts_by_id)
        self.value_head.load_state_dict(state["value_head"])
        self.kl_controller.coef = float(state["kl_coef"])
        self.normalizer.load_state_dict(state["reward_normalizer"])
