"""The DPO engine: losses first, then data, log-probs and the training loop (contract in ``runs``).

Direct Preference Optimization trains the policy (the model with a LoRA adapter) to raise the
log-probability of each chosen response relative to the rejected one, measured against a reference
model: the same weights with the adapter disabled, i.e. the state the run started from.

What it does, in TRL's vocabulary (TRL 1.16 ``DPOTrainer``):

* pairs are tokenized as TRL tokenizes them; only response tokens count in a log-probability (the
  end-of-turn token included), never prompt or padding tokens;
* a pair too long for ``max_length`` is skipped and reported, never silently cut;
* reference log-probs are computed once per pair, before the first step, for the pairs the run's
  ``max_steps`` will reach (all of them once the run spans an epoch; a 4-step run needs 16, not the
  whole dataset), and stored with the run's tokenized pairs in ``run_dir`` (the data a run trains on
  is fixed when it starts; pairs it never reaches keep NaN);
* one step = ``gradient_accumulation_steps`` forward passes of ``batch_size`` pairs, each pair in one
  row: its prompt once, then both responses, which each see the prompt but not each other (so the
  prompt is computed once and the short response is not padded to the long one's length); the LM
  head applied only where a response token is predicted.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import defaults, distributed, store
from .batches import (Batch, collate, collate_shared, head_only_matches_forward, scored_hidden_states, scored_logits,
                      shared_prompts_match, unwrap)
from .datasets import has_tool_calls
from .errors import StudioError
from .generation import ChatTemplateError, chat_ids, check_chat_template, is_conversational
from .progress import Progress, ignore
from .runs import TrainConfig, autocast, make_optimizer, peak_memory_mb

logger = logging.getLogger(__name__)


# --- losses: per-pair, from the policy/reference log-ratios (named as TRL names them) -----------

def sigmoid(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta * delta), delta = chosen log-ratio - rejected log-ratio."""
    return -F.logsigmoid(beta * delta)


