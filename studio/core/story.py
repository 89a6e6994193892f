"""The demo's walkthrough: the product's idea on one project, start to finish.

Sample the base (messy), shape with PPO, read the advisor, label 10 pairs from the checkpoint it
names, settle with DPO from there, compare base / PPO / DPO. `studio demo DIR --story` runs it
headless; the window's walkthrough panel shows the same stages as a checklist (:func:`stage_status`).

Each stage is skipped when the project already has its result, so after a stop (Ctrl-C) the same
command continues where it left off; training runs resume from their last checkpoint.

In the CLI nobody is at the keyboard to label, so the 10 pairs are labelled by the project's reward
(the higher-scoring answer wins; equal scores are a tie) under the annotator name
:data:`REWARD_ANNOTATOR`. In the window you label them yourself.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import advisor, labelling, store

PPO_RUN = "Walkthrough: PPO shaping"
DPO_RUN = "Walkthrough: DPO settling"
# Everything else: the measured defaults. Sized for one sitting on a CPU (about 40 steps is where the
# demo's PPO has visibly shaped its answers: docs/defaults.md); each checkpoint also answers the 48
# eval prompts (as long as a PPO step or more), so checkpoints are few.
PPO_SETTINGS = {"max_steps": 40, "checkpoint_every": 10}
DPO_SETTINGS = {"max_steps": 10, "checkpoint_every": 10}
BASE_SAMPLES = 2  # sampled answers per eval prompt (plus a greedy one): enough to show the mess
PAIRS_TO_LABEL = 10
REWARD_ANNOTATOR = "reward (walkthrough)"

STAGES = (
    ("base", "Sample the base model: how messy is it?"),
    ("ppo", f"Shape with PPO ({PPO_SETTINGS['max_steps']} steps)"),
    ("advisor", "Read the stage advisor"),
    ("label", f"Label {PAIRS_TO_LABEL} pairs from the advised checkpoint"),
    ("dpo", "Settle with DPO from that checkpoint"),
    ("compare", "Compare base / PPO / DPO"),
)


class Stopped(Exception):
    """The user asked to stop; the stages done so far are kept."""


# --- what the project already has: the checklist ------------------------------------------------

def find_run(db, name: str) -> dict | None:
    named = [run for run in store.list_runs(db) if run["name"] == name]
    return named[-1] if named else None


def story_labels(db) -> int:
    return sum(1 for label in store.effective_labels(db) if label["annotator"] == REWARD_ANNOTATOR)


def stage_status(db) -> dict[str, bool]:
    """Which stages are done, read from the project (labels by anyone count in the window)."""
    ppo = find_run(db, PPO_RUN) or _last_run(db, "ppo")
    dpo = _settling_run(db)
    return {
        "base": bool(store.samples(db, None)),
        "ppo": ppo is not None and ppo["status"] == "completed",
        "advisor": ppo is not None and ppo["status"] == "completed",
        "label": len(store.effective_labels(db)) >= PAIRS_TO_LABEL,
        "dpo": dpo is not None and dpo["status"] == "completed",
        "compare": dpo is not None and dpo["status"] == "completed",
    }


def _last_run(db, method: str) -> dict | None:
    runs = [run for run in store.list_runs(db) if run["method"] == method]
    return runs[-1] if runs else None


def _settling_run(db) -> dict | None:
    runs = [run for run in store.list_runs(db) if run["method"] == "dpo" and run["parent_checkpoint_id"] is not None]
    return runs[-1] if runs else None


# --- the automatic labeller ---------------------------------------------------------------------

def reward_choice(reward_a: float, reward_b: float) -> str:
    """The CLI's stand-in for a person: the answer the reward scores higher; equal scores tie."""
    if abs(reward_a - reward_b) < 1e-9:
        return "tie"
    return "a" if reward_a > reward_b else "b"


# --- comparing model states on the eval prompts -------------------------------------------------

@dataclass
class StateSummary:
    name: str
    outputs: dict[int, str]  # eval prompt id -> greedy answer
    mean_reward: float
    violation_share: float  # share of answers breaking at least one rule


def summarise_state(db, name: str, checkpoint_id: int | None, tokenizer) -> StateSummary:
    """Reward and rule violations of a state's greedy eval answers (stored at each checkpoint)."""
    outputs = advisor.greedy_outputs(db, checkpoint_id)
    prompts = {row["id"]: row["prompt"] for row in store.eval_prompts(db)}
    ids = [i for i in outputs if i in prompts]
    scored = advisor.score_samples(db, [prompts[i] for i in ids], [outputs[i] for i in ids], tokenizer, "cpu")
    return StateSummary(name, {i: outputs[i] for i in ids},
                        statistics.fmean(s["reward"] for s in scored),
                        sum(1 for s in scored if s["broken_rules"]) / len(scored))


# --- the walkthrough ---------------------------------------------------------------------------

