"""The GRPO engine: the maths first (small pure functions), then the engine (the loop is shared).

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), as TRL's ``GRPOTrainer``
defines it. Each step samples ``num_generations`` completions for each of ``prompts_per_step``
prompts (``studio.core.critic_free`` does the sampling, scoring and the update loop). Then:

* **Advantages**: a completion's reward minus its group's mean, divided by the standard deviation
  of the group (``scale_rewards="group"``), of the whole batch (``"batch"``), or not at all
  (``"none"``, as Dr. GRPO recommends: scaling favours prompts whose rewards barely vary), + 1e-4.
  Every token of a completion gets its completion's advantage. No value head, no critic.
* **Loss per token**: PPO's clipped surrogate -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)
  with r = p / p_sampling (exactly 1 in the first iteration), plus ``beta`` times the k3 estimate
  of KL(policy || reference) at that token, exp(q - p) - (q - p) - 1 in log-probs p, q.
* **Token normalisation** (``loss_type``): ``grpo`` averages each completion's tokens, then the
  completions (long completions weigh less per token: a length bias); ``dr_grpo`` divides the sum
  by completions x max_completion_length (a constant: no length bias); ``dapo`` divides the sum by
  the number of counted tokens in the batch (TRL's default).

``beta`` is 0.04 here where TRL's default is 0: TRL skips the reference to save a forward pass on
large reasoning runs, but here the reference costs no memory (the adapter switched off) and one
pass per step, and the KL is what the charts and the stage advisor watch to tell shaping from
drifting; 0.04 is the DeepSeekMath value. Set it to 0 to train as TRL does by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import critic_free
from .critic_free import BatchSize, group_view
from .ppo import kl_penalty, masked_mean

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
CHOICES = {"loss_type": LOSS_TYPES, "scale_rewards": SCALE_REWARDS}  # the run setup form's drop-downs


# --- the maths: tensors in, tensors out ---------------------------------------------------------
# Shapes: [completions] for rewards and advantages, [completions, tokens] otherwise; `mask` is True
# on the tokens that count.

def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """(reward - its group's mean) / (std + 1e-4), the std (unbiased) of the group, of the batch, or none."""
    grouped = group_view(rewards, num_generations)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale_rewards == "group":
        return advantages / (grouped.std(dim=1).repeat_interleave(num_generations) + 1e-4)
    if scale_rewards == "batch":
        return advantages / (rewards.std() + 1e-4)
    if scale_rewards == "none":
        return advantages
    raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {SCALE_REWARDS}")


def clipped_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """Per token: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A), r = exp(logp - old logp)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages)


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, batch: BatchSize) -> torch.Tensor:
    """The loss of these rows' tokens, normalised by `batch` totals, so that chunks of a batch sum to the
    batch's loss. On a whole batch: grpo = mean over completions of each one's token mean; dr_grpo =
    token sum / (completions x max_completion_length); dapo = token sum / counted tokens."""
    masked = torch.where(mask, per_token_loss, 0)
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / batch.sequences
    if loss_type == "dr_grpo":
        return masked.sum() / (batch.sequences * batch.max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / max(batch.tokens, 1)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def clip_statistics(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, epsilon_low: float, epsilon_high: float) -> dict[str, float]:
    """TRL's clip_ratio/*: tokens whose ratio the clip held back (below 1 - epsilon_low with A < 0,
    above 1 + epsilon_high with A > 0), as a share of counted tokens, and the lowest / highest share
    in one completion."""
    ratio = torch.exp(logprobs - old_logprobs)
    low = (ratio < 1 - epsilon_low) & (advantages[:, None] < 0)
    high = (ratio > 1 + epsilon_high) & (advantages[:, None] > 0)
    counted = mask.any(dim=1)  # a fully masked completion has no share (TRL: NaN, left out of min / max)

    def per_completion(flags):
        return (torch.where(mask, flags, False).sum(1) / mask.sum(1).clamp(min=1))[counted]

    return {"clip_ratio/low_mean": masked_mean(low.float(), mask).item(),
            "clip_ratio/low_min": per_completion(low).min().item() if bool(counted.any()) else 0.0,
            "clip_ratio/high_mean": masked_mean(high.float(), mask).item(),
            "clip_ratio/high_max": per_completion(high).max().item() if bool(counted.any()) else 0.0,
            "clip_ratio/region_mean": masked_mean((low | high).float(), mask).item()}


# --- configuration ----------------------------------------------------------------------------

@dataclass
class Config(critic_free.Config):
    method: str = "grpo"
    beta: float = 0.04  # weight of the per-token k3 KL to the reference in the loss (TRL's default is 0; see above)
    scale_rewards: str = "group"  # advantages divided by the std of the "group", the "batch", or "none" (Dr. GRPO)
    loss_type: str = "dapo"  # token normalisation: "dapo" (TRL's default), "grpo" or "dr_grpo"


def validate(config: Config, db) -> list[str]:
    problems = critic_free.validate(config, db)
    if config.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type must be one of {', '.join(LOSS_TYPES)} (got {config.loss_type!r})")
    if config.scale_rewards not in SCALE_REWARDS:
        problems.append(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (got {config.scale_rewards!r})")
    return problems


select_data = critic_free.select_data  # the training prompts, as PPO selects them


# --- the engine -------------------------------------------------------------------------------

class Engine(critic_free.Engine):
    def advantages(self, scores, mask, old_logprobs, ref_logprobs):
        return group_advantages(scores, self.config.num_generations, self.config.scale_rewards), {}

    def loss(self, logprobs, old_logprobs, ref_logprobs, advantages, mask, batch):
        config = self.config
        per_token_loss = clipped_token_loss(logprobs, old_logprobs, advantages, config.epsilon, config.epsilon_upper)
        if ref_logprobs is not None:
            per_token_loss = per_token_loss + config.beta * kl_penalty(logprobs, ref_logprobs, "k3")
        return aggregate(per_token_loss, mask, config.loss_type, batch)

    def iteration_statistics(self, logprobs, old_logprobs, ref_logprobs, advantages, mask):
        statistics = clip_statistics(logprobs, old_logprobs, advantages, mask, self.config.epsilon,
                                     self.config.epsilon_upper)
        if ref_logprobs is not None:  # TRL logs kl only when beta > 0
            statistics["kl"] = masked_mean(kl_penalty(logprobs, ref_logprobs, "k3"), mask).item()
        return statistics
