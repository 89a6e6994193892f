"""The RLOO engine: the maths first (small pure functions), then the engine (the loop is shared).

REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"), as TRL's
``RLOOTrainer`` defines it. Each step samples ``num_generations`` (k) completions for each of
``prompts_per_step`` prompts (``studio.core.critic_free`` does the sampling, scoring and the loop):

* **Reward**: the reward sources' weighted sum, clipped to ``reward_clip_range`` if set, minus
  ``beta`` times the completion's KL to the reference: the sum over its tokens of
  log p_sampling - log p_reference (the k1 estimate, as the RLOO paper; it can be negative per
  token). The KL is part of the reward, not of the loss (unlike GRPO).
* **Advantage**: the reward minus the mean reward of the other k - 1 completions of its prompt
  (the leave-one-out baseline: unbiased, since it does not depend on the completion itself);
  optionally normalised over the batch (``normalize_advantages``).
* **Loss per completion**: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) with r the ratio of
  the whole completion's probability, new / sampling-time (exp of the summed token log-prob
  differences), averaged over completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import critic_free
from .critic_free import group_view
from .ppo import kl_penalty, masked_mean


# --- the maths: tensors in, tensors out ---------------------------------------------------------
# Shapes: [completions] for rewards and advantages, [completions, tokens] otherwise; `mask` is True
# on the tokens that count.

def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each whole completion: the sum over its counted tokens."""
    return torch.where(mask, logprobs, 0).sum(1)


def leave_one_out_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """reward - mean of the other completions' rewards in its group."""
    grouped = group_view(rewards, num_generations)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baselines).flatten()


def normalize(advantages: torch.Tensor) -> torch.Tensor:
    """(A - mean) / (std + 1e-4) over the batch (unbiased std, as TRL)."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-4)


def sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """p(completion) new / sampling-time."""
    return torch.exp(sequence_logprobs(logprobs, mask) - sequence_logprobs(old_logprobs, mask))


def clipped_sequence_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """Per completion: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A), r the completion's ratio."""
    ratio = sequence_ratio(logprobs, old_logprobs, mask)
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages)


def clip_statistics(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                    epsilon_high: float) -> dict[str, float]:
    """TRL's clip_ratio/* for RLOO: shares of completions whose ratio the clip held back."""
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
    return {"clip_ratio/low_mean": low.mean().item(), "clip_ratio/low_min": low.min().item(),
            "clip_ratio/high_mean": high.mean().item(), "clip_ratio/high_max": high.max().item(),
            "clip_ratio/region_mean": torch.maximum(low, high).mean().item()}


# --- configuration ----------------------------------------------------------------------------

@dataclass
class Config(critic_free.Config):
    method: str = "rloo"
    num_generations: int = 4  # completions per prompt (k): each one's baseline is the mean of the other k - 1
    beta: float = 0.05  # weight of the completion's KL to the reference, subtracted from its reward (TRL's default)
    normalize_advantages: bool = False  # advantages normalised to mean 0, std 1 over each batch
    reward_clip_range: list[float] | None = None  # [low, high]: rewards are clipped to it before the KL penalty


def validate(config: Config, db) -> list[str]:
    problems = critic_free.validate(config, db)
    clip = config.reward_clip_range
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        problems.append(f"reward_clip_range must be [low, high] with low < high (got {clip})")
    return problems


select_data = critic_free.select_data  # the training prompts, as PPO selects them


# --- the engine -------------------------------------------------------------------------------

class Engine(critic_free.Engine):
    @property
    def advantages_need_logprobs(self) -> bool:  # the KL penalty in the reward uses the sampling-time log-probs
        return self.config.beta != 0

    def advantages(self, scores, mask, old_logprobs, ref_logprobs):
        config, statistics = self.config, {}
        if config.reward_clip_range is not None:
            scores = scores.clamp(*config.reward_clip_range)
        if ref_logprobs is not None:
            per_token_kl = torch.where(mask, kl_penalty(old_logprobs, ref_logprobs, "k1"), 0)
            scores = scores - config.beta * per_token_kl.sum(1)
            statistics["kl"] = masked_mean(per_token_kl, mask).item()
        advantages = leave_one_out_advantages(scores, config.num_generations)
        return (normalize(advantages) if config.normalize_advantages else advantages), statistics

    def loss(self, logprobs, old_logprobs, ref_logprobs, advantages, mask, batch):
        config = self.config
        per_completion = clipped_sequence_loss(logprobs, old_logprobs, advantages, mask, config.epsilon,
                                               config.epsilon_upper)
        return per_completion.sum() / batch.sequences  # chunks sum to the batch mean

    def iteration_statistics(self, logprobs, old_logprobs, ref_logprobs, advantages, mask):
        return clip_statistics(sequence_ratio(logprobs, old_logprobs, mask), advantages, self.config.epsilon,
                               self.config.epsilon_upper)
