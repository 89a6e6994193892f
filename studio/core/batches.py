"""Token batches for scoring responses to prompts, in one of two layouts.

* One row per sequence (``collate``): prompt + response, right-padded.
* One row per prompt (``collate_shared``): the prompt once, then each of its responses. A response's
  positions restart where the prompt ends, and it attends to the prompt and to itself only (a 4D
  mask), so it scores as it would alone, without the prompt being computed once per response or a
  short response being padded to a long one's length. DPO puts a pair's two responses in a row;
  GRPO and RLOO a group's completions.

``shared_prompts_match`` checks once per run that the model takes the shared layout. Every mask
comes from lengths, never from token ids: the pad token is often the EOS token.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """Right-padded rows of tokens, and which response token each scored position predicts."""

    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor  # [rows, width] 1 on real tokens; shared layout: [rows, 1, width, width] bool
    position_ids: torch.Tensor  # [rows, width] each token's position in its own sequence (prompt + response)
    rows: torch.Tensor  # [N] for each scored response token: its row...
    cols: torch.Tensor  # [N] ...the position whose hidden state predicts it...
    targets: torch.Tensor  # [N] ...the token itself...
    responses: torch.Tensor  # [N] ...which response it is in (numbered in the order they were given)...
    offsets: torch.Tensor  # [N] ...and where in that response
    response_lengths: torch.Tensor  # [responses] scored tokens per response
    num_tokens: int  # real (not padding) tokens in the batch

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "num_tokens"}
        return Batch(**moved, num_tokens=self.num_tokens)

    @property
    def num_responses(self) -> int:
        return len(self.response_lengths)


class _RowBuilder:
    """Builds a Batch row by row: tokens, positions, and the response tokens to score."""

    def __init__(self) -> None:
        self.tokens, self.positions, self.scored = [], [], []  # scored: (row, col, token's col, response, offset)
        self.num_responses = 0

    def add_row(self, tokens: list[int], positions: list[int]) -> int:
        self.tokens.append(tokens)
        self.positions.append(positions)
        return len(self.tokens) - 1

    def score(self, row: int, start: int, length: int, predictor: int) -> None:
        """Score the next response: its `length` tokens at `start` in `row`. `predictor` is the position
        that predicts its first token (the prompt's last token; -1 without a prompt: then it is not scored)."""
        for offset in range(length):
            col = predictor if offset == 0 else start + offset - 1
            if col >= 0:
                self.scored.append((row, col, start + offset, self.num_responses, offset))
        self.num_responses += 1

    def batch(self, pad_id: int, allowed: torch.Tensor | None = None) -> Batch:
        width = max(len(tokens) for tokens in self.tokens)
        input_ids = torch.full((len(self.tokens), width), pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(self.tokens), width), dtype=torch.long)
        real = torch.zeros((len(self.tokens), width), dtype=torch.long)
        for row, (tokens, positions) in enumerate(zip(self.tokens, self.positions)):
            input_ids[row, :len(tokens)] = torch.tensor(tokens)
            position_ids[row, :len(tokens)] = torch.tensor(positions)
            real[row, :len(tokens)] = 1
        rows, cols, token_cols, responses, offsets = (torch.tensor(column, dtype=torch.long)
                                                      for column in zip(*self.scored))
        return Batch(input_ids, real if allowed is None else allowed, position_ids, rows, cols,
                     targets=input_ids[rows, token_cols], responses=responses, offsets=offsets,
                     response_lengths=torch.bincount(responses, minlength=self.num_responses),
                     num_tokens=int(real.sum()))


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """One row per sequence: prompt then response."""
    builder = _RowBuilder()
    for prompt, response in zip(prompts, responses):
        row = builder.add_row(prompt + response, list(range(len(prompt) + len(response))))
        builder.score(row, len(prompt), len(response), predictor=len(prompt) - 1)
    return builder.batch(pad_id)


