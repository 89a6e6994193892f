"""What the critic-free shaping engines (GRPO, RLOO) share: groups of completions, their scores and
log-probs, the update loop, and TRL's completion and reward metrics.

Each step:

1. **Rollout**: ``prompts_per_step`` prompts, each repeated ``num_generations`` times in a row (a
   group, as TRL's RepeatSampler lays them out), sampled in one batch with PPO's rollout function
   (``ppo.sample_and_score``: the KV-cache loop of ``generation.sample``, masks from lengths,
   each completion's random numbers seeded from (run seed, step, its row)). Data-parallel, each
   process samples and scores whole groups (every N-th prompt), and every process gets the whole
   batch back, so the batch-wide numbers (``scale_rewards="batch"``, normalised advantages, the
   metrics) are the one-process ones; the forward and backward passes are split by rows of each chunk.
   Every forward pass puts a group's completions in one row after their prompt (``forward_groups``),
   so the prompt is computed once per group, not once per completion; sampling shares each prompt's
   prefill the same way (``generation.sample``).
2. **Score**: the reward sources score each completion (their weighted sum is the reward); the
   reference (the same model with its adapter disabled) gives per-token log-probs when ``beta`` > 0.
3. **Advantages**: one number per completion, from its group; the engine module says how.
4. **Update**: ``num_iterations`` optimizer steps (TRL's μ) on the same completions. Each step's
   gradient is accumulated over ``num_minibatches`` chunks of the batch; the loss is normalised by
   totals over the whole batch, so chunking saves memory without changing the update. The importance
   ratio is new / sampling-time log-probs: exactly 1 in the first iteration, whose forward passes
   also give the sampling-time log-probs (the policy has not moved yet, so no extra pass is needed).

A step here is one generation round. TRL counts each of the μ optimizer steps as a step; with the
default μ = 1 both count the same. The learning-rate schedule advances once per step, as PPO's does.
No value head: the policy is the only trained thing, so a checkpoint holds the adapter, optimizer,
scheduler, RNG and the run's prompt ids, and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from . import distributed, rewards
from .batches import (attention_takes_shared_layout, collate_shared, head_only_matches_forward, scored_logits,
                      within_sliding_window)
from .generation import Generation, stop_token_ids
from .progress import Progress, ignore
from .ppo import (Rollout, data_problems, entropy_from_logprobs, forward_responses, prompt_indices, rollout_seed,
                  run_prompts, sample_and_score, sample_generations, saved_prompt_ids, select_data, sharded_logprobs)
from .runs import TrainConfig, autocast, make_optimizer, peak_memory_mb


# --- the maths every critic-free engine uses --------------------------------------------------

def group_view(values: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[prompts * num_generations] -> [prompts, num_generations]: a group's completions are adjacent."""
    return values.view(-1, num_generations)


def completion_statistics(lengths: torch.Tensor, finished: torch.Tensor) -> dict[str, float]:
    """TRL's completions/* metrics: lengths in tokens (the stop token counted), the share cut off at the
    length limit (clipped_ratio), and the lengths of those that ended with a stop token."""
    lengths = lengths.float()
    terminated = lengths[finished] if bool(finished.any()) else torch.zeros(1)
    return {"completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": (~finished).float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item(),
            "completions/min_terminated_length": terminated.min().item(),
            "completions/max_terminated_length": terminated.max().item()}


def reward_statistics(total: torch.Tensor, breakdown: dict[str, torch.Tensor],
                      num_generations: int) -> dict[str, float]:
    """TRL's reward metrics: the weighted reward's mean and std over the batch, the share of
    completions whose group has one reward for all (no signal: advantage 0), each source's raw mean and std."""
    group_std = group_view(total, num_generations).std(dim=1)
    return {"reward": total.mean().item(), "reward_std": total.std().item(),
            "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item(),
            **{f"rewards/{name}/{kind}": getattr(scores, kind)().item()
               for name, scores in breakdown.items() for kind in ("mean", "std")}}


class BatchSize(NamedTuple):
    """Totals over the whole generation batch that the loss is normalised by (any chunk of it sees them)."""

    sequences: int  # completions in the batch
    tokens: int  # completion tokens that count in the loss (after masking)
    max_completion_length: int


ENTROPY_CHUNK = 256  # positions per entropy computation


