"""Batched sampling with fixed seeds: eval samples at checkpoints, compare panes, labelling.

Prompts follow TRL's convention: a list of {role, content} messages goes through the tokenizer's
chat template (with the generation prompt); a plain string is used as raw text. ``chat_ids`` is the
one place a conversation (with the function schemas it may call) becomes tokens, for every engine.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .cpu_linears import onednn_available, onednn_linear
from .errors import StudioError


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


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None,
             add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, which also renders the
    function schemas it may call. No tools is None, as TRL passes it: Llama's template renders its
    tool-use boilerplate for an empty list."""
    return list(tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


class ChatTemplateError(StudioError):
    """A conversation the model's chat template cannot render as it is."""


def check_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None, where: str) -> None:
    """Raise ChatTemplateError, naming `where`, when the template fails on the messages or leaves out
    their tools (TRL passes tools silently to a template that ignores them: the model never sees them)."""
    import jinja2

    def render(with_tools):
        return tokenizer.apply_chat_template(messages, tools=with_tools, tokenize=False)

    try:
        rendered = render(tools)
        ignored = bool(tools) and rendered == render(None)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise ChatTemplateError(f"{where}: the model's chat template cannot render it ({type(e).__name__}: {e})") from e
    if ignored:
        raise ChatTemplateError(f"{where}, field 'tools': the model's chat template does not render function "
                                "schemas, so the model would never see the tools its calls use. Use a model whose "
                                "template supports tools (its chat template mentions `tools`), or import the data "
                                "without the 'tools' column")


def encode_prompt(tokenizer, prompt) -> list[int]:
    if is_conversational(prompt):
        return chat_ids(tokenizer, prompt, add_generation_prompt=True)
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