def collate_shared(groups: list[tuple[list[int], list[list[int]]]], pad_id: int) -> Batch:
    """One row per (prompt, responses) group: the prompt once, then each response, which sees the
    prompt and itself only. Responses are numbered group by group, in the order given."""
    builder = _RowBuilder()
    widths = [len(prompt) + sum(map(len, responses)) for prompt, responses in groups]
    allowed = torch.zeros((len(groups), 1, max(widths), max(widths)), dtype=torch.bool)
    allowed[:, 0] = torch.eye(max(widths), dtype=torch.bool)  # a padding token sees itself alone: no empty row
    for (prompt, responses), width in zip(groups, widths):
        positions = list(range(len(prompt))) + [len(prompt) + i for response in responses for i in range(len(response))]
        row = builder.add_row(prompt + [token for response in responses for token in response], positions)
        allowed[row, 0, :width, :width] = torch.ones((width, width), dtype=torch.bool).tril()
        start = len(prompt)
        for response in responses:
            builder.score(row, start, len(response), predictor=len(prompt) - 1)
            end = start + len(response)
            allowed[row, 0, end:width, start:end] = False  # later responses do not see this one
            start = end
    return builder.batch(pad_id, allowed)


def unwrap(model):
    """The transformers causal LM inside a PeftModel (its LoRA layers still in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_inputs(causal_lm, batch: Batch) -> dict:
    """The forward pass's arguments. A shared-layout mask is boolean, as SDPA takes it; other attention
    implementations add it to the scores, so they get 0 where a token may attend and a large negative elsewhere."""
    mask = batch.attention_mask
    if mask.dim() == 4 and causal_lm.config._attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids,
            "use_cache": False}


def scored_hidden_states(model, batch: Batch) -> torch.Tensor:
    """[N, hidden] the transformer body's last hidden states at the batch's scored positions."""
    causal_lm = unwrap(model)
    hidden = causal_lm.base_model(**model_inputs(causal_lm, batch)).last_hidden_state
    return hidden[batch.rows, batch.cols]


def scored_logits(model, batch: Batch, head_only: bool = False) -> torch.Tensor:
    """[N, vocab] logits at the batch's scored positions. `head_only`: the body, then the LM head at
    those positions only (calling the head module, so a LoRA adapter on it still applies); otherwise
    the model's own forward (for models that transform their logits after the head), its head run at
    the positions some row scores."""
    if head_only:
        return unwrap(model).get_output_embeddings()(scored_hidden_states(model, batch))
    kept = batch.cols.unique()  # sorted
    output = model(**model_inputs(unwrap(model), batch), logits_to_keep=kept)
    return output.logits[batch.rows, torch.searchsorted(kept, batch.cols)]


@contextmanager
def evaluating(causal_lm):
    """No dropout inside: a probe's two forwards must see the same weights."""
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        yield
    finally:
        causal_lm.train(was_training)


@torch.no_grad()
def head_only_matches_forward(model) -> bool:
    """Whether body + LM head give the model's own logits (not so for models that soft-cap or scale them)."""
    causal_lm = unwrap(model)
    with evaluating(causal_lm):
        probe = torch.arange(1, 9, device=next(causal_lm.parameters()).device).unsqueeze(0)
        logits = causal_lm.get_output_embeddings()(causal_lm.base_model(input_ids=probe).last_hidden_state)
        return torch.allclose(logits, causal_lm(input_ids=probe).logits, rtol=1e-4, atol=1e-4)


PROBE = ([1, 2, 3], [[4, 5], [6, 7, 8, 9]]), ([2, 3], [[4, 5, 6, 7, 8], [9], [5]])


def within_sliding_window(model, length: int) -> bool:
    """Whether sequences of `length` tokens fit the model's sliding attention window (if it has one),
    which a custom mask would override."""
    window = getattr(unwrap(model).config, "sliding_window", None)
    return window is None or length <= window


@torch.no_grad()
def attention_takes_shared_layout(model) -> bool:
    """Whether responses scored after a shared prompt get the log-probs they get alone: not so where
    attention takes no custom mask (flash-attention kernels, for one)."""
    causal_lm = unwrap(model)
    device = next(causal_lm.parameters()).device
    alone = collate([prompt for prompt, responses in PROBE for _ in responses],
                    [response for _, responses in PROBE for response in responses], pad_id=0).to(device)
    shared = collate_shared(list(PROBE), pad_id=0).to(device)
    with evaluating(causal_lm):
        expected = scored_logits(model, alone).log_softmax(-1)
        try:
            got = scored_logits(model, shared).log_softmax(-1)
        except (RuntimeError, ValueError, TypeError):
            return False
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def shared_prompts_match(model, max_length: int) -> bool:
    """Whether the shared layout scores as separate sequences do, for sequences up to `max_length` tokens."""
    return within_sliding_window(model, max_length) and attention_takes_shared_layout(model)