def forward_groups(model, rollout: Rollout, rows: torch.Tensor, group_size: int, temperature: float,
                   pad_id: int, device: str, head_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies of the next-token distribution), both [rows, width], at the completion
    tokens of rollout rows `rows`, with each group's completions in one row after their prompt,
    computed once (``batches.collate_shared``); 0 past each completion's end, where nothing counts."""
    row_numbers = rows.tolist()
    members: dict[int, list[int]] = {}  # group -> the places in `rows` of its rows
    for place, row in enumerate(row_numbers):
        members.setdefault(row // group_size, []).append(place)
    prompt_ids, prompt_mask = (values[:, :rollout.context_length] for values in (rollout.input_ids, rollout.attention_mask))
    lengths = rollout.lengths.tolist()

    def prompt(row: int) -> list[int]:
        return prompt_ids[row][prompt_mask[row].bool()].tolist()

    def completion(row: int) -> list[int]:
        return rollout.responses[row, :lengths[row]].tolist()

    groups = [(prompt(row_numbers[places[0]]), [completion(row_numbers[place]) for place in places])
              for places in members.values()]
    batch = collate_shared(groups, pad_id).to(device)
    with autocast(device):
        logits = scored_logits(model, batch, head_only)
    # In place: of the vocabulary-sized tensors, only the log-softmax is kept for the backward pass.
    vocab_logprobs = torch.log_softmax(logits.float().div_(temperature), dim=-1)
    places = torch.tensor([place for places in members.values() for place in places], device=device)
    where = (places[batch.responses], batch.offsets)
    shape = (len(rows), rollout.responses.shape[1])
    logprobs = vocab_logprobs.new_zeros(shape).index_put(where, vocab_logprobs.gather(1, batch.targets[:, None])[:, 0])
    with torch.no_grad():  # a few hundred positions at a time: no more vocabulary-sized temporaries than that
        entropy = torch.cat([entropy_from_logprobs(chunk) for chunk in vocab_logprobs.split(ENTROPY_CHUNK)])
        entropies = vocab_logprobs.new_zeros(shape).index_put(where, entropy)
    return logprobs, entropies


# --- configuration ----------------------------------------------------------------------------

@dataclass
class Config(TrainConfig):
    prompts_per_step: int = 4  # distinct prompts per step; each gets num_generations completions
    num_generations: int = 4  # completions per prompt: the group its advantages are measured in
    max_completion_length: int = 48  # longest completion; one is cut there if it has not stopped
    temperature: float = 1.0  # sampling temperature (TRL's default); log-probs use the same temperature
    top_p: float = 1.0  # nucleus sampling; log-probs still come from the full distribution (as TRL)
    num_iterations: int = 1  # optimizer steps on each batch of completions (TRL's μ), with the importance ratio
    num_minibatches: int = 1  # chunks each update's gradient is accumulated over: memory only, same update
    beta: float = 0.0  # weight of the KL to the reference (0: no reference pass); each method sets its default
    epsilon: float = 0.2  # the importance ratio is clipped to 1 - epsilon ...
    epsilon_high: float | None = None  # ... and 1 + epsilon_high (None: epsilon; DAPO's clip-higher uses 0.28)
    mask_truncated_completions: bool = False  # completions cut at the length limit count for nothing (DAPO)
    reward_sources: list[dict] = field(default_factory=rewards.demo_preset)  # see rewards.describe_sources()
    prompt_dataset_ids: list[int] | None = None  # prompt datasets to train on; None: every non-eval one

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def validate(config: Config, db) -> list[str]:
    """Problems with the settings every critic-free engine shares, then with the project's data."""
    problems = []
    at_least_one = ("prompts_per_step", "max_completion_length", "num_iterations", "num_minibatches", "max_steps")
    problems += [f"{name} must be at least 1 (got {getattr(config, name)})"
                 for name in at_least_one if getattr(config, name) < 1]
    if config.num_generations < 2:
        problems.append(f"num_generations must be at least 2: a group of one has no baseline "
                        f"(got {config.num_generations})")
    positive = ("temperature", "epsilon", "learning_rate")
    problems += [f"{name} must be positive (got {getattr(config, name)})"
                 for name in positive if not getattr(config, name) > 0]
    if config.epsilon_high is not None and not config.epsilon_high > 0:
        problems.append(f"epsilon_high must be positive (got {config.epsilon_high})")
    if not config.beta >= 0:
        problems.append(f"beta must not be negative (got {config.beta})")
    if not 0 < config.top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (got {config.top_p})")
    completions = config.prompts_per_step * config.num_generations
    if config.num_minibatches > completions:
        problems.append(f"num_minibatches ({config.num_minibatches}) cannot exceed the completions per step "
                        f"({completions} = prompts_per_step x num_generations)")
    return problems + data_problems(config, db)


# --- the engine: the loop; subclasses give the advantages and the loss ------------------------

class Iteration(NamedTuple):
    """One optimizer step's view of the batch, for the metrics (all detached, whole batch)."""

    logprobs: torch.Tensor  # [completions, width] under the policy before this step's update
    entropy: float  # mean over counted tokens of the next-token distribution's entropy
    loss: float


class Engine:
    """Subclasses define ``advantages``, ``loss`` and ``iteration_statistics`` (their maths), and may
    set ``advantages_need_logprobs`` when the advantages use the sampling-time log-probs (RLOO's KL)."""

    advantages_need_logprobs = False

    def __init__(self, config: Config, policy, tokenizer, data, device: str, run_dir: Path,
                 on_progress: Progress = ignore) -> None:
        self.config, self.model, self.tokenizer, self.device = config, policy, tokenizer, device
        self.prompt_ids, self.prompts_by_id = run_prompts(data)  # the run's prompts, fixed when it starts
        self.stop_ids = stop_token_ids(tokenizer, policy)
        policy.eval()  # for the whole run: no dropout, so sampling and training passes agree (as TRL)
        self.parameters = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(config, self.parameters)
        self.reward_function = rewards.RewardFunction(config.reward_sources, tokenizer, data.reward_root, device)
        self.takes_shared_layout = attention_takes_shared_layout(policy)
        self.head_only = head_only_matches_forward(policy)

    # -- the maths of the method --

    def advantages(self, scores: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor | None,
                   ref_logprobs: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def loss(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
             advantages: torch.Tensor, mask: torch.Tensor, batch: BatchSize) -> torch.Tensor:
        raise NotImplementedError

    def iteration_statistics(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                             ref_logprobs: torch.Tensor | None, advantages: torch.Tensor,
                             mask: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    # -- rollout and scoring --

    @torch.no_grad()
    def generate(self, prompts: list, seeds: list[int]) -> list[Generation]:
        config = self.config
        return sample_generations(self.model, self.tokenizer, prompts, seeds, config.max_completion_length,
                                  config.temperature, config.top_p, self.stop_ids, self.device)

    def chunks(self, rollout: Rollout) -> tuple[torch.Tensor, ...]:
        return torch.arange(len(rollout)).tensor_split(self.config.num_minibatches)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """[completions, width] log-probs of the completions under the current model, chunk by chunk
        (data-parallel: this rank's share of each chunk, the rest gathered)."""
        return sharded_logprobs(lambda rows: self.forward(rollout, rows)[0], rollout, self.config.num_minibatches,
                                self.device)

    def forward(self, rollout: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) at rows `rows`' completion tokens: each group's completions after their
        prompt in one row where the model takes that layout, else one row per completion."""
        config = self.config
        if self.takes_shared_layout and within_sliding_window(self.model, rollout.input_ids.shape[1]):
            return forward_groups(self.model, rollout, rows, config.num_generations, config.temperature,
                                  self.tokenizer.pad_token_id, self.device, self.head_only)
        forward = forward_responses(self.model, rollout, rows, config.temperature, self.device)
        with torch.no_grad():
            return forward.logprobs, entropy_from_logprobs(forward.vocab_logprobs)

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        """Under the reference (the adapter disabled); None when beta is 0 and nothing needs them."""
        if self.config.beta == 0:
            return None
        with self.model.disable_adapter():
            return self.logprobs(rollout)

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """The completion tokens that count: none of a truncated completion's when they are masked."""
        if self.config.mask_truncated_completions:
            return rollout.mask & rollout.finished[:, None]
        return rollout.mask

    # -- the update --

    def iterate(self, rollout: Rollout, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor) -> Iteration:
        """One optimizer step: forward, loss and backward chunk by chunk, then clip and step.

        The loss is normalised by totals over the whole batch, so the chunks' losses, and the ranks'
        (each runs its share of every chunk), sum to the batch's: so do their gradients."""
        config = self.config
        batch = BatchSize(len(rollout), int(mask.sum()), config.max_completion_length)
        logprobs = torch.zeros(mask.shape, device=mask.device)
        sums = torch.zeros(2, device=mask.device)  # the entropy over counted tokens, the loss
        for rows in map(distributed.shard, self.chunks(rollout)):
            if not len(rows):
                continue
            chunk_logprobs, entropies = self.forward(rollout, rows)
            old = chunk_logprobs.detach() if old_logprobs is None else old_logprobs[rows]
            loss = self.loss(chunk_logprobs, old, None if ref_logprobs is None else ref_logprobs[rows],
                             advantages[rows], mask[rows], batch)
            loss.backward()
            logprobs[rows] = chunk_logprobs.detach()
            with torch.no_grad():
                entropy = torch.where(mask[rows], entropies, 0).sum()
                sums += torch.stack([entropy, loss.detach()])
        distributed.sum_gradients(self.parameters)
        distributed.all_reduce_sum(logprobs)
        entropy_sum, loss_sum = distributed.all_reduce_sum(sums).tolist()
        torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Iteration(logprobs, entropy_sum / max(batch.tokens, 1), loss_sum)

    def optimize(self, rollout: Rollout, scores: torch.Tensor, ref_logprobs: torch.Tensor | None) -> dict:
        """Advantages, then the num_iterations optimizer steps; returns the step's statistics."""
        mask = self.loss_mask(rollout)
        # The sampling-time log-probs: taken from the first iteration's own forward passes, unless the
        # advantages need them before it.
        old_logprobs = self.logprobs(rollout) if self.advantages_need_logprobs else None
        advantages, statistics = self.advantages(scores, mask, old_logprobs, ref_logprobs)
        history = []
        for _ in range(self.config.num_iterations):
            iteration = self.iterate(rollout, old_logprobs, ref_logprobs, advantages, mask)
            old_logprobs = iteration.logprobs if old_logprobs is None else old_logprobs
            history.append({"loss": iteration.loss, "entropy": iteration.entropy,
                            **self.iteration_statistics(iteration.logprobs, old_logprobs, ref_logprobs,
                                                        advantages, mask)})
        # As TRL logs them: the mean over the step's optimizer steps.
        return {**statistics, **{name: sum(h[name] for h in history) / len(history) for name in history[0]}}

    def train_step(self, step: int) -> dict:
        config = self.config
        started = time.perf_counter()
        indices = prompt_indices(config.seed, step, config.prompts_per_step, len(self.prompt_ids))
        prompts = [self.prompts_by_id[self.prompt_ids[i]] for i in indices for _ in range(config.num_generations)]
        seeds = [rollout_seed(config.seed, step, row) for row in range(len(prompts))]
        batch = sample_and_score(prompts, seeds, config.num_generations, self.generate, self.reward_function,
                                 self.tokenizer.pad_token_id, self.device)
        rollout, scores = batch.rollout, batch.rewards.to(self.device)
        ref_logprobs = self.reference_logprobs(rollout)
        scored = time.perf_counter()
        learning_rate = self.scheduler.get_last_lr()[0]
        statistics = self.optimize(rollout, scores, ref_logprobs)
        self.scheduler.step()
        trained = time.perf_counter()
        return {
            **statistics,
            **reward_statistics(scores.cpu(), batch.breakdown, config.num_generations),
            **completion_statistics(rollout.lengths.cpu(), rollout.finished.cpu()),
            "learning_rate": learning_rate,
            "samples_seen": (step + 1) * len(rollout),
            "rollouts_per_process": batch.most_per_process,
            "tokens_per_second": int(rollout.attention_mask.sum()) / (trained - started),
            "time/generation": batch.generation_seconds,
            "time/scoring": scored - started - batch.generation_seconds,
            "time/training": trained - scored,
            "memory/peak_mb": peak_memory_mb(self.device),
        }

    # -- checkpoint state beyond adapter, optimizer, scheduler and RNG --

    def extra_state(self) -> dict:
        return {"prompt_ids": torch.tensor(self.prompt_ids)}

    def load_extra_state(self, state: dict) -> None:
        self.prompt_ids = saved_prompt_ids(state, self.prompts_by_id)