def hinge(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC: max(0, 1 - beta * delta)."""
    return torch.relu(1 - beta * delta)


def robust(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO: unbiased under labels flipped with probability `label_smoothing` (< 0.5)."""
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (per-token chosen log-ratio - per-token rejected log-ratio - 1 / (2 beta))^2.

    Log-ratios are divided by response lengths, as TRL does (confirmed with the IPO authors).
    """
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def pair_losses(config: "Config", chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> torch.Tensor:
    """The configured loss for each pair."""
    delta = chosen_logratios - rejected_logratios
    if config.loss_type == "sigmoid":
        return sigmoid(delta, config.beta)
    if config.loss_type == "hinge":
        return hinge(delta, config.beta)
    if config.loss_type == "robust":
        return robust(delta, config.beta, config.label_smoothing)
    if config.loss_type == "ipo":
        return ipo(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, config.beta)
    raise ValueError(f"unknown loss_type {config.loss_type!r}")


# --- configuration ----------------------------------------------------------------------------

@dataclass
class Config(TrainConfig):
    method: str = "dpo"
    learning_rate: float = defaults.small("dpo", "learning_rate")  # LoRA wants ~10-50x TRL's full-fine-tune 1e-6
    beta: float = 0.1  # strength of the pull towards the reference: higher stays closer to it
    loss_type: str = "sigmoid"  # "sigmoid" (DPO), "ipo", "robust" (noisy labels), "hinge" (SLiC)
    label_smoothing: float = 0.0  # "robust" only: assumed probability that a label is flipped, [0, 0.5)
    batch_size: int = 4  # pairs per forward pass (each pair is two sequences)
    gradient_accumulation_steps: int = 1  # forward passes per optimizer step
    max_prompt_length: int | None = None  # longer prompts keep their end (TRL < 1.0 did); None: whole prompts
    max_length: int = 1024  # prompt + response tokens; a pair that needs its response cut is skipped
    dataset_ids: list[int] | None = None  # preference datasets to train on; None: all of them
    include_labels: bool = True  # also train on the pairs made from the project's labels
    ref_batch_size: int = 32  # pairs per no-grad forward for the reference log-probs


def training_pairs(config: Config, db) -> list[dict]:
    """The pairs a run trains on: the chosen preference datasets, then the labelled comparisons."""
    rows = store.pairs(db, config.dataset_ids)
    if config.include_labels:
        rows += store.labelled_pairs(db)
    return rows


def select_data(config: Config, db) -> dict:
    """The run's TrainingData fields (see ``runs.gather_training_data``)."""
    return {"pairs": training_pairs(config, db)}


def validate(config: Config, db) -> list[str]:
    problems = []
    if config.beta <= 0:
        problems.append(f"beta must be positive (got {config.beta})")
    if config.loss_type not in LOSS_TYPES:
        problems.append(f"unknown loss_type {config.loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not 0 <= config.label_smoothing < 0.5:
        problems.append(f"label_smoothing must be in [0, 0.5) (got {config.label_smoothing})")
    elif config.label_smoothing and config.loss_type != "robust":
        problems.append(f"label_smoothing only applies to the 'robust' loss, not {config.loss_type!r}")
    for name in ("batch_size", "gradient_accumulation_steps", "ref_batch_size", "max_steps", "max_length"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1 (got {getattr(config, name)})")
    if config.max_prompt_length is not None and not 0 < config.max_prompt_length < config.max_length:
        problems.append(f"max_prompt_length must be between 1 and max_length - 1 (got {config.max_prompt_length})")
    if config.dataset_ids is not None:
        preference = {d["id"] for d in store.datasets(db) if d["kind"] == "preference"}
        problems += [f"dataset {i} is not a preference dataset of this project"
                     for i in config.dataset_ids if i not in preference]
    rows = training_pairs(config, db)
    if not rows:
        problems.append("no preference pairs in this project: import a preference dataset or label some comparisons")
    for row in rows:
        formats = {is_conversational(row[key]) for key in ("prompt", "chosen", "rejected")}
        if len(formats) > 1:
            problems.append(f"{pair_name(row)} mixes chat messages and plain text")
            break
    return problems + tool_template_problems(db, [row for row in rows if has_tool_calls(row)])


SHOWN_TEMPLATE_PROBLEMS = 3


def tool_template_problems(db, rows: list[dict]) -> list[str]:
    """Before a launch: pairs with tool calls that the base model's chat template cannot render (with
    their tools).

    The tokenizer is loaded only when some pair has tool calls; a model that cannot be read is left to the
    run to report."""
    if not rows:
        return []
    from .models import ModelSource, load_tokenizer, resolve_folder

    try:
        tokenizer = load_tokenizer(resolve_folder(ModelSource.from_json(store.get_setting(db, "base_model"))))
    except (StudioError, OSError, ValueError):
        return []
    problems = []
    for row in rows:
        try:
            check_pair_template(tokenizer, row)
        except ChatTemplateError as e:
            problems.append(str(e))
    more = len(problems) - SHOWN_TEMPLATE_PROBLEMS
    return problems[:SHOWN_TEMPLATE_PROBLEMS] + ([f"... and {more} more pairs like these"] if more > 0 else [])


# --- tokenisation, as TRL 1.16's DPOTrainer does it --------------------------------------------

@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]  # response tokens, the end-of-turn token(s) included
    rejected: list[int]

    @property
    def length(self) -> int:
        """Width of the pair's longer sequence: what it costs in a padded batch."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def tokenize_pair(tokenizer, pair: dict) -> TokenizedPair:
    """Chat messages go through the chat template, with the pair's function schemas ("tools") if it has
    any; plain text gets an EOS appended to each response.

    The response starts where the tokenized prompt and prompt+response first differ (TRL's
    `common_prefix_length`), which is after the prompt unless tokens merge across the boundary.
    """
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if is_conversational(prompt):
        tools = pair.get("tools")
        prompt_ids = chat_ids(tokenizer, prompt, tools, add_generation_prompt=True)
        chosen_ids = chat_ids(tokenizer, prompt + chosen, tools)
        rejected_ids = chat_ids(tokenizer, prompt + rejected, tools)
    else:
        def encode(text):
            return tokenizer(text=text)["input_ids"]

        def with_eos(text):
            return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token

        prompt_ids = encode(prompt)
        chosen_ids, rejected_ids = encode(prompt + with_eos(chosen)), encode(prompt + with_eos(rejected))
    prompt_length = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return TokenizedPair(prompt_ids[:prompt_length], chosen_ids[prompt_length:], rejected_ids[prompt_length:])


def check_pair_template(tokenizer, row: dict) -> None:
    """Raise ChatTemplateError, naming the pair, when the chat template cannot render it with its tools."""
    if is_conversational(row["prompt"]):
        for side in ("chosen", "rejected"):
            check_chat_template(tokenizer, row["prompt"] + row[side], row.get("tools"), pair_name(row))


def pair_name(row: dict) -> str:
    """Where a training pair comes from, for messages."""
    if "comparison_id" in row:
        return f"labelled comparison {row['comparison_id']}"
    return f"dataset {row.get('dataset_id')}, pair {row.get('id')}"


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def fit_pair(pair: TokenizedPair, max_prompt_length: int | None, max_length: int) -> TokenizedPair | None:
    """The pair within the limits, or None when that would cut into a response."""
    if max_prompt_length is not None and len(pair.prompt) > max_prompt_length:
        pair = TokenizedPair(pair.prompt[-max_prompt_length:], pair.chosen, pair.rejected)
    return pair if pair.length <= max_length else None


def tokenize_pairs(config: Config, tokenizer, rows: list[dict]) -> tuple[list[TokenizedPair], int]:
    """(the pairs that fit, how many were skipped because they do not fit max_length)."""
    for row in filter(has_tool_calls, rows):  # again: a queued run or a bundle may hold pairs never checked
        check_pair_template(tokenizer, row)
    fitted = [fit_pair(tokenize_pair(tokenizer, row), config.max_prompt_length, config.max_length) for row in rows]
    kept = [pair for pair in fitted if pair is not None]
    skipped = len(fitted) - len(kept)
    if skipped:
        logger.warning("Skipped %d of %d pairs: prompt + response longer than max_length=%d tokens "
                       "(raise max_length or set max_prompt_length)", skipped, len(fitted), config.max_length)
    if not kept:
        raise ValueError(f"None of the {len(fitted)} pairs fits in max_length={config.max_length} tokens")
    return kept, skipped


# --- batches ----------------------------------------------------------------------------------

def collate_pairs(pairs: list[TokenizedPair], pad_id: int, shared_prompts: bool = True) -> Batch:
    """P pairs for one forward pass: each in a row of its own (the prompt once, then both responses),
    or as two sequences. Either way the 2P responses come pair by pair: chosen, rejected, chosen, ..."""
    if shared_prompts:
        return collate_shared([(p.prompt, [p.chosen, p.rejected]) for p in pairs], pad_id)
    return collate([p.prompt for p in pairs for _ in range(2)],
                   [response for p in pairs for response in (p.chosen, p.rejected)], pad_id)


def chosen_and_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response values of a ``collate_pairs`` batch, split into the chosen and the rejected ones."""
    return values[0::2], values[1::2]


LENGTH_GROUP_STEPS = 4  # steps' worth of pairs sorted by length together: less padding, order still random


def epoch_order(lengths: list[int], window: int, seed: int, epoch: int) -> list[int]:
    """The epoch's order of pair indices: a seeded shuffle, then each window of `window` pairs sorted
    longest first, so consecutive pairs (a batch) have similar lengths and need little padding."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return [i for start in range(0, len(order), window)
            for i in sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)]


# --- log-probabilities ------------------------------------------------------------------------

HEAD_CHUNK = 1024  # response positions per LM-head call: bounds the [positions, vocab] logits


def sequence_logps(model, batch: Batch, head_only: bool = True) -> torch.Tensor:
    """Sum of the response tokens' log-probs for each of the batch's responses: shape [responses].

    `head_only`: run the transformer body, then the LM head only at the positions that predict a
    response token (calling the head module, so a LoRA adapter on it still applies). Otherwise
    the model's own forward computes logits everywhere (for models that rescale their logits).
    """
    if head_only:
        scoring_states = scored_hidden_states(model, batch)
        head = unwrap(model).get_output_embeddings()

        def logits_at(span: slice) -> torch.Tensor:
            return head(scoring_states[span])
    else:
        logits = scored_logits(model, batch)

        def logits_at(span: slice) -> torch.Tensor:
            return logits[span]
    spans = [slice(start, start + HEAD_CHUNK) for start in range(0, len(batch.targets), HEAD_CHUNK)]
    token_logps = torch.cat([-F.cross_entropy(logits_at(span).float(), batch.targets[span], reduction="none")
                             for span in spans])
    sums = torch.zeros(batch.num_responses, device=token_logps.device, dtype=token_logps.dtype)
    return sums.index_add(0, batch.responses, token_logps)


@torch.no_grad()
def reference_logps(model, pairs: list[TokenizedPair], pad_id: int, batch_size: int, device: str,
                    head_only: bool = True, shared_prompts: bool = True,
                    on_progress: Progress = ignore) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of every pair under the reference: the model with its adapter disabled.

    Pairs of similar lengths are batched together (`batch_size` pairs at a time), so there is little padding.
    """
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected))
    chosen, rejected = torch.empty(len(pairs)), torch.empty(len(pairs))
    on_progress("Reference pass (pairs)", 0, len(order))
    with model.disable_adapter(), autocast(device):
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = collate_pairs([pairs[i] for i in indices], pad_id, shared_prompts).to(device)
            chosen[indices], rejected[indices] = chosen_and_rejected(sequence_logps(model, batch, head_only).float().cpu())
            on_progress("Reference pass (pairs)", start + len(indices), len(order))
    return chosen, rejected