def _packable_weights(model) -> dict:
    """{layer: (the fp32 weight it multiplies by, its bias)} for the frozen Linear layers and, with
    their adapters merged in, the LoRA layers of a model in eval mode, where oneDNN can prepack them
    (x86 CPUs with AVX2 or AVX-512); {} elsewhere (GPUs, ARM, a torch without these ops)."""
    if not (onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return {}
    from peft.tuners.lora import Linear as LoraLinear

    weights, wrapped = {}, set()
    for layer in model.modules():  # a LoRA layer comes before the Linear layer it wraps
        if isinstance(layer, LoraLinear):
            wrapped.add(layer.base_layer)
            weight, bias = _lora_effective_weight(layer), layer.base_layer.bias
        elif type(layer) is torch.nn.Linear and layer not in wrapped and not layer.weight.requires_grad:
            weight, bias = layer.weight.detach(), layer.bias
        else:
            continue
        if weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32:
            weights[layer] = weight, bias
    return weights


def _lora_effective_weight(layer) -> torch.Tensor | None:
    """W + the active adapters' scale * B @ A (just W with adapters disabled): what an unmerged plain
    LoRA layer computes in eval mode. None for what merging would change (dropout, DoRA and other
    variants, a layer merged already)."""
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or layer.merged or layer.training:
        return None
    if layer.disable_adapters:
        return base.weight.detach()
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if any(name in layer.lora_variant for name in active):
        return None
    return base.weight.detach() + sum(layer.get_delta_weight(name).detach() for name in active)


@contextlib.contextmanager
def prepacked_linears(model, batch_size: int):
    """Within it, the model's frozen fp32 Linear layers, and its LoRA layers with the adapters merged
    in, multiply with a copy of their weights that oneDNN prepacked for `batch_size` rows (x86 CPUs;
    elsewhere nothing changes). Sampling only: the packed product has no gradient, so it refuses to
    start with gradients on, and the model must be in eval mode for LoRA layers to be merged. The
    adapters are merged as they are when the block starts (enabled or not, their weights then).

    Sampling multiplies a few rows by every weight once per token. There the default fp32 kernel
    moves ~7 GB/s of weights and oneDNN's prepacked layout ~12 (an AVX-512 core, batch 8); merging
    LoRA drops the two small products per layer and token (~0.8 s of a 48-token rollout of the demo
    model). The same fp32 maths, only the order of the sums differs. The copies live only inside the
    block (merging and packing the demo model takes ~0.3 s), so no memory is held between rollouts.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("prepacked_linears is for sampling: use it under torch.no_grad()")
    weights = _packable_weights(model)
    previous = {layer: layer.__dict__.get("forward") for layer in weights}  # a run's frozen layers have one
    for layer, (weight, bias) in weights.items():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
        layer.forward = functools.partial(onednn_linear, weight=packed, bias=bias)
    try:
        yield
    finally:
        for layer, forward in previous.items():
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of [rows, vocab] logits: greedy at temperature 0, otherwise sampled from
    softmax(logits / temperature), cut to the nucleus of mass `top_p`, at `uniform` ([rows] numbers
    in [0, 1)) or, without it, at numbers drawn from the global RNG.

    Sampling inverts the cumulative distribution at one uniform number per row: the same
    distribution as torch.multinomial, without its exponential draw over the whole vocabulary
    (8 ms per step at 8 x 49k on this CPU, a tenth of a decoding step of the demo model).
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the mass before them covers top_p already
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    cumulative = probs.cumsum(-1)
    if uniform is None:
        uniform = torch.rand(len(probs), device=probs.device)
    point = uniform[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, point, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def row_uniforms(seeds: list[int], count: int, device) -> torch.Tensor:
    """[rows, count] uniform numbers in [0, 1), row i's from its own generator seeded with seeds[i]
    (on the CPU, so every device gets the same numbers)."""
    return torch.stack([torch.rand(count, generator=torch.Generator().manual_seed(seed))
                        for seed in seeds]).to(device)


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           stop_ids: list[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
           streamer=None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, new tokens]: the continuations of left-padded prompts, decoded with the KV cache.

    A row that has emitted a stop token goes on with `pad_id`; decoding ends when every row has
    stopped or after `max_new_tokens`. Only `temperature` and `top_p` shape the distribution (as
    TRL's PPO sampling): defaults in the model's generation_config are not applied. A transformers
    streamer (one row) gets the prompt, then each token, then end(). The model must be in eval mode.
    `uniforms` ([rows, max_new_tokens], from `row_uniforms`) fixes each row's random numbers, so a
    row's tokens do not depend on the rows sampled beside it; without it the global RNG draws them.

    A plain decoding loop rather than `model.generate`: per step it does the model call and one
    draw, nothing else (generate's logits processors, stopping criteria and multinomial draw cost
    0.5-0.7 s of a 48-token rollout of the demo model at 8 rows). Frozen and LoRA weights are prepacked
    on x86 CPUs (`prepacked_linears`), and rows with the same prompt share its prefill.
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    rows, width = input_ids.shape
    device = input_ids.device
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, max_new_tokens)], dim=1)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    # Rows with the same prompt (a group of completions) share one prefill: each distinct prompt is
    # computed once, then its cache and logits are copied to its rows.
    distinct, copies = torch.unique(input_ids, dim=0, return_inverse=True)
    one_row_each = torch.zeros(len(distinct), dtype=torch.long, device=device).scatter_(
        0, copies, torch.arange(rows, device=device))
    with prepacked_linears(model, rows):
        logits = model(input_ids=distinct, attention_mask=attention_mask[one_row_each],
                       position_ids=positions[one_row_each], cache=cache, use_cache=True,
                       logits_to_keep=1).logits[copies, -1]
        cache.batch_select_indices(copies)
        for step in range(max_new_tokens):
            uniform = None if uniforms is None else uniforms[:, step]
            token = next_tokens(logits, temperature, top_p, uniform).masked_fill_(stopped, pad_id)
            tokens.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            stopped |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or bool(stopped.all()):
                break
            positions = positions[:, -1:] + 1
            logits = model(input_ids=token[:, None], attention_mask=mask[:, :width + step + 1],
                           position_ids=positions, cache=cache, use_cache=True,
                           cache_position=torch.tensor([width + step], device=device)).logits[:, -1]
    if streamer is not None:
        streamer.end()
    return torch.stack(tokens, dim=1)


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
                output = sample(model, input_ids, attention_mask, decoding.max_new_tokens, stops,
                                tokenizer.pad_token_id, decoding.temperature, decoding.top_p, streamer)
                batch = []
                for row, prompt_ids in enumerate(encoded):
                    response, finished = cut_at_stop(output[row].tolist(), stops)
                    text = tokenizer.decode(response, skip_special_tokens=True)
                    batch.append(Generation(text, prompt_ids, response, finished))
                results.extend(batch)
                if on_batch is not None:
                    on_batch(start, batch)
    finally:
        model.train(was_training)
    return results
