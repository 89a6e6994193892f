"""Frozen Linear layers through oneDNN: the same outputs and input gradients as torch's own Linear,
trainable layers left alone, and sampling's prepacked weights undone back to the routed forward."""

import pytest
import torch

from studio.core.cpu_linears import onednn_available, route_frozen_linears
from studio.core.generation import prepacked_linears
from studio.core.models import ModelSource, add_lora, load_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="oneDNN's linear op needs an x86 CPU")


def frozen_linear(bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40, bias=bias).requires_grad_(False)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_a_routed_frozen_layer_gives_torchs_outputs_and_input_gradients(bias):
    layer = frozen_linear(bias)
    x = torch.randn(3, 5, 24, requires_grad=True)
    weights = torch.randn(3, 5, 40)  # a loss that weighs every output differently
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    assert route_frozen_linears(layer) == 1
    out = layer(x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


def test_only_frozen_layers_are_routed_and_lora_gradients_stay_those_of_torchs_products(tiny_model_dir):
    def lora_gradients(route: bool) -> dict[str, torch.Tensor]:
        model, _ = load_model(ModelSource("folder", str(tiny_model_dir)))
        torch.manual_seed(0)
        policy = add_lora(model)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        if route:
            routed = route_frozen_linears(policy)
            frozen = [m for m in policy.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
            assert routed == len(frozen) > 0
            assert all("forward" not in m.__dict__ for m in policy.modules()
                       if type(m) is torch.nn.Linear and m.weight.requires_grad)  # LoRA A and B keep theirs
        logits = policy(input_ids=torch.tensor([[3, 4, 5, 6, 7, 8]])).logits
        logits.log_softmax(-1)[0, :, 5].sum().backward()
        return {name: p.grad for name, p in policy.named_parameters() if p.requires_grad}

    plain, routed = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == routed.keys()
    for name in plain:
        assert torch.allclose(routed[name], plain[name], rtol=1e-4, atol=1e-6), name


def test_sampling_puts_the_routed_forward_back_after_its_prepacked_one(tiny_model_dir):
    model, _ = load_model(ModelSource("folder", str(tiny_model_dir)))
    assert route_frozen_linears(model.eval().requires_grad_(False)) > 0
    layer = model.model.layers[0].mlp.down_proj
    routed = layer.forward
    with torch.no_grad(), prepacked_linears(model, 2):
        assert layer.forward is not routed
    assert layer.forward is routed


def test_the_output_may_be_changed_in_place_as_a_linear_layers_can():
    layer = frozen_linear(bias=True)
    x = torch.randn(4, 24, requires_grad=True)
    route_frozen_linears(layer)
    out = layer(x)
    out.div_(2.0)  # the critic-free engines divide logits by the temperature in place
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(grad, layer.weight.sum(0).expand(4, 24) / 2.0, rtol=1e-5, atol=1e-6)