# --- the run's data: tokenized pairs and their reference log-probs, fixed when the run starts ---

DATA_FILE = "dpo_pairs.safetensors"


@dataclass
class RunData:
    pairs: list[TokenizedPair]
    ref_chosen: torch.Tensor  # [pairs] float32; NaN for a pair the run never reaches
    ref_rejected: torch.Tensor
    skipped: int  # pairs left out because they do not fit max_length

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        lengths = torch.tensor([[len(p.prompt), len(p.chosen), len(p.rejected)] for p in self.pairs])
        tokens = torch.tensor([t for p in self.pairs for t in p.prompt + p.chosen + p.rejected])
        partial = path.with_name(path.name + ".partial")
        save_file({"tokens": tokens, "lengths": lengths, "ref_chosen": self.ref_chosen,
                   "ref_rejected": self.ref_rejected}, partial, metadata={"skipped": str(self.skipped)})
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> "RunData":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            skipped = int(f.metadata()["skipped"])
        parts = [t.tolist() for t in tensors["tokens"].split(tensors["lengths"].flatten().tolist())]
        pairs = [TokenizedPair(*parts[i:i + 3]) for i in range(0, len(parts), 3)]
        return cls(pairs, tensors["ref_chosen"], tensors["ref_rejected"], skipped)


