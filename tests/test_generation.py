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