@dataclass
class Story:
    path: Path
    say: Callable[[str], None]
    control: object  # runs.RunControl: its stop request ends the story between (and inside) runs
    on_metrics: Callable[[dict], None] | None = None

    def run(self) -> dict[str, float]:
        """Every stage in order; returns each stage's wall time in seconds. Raises Stopped."""
        times = {}
        with store.Project.open(self.path) as project:
            self.db = project.db
            for key, title in STAGES:
                if self.control.stop_requested:
                    raise Stopped(key)
                self.say(f"\n== {len(times) + 1}/{len(STAGES)} {title}")
                started = time.perf_counter()
                getattr(self, f"stage_{key}")()
                times[key] = time.perf_counter() - started
                self.say(f"   ({format_seconds(times[key])})")
        return times

    def tokenizer(self):
        from .models import ModelSource, load_tokenizer, resolve_folder

        return load_tokenizer(resolve_folder(ModelSource.from_json(store.get_setting(self.db, "base_model"))))

    def stage_base(self) -> None:
        if store.samples(self.db, None):
            self.say("   done before: the base is sampled")
        else:
            prompts = len(store.eval_prompts(self.db))
            self.say(f"   {prompts} eval prompts x ({BASE_SAMPLES} sampled + 1 greedy) answers ...")
            advisor.sample_base(self.db, k=BASE_SAMPLES)
        base = summarise_state(self.db, "base", None, self.tokenizer())
        self.say(f"   base: {base.violation_share:.0%} of greedy answers break a rule, mean reward "
                 f"{base.mean_reward:.2f}")
        self.say_advice()

    def stage_ppo(self) -> None:
        self.train(PPO_RUN, "ppo", PPO_SETTINGS)

    def stage_advisor(self) -> None:
        self.say_advice()

    def stage_label(self) -> None:
        done = story_labels(self.db)
        if done >= PAIRS_TO_LABEL:
            self.say(f"   done before: {done} pairs labelled")
            return
        checkpoint_id = self.advised_checkpoint()
        if self.advice().checkpoint_id is None:
            self.say("   the advisor names the base; the walkthrough labels from the last PPO checkpoint "
                     "instead, so that DPO settles what PPO shaped")
        self.say(f"   two samples per training prompt from {advisor.state_name(self.db, checkpoint_id)}, "
                 "labelled by the reward (in the window you label them yourself)")
        prompts = labelling.prompt_rows(self.db, "train", PAIRS_TO_LABEL - done)
        tokenizer = self.tokenizer()
        comparisons = labelling.compare_samples(self.db, checkpoint_id, prompts, advisor.sampling_decoding(),
                                                device="cpu")
        for index, comparison_id in enumerate(comparisons, start=done + 1):
            comparison = labelling.get_comparison(self.db, comparison_id)
            scored = advisor.score_samples(self.db, [comparison["prompt"]] * 2,
                                           [comparison["response_a"], comparison["response_b"]], tokenizer, "cpu")
            choice = reward_choice(scored[0]["reward"], scored[1]["reward"])
            labelling.record_label(self.db, comparison_id, REWARD_ANNOTATOR, choice)
            self.say(f"   pair {index}/{PAIRS_TO_LABEL}: rewards {scored[0]['reward']:.2f} vs "
                     f"{scored[1]['reward']:.2f} -> {choice.upper()}")
            if self.control.stop_requested:
                raise Stopped("label")

    def stage_dpo(self) -> None:
        existing = find_run(self.db, DPO_RUN)
        start = existing["parent_checkpoint_id"] if existing else self.advised_checkpoint()
        self.say(f"   from {advisor.state_name(self.db, start)}, on the labelled and imported pairs")
        self.train(DPO_RUN, "dpo", {**DPO_SETTINGS, "include_labels": True, "parent_checkpoint_id": start})

    def stage_compare(self) -> None:
        tokenizer = self.tokenizer()
        ppo_checkpoint = self.advised_checkpoint()
        dpo_checkpoint = store.checkpoints(self.db, find_run(self.db, DPO_RUN)["id"])[-1]["id"]
        states = [summarise_state(self.db, "base", None, tokenizer),
                  summarise_state(self.db, "PPO", ppo_checkpoint, tokenizer),
                  summarise_state(self.db, "PPO then DPO", dpo_checkpoint, tokenizer)]
        self.say("   greedy answers to the eval prompts:")
        for state in states:
            self.say(f"   {state.name:<13} mean reward {state.mean_reward:5.2f}   breaking a rule "
                     f"{state.violation_share:4.0%}")
        prompts = {row["id"]: row["prompt"] for row in store.eval_prompts(self.db)}
        for prompt_id in list(states[0].outputs)[:2]:
            self.say(f"\n   prompt: {prompt_text(prompts[prompt_id])}")
            for state in states:
                self.say(f"   [{state.name}] {one_line(state.outputs.get(prompt_id, ''))}")
        self.say("\n   See every prompt side by side in the window: ./run.sh --project " + str(self.path))

    # -- helpers --

    def train(self, name: str, method: str, settings: dict) -> None:
        from . import runs

        run = find_run(self.db, name)
        if run is not None and run["status"] == "completed":
            self.say(f"   done before: run #{run['id']}")
            return
        if run is None:
            run_id = runs.create_run(self.db, runs.make_config(method, settings), name=name)
        else:
            run_id = run["id"]
            self.say(f"   resuming run #{run_id}")
        status = runs.execute(self.path, run_id, self.control, on_metrics=self.on_metrics,
                              on_log=lambda message: self.say(f"   [run {run_id}] {message}"))
        if status != "completed":
            raise Stopped(method)

    def ppo_run_id(self) -> int | None:
        run = find_run(self.db, PPO_RUN)
        return run["id"] if run else None

    def advice(self):
        return advisor.advise(advisor.gather(self.db, self.ppo_run_id()))

    def say_advice(self) -> None:
        advice = self.advice()
        self.say(f"   advisor: {advice.title}. {advice.explanation}")

    def advised_checkpoint(self) -> int:
        """The checkpoint the advisor names; the latest PPO checkpoint when it names the base."""
        advice = self.advice()
        if advice.checkpoint_id is not None:
            return advice.checkpoint_id
        return store.checkpoints(self.db, self.ppo_run_id())[-1]["id"]


def prompt_text(prompt) -> str:
    return one_line(prompt[-1]["content"] if isinstance(prompt, list) else prompt)


def one_line(text: str, width: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