def pairs_reached(config: Config, lengths: list[int]) -> list[int]:
    """Indices of the pairs the run's `max_steps` train on, as ``Engine.batch_indices`` orders them."""
    batches = config.max_steps * config.gradient_accumulation_steps
    if batches * config.batch_size >= len(lengths):
        return list(range(len(lengths)))
    window = config.batch_size * config.gradient_accumulation_steps * LENGTH_GROUP_STEPS
    return sorted(epoch_order(lengths, window, config.seed, 0)[:batches * config.batch_size])


def prepare_run_data(config: Config, model, tokenizer, rows: list[dict], device: str, run_dir: Path,
                     head_only: bool, shared_prompts: bool, on_progress: Progress = ignore) -> RunData:
    """Load the run's data from `run_dir`, or tokenize the pairs, run the reference pass once over
    the pairs the run will reach, and store both.

    In a data-parallel run every rank computes it (no shared filesystem needed); rank 0 stores it.
    """
    path = Path(run_dir) / DATA_FILE
    if path.exists():
        logger.info("Using the run's stored pairs and reference log-probs (%s)", path)
        return RunData.load(path)
    pairs, skipped = tokenize_pairs(config, tokenizer, rows)
    reached = pairs_reached(config, [pair.length for pair in pairs])
    ref_chosen = torch.full((len(pairs),), math.nan)
    ref_rejected = torch.full((len(pairs),), math.nan)
    ref_chosen[reached], ref_rejected[reached] = reference_logps(
        model, [pairs[i] for i in reached], tokenizer.pad_token_id, config.ref_batch_size, device, head_only,
        shared_prompts, on_progress)
    data = RunData(pairs, ref_chosen, ref_rejected, skipped)
    if distributed.is_main():
        data.save(path)
    return data


# --- the engine -------------------------------------------------------------------------------

