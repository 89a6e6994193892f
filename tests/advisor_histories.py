"""Synthetic run histories for the advisor's tests: metric curves plus eval outputs per checkpoint."""

import math
from dataclasses import replace

from studio.core.advisor import CheckpointEvidence, Evidence, RunEvidence, advise

PROMPTS = range(1, 13)
TOKENS = 40.0  # mean response length in tokens at every step


def varied_text(prompt: int, version, length: int = 12) -> str:
    """A text unique to (prompt, version), with no repeated n-grams."""
    return " ".join(f"w{prompt}v{version}i{i}" for i in range(length))


def make_run(reward, kl=lambda s: 0.1 * s, steps=60, every=5, outputs=None, wins=None, entropy=None,
             start=None, noise=None, sources=None, available=lambda i: True) -> RunEvidence:
    """A RunEvidence: metric curves reward(step), kl(step) (per response, nats), entropy(step) (per
    response), `noise(step)` added to the reward; a checkpoint every `every` steps.

    outputs(prompt, checkpoint index) -> text; wins(checkpoint index) -> (wins, labels).
    """
    outputs = outputs or (lambda p, i: varied_text(p, i))
    wins = wins or (lambda i: (0.0, 0))
    entropy = entropy or (lambda s: 0.8 * TOKENS)
    noise = noise or (lambda s: 0.0)
    all_steps = list(range(1, steps + 1))
    checkpoints = []
    for index, step in enumerate(range(every, steps + 1, every)):
        won, labels = wins(index)
        checkpoints.append(CheckpointEvidence(100 + index, step, {p: outputs(p, index) for p in PROMPTS},
                                              won, labels, available=available(index)))
    return RunEvidence(
        run_id=7, name="PPO #7", reward_metric="objective/raw_reward",
        reward=(all_steps, [reward(s) + noise(s) for s in all_steps]), kl=(all_steps, [kl(s) for s in all_steps]),
        start_outputs=start or {p: varied_text(p, "start") for p in PROMPTS}, start_label="the start (step 0)",
        checkpoints=checkpoints, entropy=(all_steps, [entropy(s) for s in all_steps]),
        length=(all_steps, [TOKENS] * steps), sources=sources or [])


def at_checkpoint(run: RunEvidence, count: int) -> RunEvidence:
    """The run as the advisor saw it when its `count`-th checkpoint was written: later metrics and
    checkpoints left out."""
    last = run.checkpoints[count - 1].step

    def cut(series):
        return tuple(list(part) for part in zip(*[(s, v) for s, v in zip(*series) if s <= last])) or ([], [])

    return replace(run, checkpoints=run.checkpoints[:count], reward=cut(run.reward), kl=cut(run.kl),
                   entropy=cut(run.entropy), length=cut(run.length))


def verdicts_over_time(run: RunEvidence, **evidence) -> list[str]:
    """The verdict at each checkpoint of the run, in order."""
    return [advise(Evidence(run=at_checkpoint(run, k), **evidence)).verdict
            for k in range(1, len(run.checkpoints) + 1)]


def heavy_tailed(rng, scale: float, dof: int) -> float:
    """Student's t noise with `dof` degrees of freedom (2: infinite variance), times `scale`."""
    chi2 = sum(rng.gauss(0, 1) ** 2 for _ in range(dof))
    return scale * rng.gauss(0, 1) / math.sqrt(chi2 / dof)
