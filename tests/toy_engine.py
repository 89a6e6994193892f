"""A minimal engine obeying the contract in studio.core.runs, to test run control on its own.

Each step draws a random batch of token ids (from the global RNG, like dropout or sampling would)
and takes one optimizer step on their mean negative log-likelihood.
"""

from dataclasses import dataclass

import torch

from studio.core.runs import TrainConfig


@dataclass
class Config(TrainConfig):
    method: str = "toy"
    learning_rate: float = 1e-2
    fail_at_step: int | None = None  # raise RuntimeError(failure) instead of taking this step
    failure: str = "simulated failure"
    rewards: list[float] | None = None  # reported as each step's reward (objective/scores), cycling


def validate(config, db):
    return []


def select_data(config, db):
    return {}


class Engine:
    def __init__(self, config, policy, tokenizer, data, device, run_dir, on_progress=None):
        self.model = policy
        self.config = config
        self.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.extra = torch.zeros(1)
        self.vocab = len(tokenizer)

    def train_step(self, step):
        if step == self.config.fail_at_step:  # a config field, so it also works in a child process
            raise RuntimeError(self.config.failure)
        ids = torch.randint(0, self.vocab, (2, 8))
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.extra += 1
        if self.config.rewards:
            return {"loss": loss.item(), "objective/scores": self.config.rewards[step % len(self.config.rewards)]}
        return {"loss": loss.item()}

    def extra_state(self):
        return {"extra": self.extra}

    def load_extra_state(self, state):
        self.extra = state["extra"]