def disable_dropout_except_lora(model) -> None:
    """No dropout in the base model (TRL's disable_dropout); the LoRA dropout the user asked for stays."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0


class Engine:
    def __init__(self, config: Config, policy, tokenizer, data, device: str, run_dir: Path,
                 on_progress: Progress = ignore) -> None:
        self.config, self.model, self.device = config, policy, device
        self.pad_id = tokenizer.pad_token_id
        disable_dropout_except_lora(policy)
        policy.train()
        self.head_only = head_only_matches_forward(policy)
        if not self.head_only:
            logger.warning("This model transforms its logits after the LM head: computing full logits (slower)")
        self.shared_prompts = shared_prompts_match(policy, config.max_length)
        if not self.shared_prompts:
            logger.warning("This model's attention cannot score a pair's two responses after one prompt: "
                           "each pair is scored as two padded sequences (slower)")
        data = prepare_run_data(config, policy, tokenizer, data.pairs, device, run_dir, self.head_only,
                                self.shared_prompts, on_progress)
        self.pairs, self.skipped = data.pairs, data.skipped
        self.ref_chosen, self.ref_rejected = data.ref_chosen, data.ref_rejected
        self.lengths = [pair.length for pair in self.pairs]
        self.batches_per_epoch = math.ceil(len(self.pairs) / config.batch_size)
        # Windows of whole steps: which pairs a step sees does not depend on its split into batches.
        self.window = config.batch_size * config.gradient_accumulation_steps * LENGTH_GROUP_STEPS
        self.epoch, self.order = -1, []  # the current epoch's order, built on first use
        self.samples_seen = 0

        self.trainable = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(config, self.trainable)

    def batch_indices(self, batch_number: int) -> list[int]:
        """Pair indices of the run's `batch_number`-th batch: a pure function of the number and the seed."""
        epoch, position = divmod(batch_number, self.batches_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, epoch_order(self.lengths, self.window, self.config.seed, epoch)
        start = position * self.config.batch_size
        return self.order[start:start + self.config.batch_size]

    METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")

    def train_step(self, step: int) -> dict:
        """One optimizer step over the step's pairs; in a data-parallel run, this rank's share of each
        batch, its loss divided by the whole step's pair count so the ranks' gradients add up."""
        started = time.perf_counter()
        accumulation = self.config.gradient_accumulation_steps
        step_batches = [self.batch_indices(step * accumulation + i) for i in range(accumulation)]
        pairs_in_step = sum(len(indices) for indices in step_batches)
        sums = torch.zeros(len(self.METRICS) + 1, dtype=torch.float64)  # the metrics' sums, then tokens
        for indices in map(distributed.shard, step_batches):
            if not indices:
                continue
            batch = collate_pairs([self.pairs[i] for i in indices], self.pad_id, self.shared_prompts).to(self.device)
            with autocast(self.device):
                logps = sequence_logps(self.model, batch, self.head_only).float()
            chosen_logps, rejected_logps = chosen_and_rejected(logps)
            chosen_logratios = chosen_logps - self.ref_chosen[indices].to(self.device)
            rejected_logratios = rejected_logps - self.ref_rejected[indices].to(self.device)
            chosen_lengths, rejected_lengths = chosen_and_rejected(batch.response_lengths)
            losses = pair_losses(self.config, chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
            (losses.sum() / pairs_in_step).backward()  # the step's loss is the mean over all its pairs

            chosen_rewards = self.config.beta * chosen_logratios.detach()
            rejected_rewards = self.config.beta * rejected_logratios.detach()
            per_pair = (losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                        chosen_rewards - rejected_rewards, chosen_logps.detach(), rejected_logps.detach())
            sums += torch.tensor([values.sum().item() for values in per_pair] + [batch.num_tokens], dtype=torch.float64)
        distributed.sum_gradients(self.trainable)
        distributed.all_reduce_sum(sums)

        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm or math.inf)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_seen += pairs_in_step
        return {
            **{name: total / pairs_in_step for name, total in zip(self.METRICS, sums.tolist())},
            "grad_norm": grad_norm.item(),
            "learning_rate": learning_rate,
            "tokens_per_second": sums[-1].item() / (time.perf_counter() - started),
            "epoch": self.samples_seen / len(self.pairs),
            "samples_seen": self.samples_seen,
            "data/skipped_too_long": self.skipped,
            "memory/peak_mb": peak_memory_mb(self.device),
        }

    def extra_state(self) -> dict:
        return {"samples_seen": torch.tensor(self.samples_seen), "num_pairs": torch.tensor(len(self.pairs))}

    def load_extra_state(self, state: dict) -> None:
        if int(state["num_pairs"]) != len(self.pairs):
            raise ValueError(f"The checkpoint was trained on {int(state['num_pairs'])} pairs, but the run's data "
                             f"now has {len(self.pairs)} ({DATA_FILE} was changed or removed)")
        self.samples_seen = int(state["samples_seen"])
