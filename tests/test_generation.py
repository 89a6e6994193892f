"""Sampling: the decoding loop, the draw of each token, prepacked weights, prompt encoding."""

import pytest
import torch

from studio.core.generation import left_pad, next_tokens, prepacked_linears, row_uniforms, sample
from studio.core.models import ModelSource, add_lora, load_model


def test_prepacked_linears_merge_lora_give_the_same_logits_and_are_undone_on_exit(tiny_model_dir):
    model, _ = load_model(ModelSource("folder", str(tiny_model_dir)))
    policy = add_lora(model, target_modules=["q_proj", "v_proj", "lm_head"])
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:  # a trained adapter: merging it must matter
            torch.nn.init.normal_(parameter, std=0.05)
    policy.eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        before = policy(input_ids=ids).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
        assert not torch.allclose(before, base, atol=1e-3)
        with prepacked_linears(policy, batch_size=2):
            switched = [m for m in policy.modules() if "forward" in vars(m)]
            inside = policy(input_ids=ids).logits
        with policy.disable_adapter(), prepacked_linears(policy, batch_size=2):
            inside_base = policy(input_ids=ids).logits
        after = policy(input_ids=ids).logits
    # x86 CPUs (AVX2, AVX-512: this project's machines) pack every Linear layer: the LoRA ones whole
    # (adapter merged in), the others (k_proj here) directly; never the adapters' own small layers.
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        lm_head = policy.base_model.model.lm_head
        assert lm_head in switched and lm_head.base_layer not in switched
        assert any(type(m) is torch.nn.Linear and m.out_features == m.in_features // 2 for m in switched)  # k_proj
    assert not [m for m in switched if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert torch.allclose(inside, before, atol=1e-5)  # the same fp32 products, summed in another order
    assert torch.allclose(inside_base, base, atol=1e-5)  # packed with the adapter switched off: the base
    assert torch.equal(after, before)
    assert not [m for m in policy.modules() if "forward" in vars(m)]  # every layer is back to its own forward
    with pytest.raises(RuntimeError, match="no_grad"):
        with prepacked_linears(policy, batch_size=2):
            pass


def test_next_tokens_samples_the_softmax_within_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).repeat(40000, 1)
    torch.manual_seed(0)
    counts = torch.bincount(next_tokens(logits, temperature=1.0), minlength=5) / len(logits)
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01)
    # Temperature 0.5 squares the probabilities before normalising them.
    squared = torch.tensor([0.25, 0.09, 0.0225, 0.0025, 0.0]) / 0.365
    counts = torch.bincount(next_tokens(logits, temperature=0.5), minlength=5) / len(logits)
    assert torch.allclose(counts, squared, atol=0.01)
    # top_p 0.7: the smallest set of most likely tokens holding 70% of the mass is {0, 1}.
    counts = torch.bincount(next_tokens(logits, temperature=1.0, top_p=0.7), minlength=5) / len(logits)
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01)
    assert next_tokens(logits[:2], temperature=0).tolist() == [0, 0]


def test_sample_decodes_greedily_as_transformers_generate(tiny_model_dir):
    """Left-padded prompts of different lengths, the KV cache, stop tokens: the same tokens as
    `model.generate`, an independent implementation of the same decoding."""
    model, tokenizer = load_model(ModelSource("folder", str(tiny_model_dir)))
    policy = add_lora(model, target_modules=["q_proj", "v_proj"])
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    policy.eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        expected = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=[]).tolist()
    tokens = sample(policy, ids, mask, 12, stop_ids=[], pad_id=tokenizer.pad_token_id)
    assert tokens.tolist() == [row[ids.shape[1]:] for row in expected]

    # A row that emits a stop token goes on with padding; decoding ends once every row stopped.
    stop = tokens[1, 3].item()
    stopped = sample(policy, ids, mask, 12, stop_ids=[stop], pad_id=tokenizer.pad_token_id)
    for row, full in zip(stopped.tolist(), tokens.tolist()):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row[:cut] == full[:cut] and set(row[cut:]) <= {tokenizer.pad_token_id}


def test_rows_with_one_prompt_share_its_prefill_and_sample_as_they_would_alone(tiny_model_dir):
    model, tokenizer = load_model(ModelSource("folder", str(tiny_model_dir)))
    model.eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [5, 6, 7, 8, 9, 10], [13, 14, 15], [11, 12], [5, 6, 7, 8, 9, 10]]
    seeds = [3, 1, 4, 1, 5, 9]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    calls = []
    original = model.forward
    model.forward = lambda **kwargs: calls.append(kwargs["input_ids"].shape) or original(**kwargs)
    with torch.no_grad():
        together = sample(model, ids, mask, 8, [], tokenizer.pad_token_id, temperature=1.0,
                          uniforms=row_uniforms(seeds, 8, "cpu"))
    assert calls[0] == (3, 6)  # the prefill: three distinct prompts, each once
    assert len(set(map(tuple, together.tolist()))) == 6  # every row drew its own tokens
    del model.forward
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone_ids, alone_mask = left_pad([prompt], tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            alone = sample(model, alone_ids, alone_mask, 8, [], tokenizer.pad_token_id, temperature=1.0,
                           uniforms=row_uniforms([seed], 8, "cpu"))
        assert alone[0].tolist() == together[row].tolist()


def test_sample_feeds_a_streamer_the_prompt_then_each_token(tiny_model_dir):
    model, tokenizer = load_model(ModelSource("folder", str(tiny_model_dir)))
    model.eval()

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.reshape(-1).tolist())

        def end(self):
            self.calls.append("end")

    ids, mask = left_pad([[5, 6, 7]], tokenizer.pad_token_id, "cpu")
    recorder = Recorder()
    torch.manual_seed(1)
    tokens = sample(model, ids, mask, 6, stop_ids=[], pad_id=tokenizer.pad_token_id, temperature=1.0,
                    streamer=recorder)
    assert recorder.calls == [[5, 6, 7], *[[t] for t in tokens[0].tolist()], "end"]


def test_plain_text_prompts_are_encoded_as_dpo_trains_on_them(tiny_model_dir):
    """A tokenizer that adds BOS (Llama's do) must see it at sampling time too, as in training."""
    from transformers import AutoTokenizer

    from studio.core.dpo import tokenize_pair
    from studio.core.generation import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_bos_token = True
    prompt = "Q: what colour is the sky?\nA:"
    trained_on = tokenize_pair(tokenizer, {"prompt": prompt, "chosen": " Blue.", "rejected": " Green."}).prompt
    encoded = encode_prompt(tokenizer, prompt)
    assert encoded[0] == tokenizer.bos_token_id
    assert encoded[:len(trained_on)] == trained_on
