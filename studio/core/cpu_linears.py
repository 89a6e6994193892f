"""Frozen fp32 Linear layers through oneDNN on x86 CPUs, in training passes.

PyTorch's default fp32 CPU matrix product (MKL's sgemm) runs at ~90 GFLOP/s on one core of this
project's AMD EPYC machines; oneDNN's, on the same fp32 tensors (unpacked weights, no copy), at
~200 (`docs/benchmarks.md`, "Frozen layers through oneDNN"). A run's frozen layers (the base
weights under LoRA, a frozen LM head) never need a weight gradient, so their forward (x W^T + b) and
the one product their backward needs (grad W) both go through oneDNN; trainable layers (the LoRA
matrices, a value head) keep autograd's own products. The same fp32 maths: only the order of the
sums differs (~1e-6 relative).
"""

from __future__ import annotations

import functools

import torch


def onednn_available() -> bool:
    """x86 CPUs with AVX2 or AVX-512, in a torch built with oneDNN and its linear op."""
    return (torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b with oneDNN (x of any leading shape; W may be a transposed view)."""
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


class FrozenLinear(torch.autograd.Function):
    """x W^T + b for 2D x, where W and b take no gradient: only x's is computed."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None, None, None


def _frozen_forward(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    if x.dtype != torch.float32:  # only fp32 is routed (a CPU autocast region would pass bf16)
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    # Reshaped outside the Function: its output must not be a view, so later in-place ops stay allowed.
    out = FrozenLinear.apply(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def route_frozen_linears(model) -> int:
    """Make the model's frozen fp32 CPU Linear layers compute through oneDNN for the rest of its
    life (a run's model lives as long as its run); returns how many (0 where oneDNN cannot)."""
    if not onednn_available():
        return 0
    frozen = [layer for layer in model.modules()
              if type(layer) is torch.nn.Linear and layer.weight.device.type == "cpu"
              and layer.weight.dtype == torch.float32
              and not any(p.requires_grad for p in layer.parameters())]
    for layer in frozen:
        layer.forward = functools.partial(_frozen_forward, layer=layer)
    return len(frozen)
