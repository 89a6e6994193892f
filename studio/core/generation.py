"""Batched sampling with fixed seeds: eval samples at checkpoints, compare panes, labelling.

Prompts follow TRL's convention: a list of {role, content} messages goes through the tokenizer's
chat template (with the generation prompt); a plain string is used as raw text.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the first stop token
    finished: bool  # ended with a stop token rather than running out of max_new_tokens


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list)


def encode_prompt(tokenizer, prompt) -> list[int]:
    if is_conversational(prompt):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]  # BOS where the tokenizer adds one, as DPO and TRL tokenise prompts


def stop_token_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded so every prompt ends at the same position."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _pack_frozen_linears(model, batch_size: int) -> dict:
    """{layer: weight prepacked by oneDNN for `batch_size` rows} for the frozen fp32 Linear layers of a
    model on a CPU with AVX2 or AVX-512; {} elsewhere (GPUs, ARM, a torch without these ops)."""
    capable = (torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX")
               and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    if not capable:
        return {}
    return {layer: torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), batch_size)
            for layer in model.modules()
            if type(layer) is torch.nn.Linear and not layer.weight.requires_grad
            and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32}


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def prepacked_linears(model, batch_size: int):
    """Within it, the model's frozen fp32 Linear layers multiply with a copy of their weights that
    oneDNN prepacked for `batch_size` rows (x86 CPUs; elsewhere nothing changes). Forward only: the
    packed product has no gradient, so use it under torch.no_grad(). Trainable layers are left out.

    Sampling multiplies a few rows by every weight once per token. There the default fp32 kernel
    moves ~7 GB/s of weights and oneDNN's prepacked layout ~12 (an AVX-512 core, batch 8): the same
    fp32 maths, only the order of the sums differs. The copy lives only inside the block (packing
    the demo model takes ~0.3 s), so no memory is held between rollouts.
    """
    packed = _pack_frozen_linears(model, batch_size)
    for layer, weight in packed.items():
        layer.forward = functools.partial(_packed_linear, weight=weight, bias=layer.bias)
    try:
        yield
    finally:
        for layer in packed:
            del layer.forward  # back to nn.Linear.forward


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: position + 1], True
    return tokens, False


@torch.no_grad()
def generate(model, tokenizer, prompts: list, decoding: Decoding = Decoding(), batch_size: int = 8,
             on_batch: Callable[[int, list[Generation]], None] | None = None, streamer=None) -> list[Generation]:
    """Generate one response per prompt. Seeded: the same call gives the same texts.

    The caller's RNG state is left untouched (training resumes bit-identically after eval samples).
    `on_batch(first_index, generations)` is called after each batch, for progress; a transformers
    `streamer` (one prompt only) receives the tokens as they come.
    """
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()  # dropout off while sampling
    results: list[Generation] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(decoding.seed)
            for start in range(0, len(prompts), batch_size):
                encoded = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
                input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id, device)
                sampling = decoding.temperature > 0
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask,
                    max_new_tokens=decoding.max_new_tokens, do_sample=sampling,
                    temperature=decoding.temperature if sampling else None,
                    top_p=decoding.top_p if sampling else None, top_k=0 if sampling else None,
                    eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                )
                batch = []
                for row, prompt_ids in enumerate(encoded):
                    response, finished = cut_at_stop(output[row, input_ids.shape[1]:].tolist(), stops)
                    text = tokenizer.decode(response, skip_special_tokens=True)
                    batch.append(Generation(text, prompt_ids, response, finished))
                results.extend(batch)
                if on_batch is not None:
                    on_batch(start, batch)
    finally:
        model.train(was_training)
    return results
