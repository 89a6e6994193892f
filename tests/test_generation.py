"""Sampling helpers: frozen weights prepacked for the PPO rollout."""

import torch

from studio.core.generation import prepacked_linears
from studio.core.models import ModelSource, add_lora, load_model


def test_prepacked_linears_give_the_same_logits_and_are_undone_on_exit(tiny_model_dir):
    model, _ = load_model(ModelSource("folder", str(tiny_model_dir)))
    policy = add_lora(model, target_modules=["q_proj", "v_proj", "lm_head"])
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        before = policy(input_ids=ids).logits
        with prepacked_linears(policy, batch_size=2):
            switched = [m for m in policy.modules() if "forward" in vars(m)]
            inside = policy(input_ids=ids).logits
        after = policy(input_ids=ids).logits
    # x86 CPUs (AVX2, AVX-512: this project's machines) pack the frozen Linear layers, no trainable one.
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        assert policy.base_model.model.lm_head.base_layer in switched
    assert all(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in switched)
    assert torch.allclose(inside, before, atol=1e-5)  # the same fp32 products, summed in another order
    assert torch.equal(after, before)
    assert not [m for m in policy.modules() if "forward" in vars(m)]  # every layer is back to its own forward


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
