"""torch's default fp32 Linear against oneDNN's (core/cpu_linears.py), on the demo model's shapes.

Each shape is a product a DPO or GRPO training step makes: the forward x W^T of the attention and
MLP projections and of the LM head over ~870 tokens, and the backward's grad W (W given as a
transposed view, as FrozenLinear passes it). One torch thread; GFLOP/s = 2 m k n / seconds, the
median of 9 timed calls after one warm-up. The largest difference between the two results is
printed relative to the largest value, to show it is the same fp32 product.

    .venv/bin/python bench/linear_kernels.py           # the demo model's shapes
    .venv/bin/python bench/linear_kernels.py --smoke   # tiny shapes, 2 calls: does it run?
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import studio from the checkout
from studio.core.cpu_linears import onednn_available, onednn_linear  # noqa: E402

TOKENS, HIDDEN, INTERMEDIATE, VOCAB, RESPONSE_TOKENS = 868, 576, 1536, 49152, 716
SHAPES = {  # name: (rows, in features, out features, backward product)
    "gate/up forward": (TOKENS, HIDDEN, INTERMEDIATE, False),
    "down forward": (TOKENS, INTERMEDIATE, HIDDEN, False),
    "q/o forward": (TOKENS, HIDDEN, HIDDEN, False),
    "gate/up backward (grad W)": (TOKENS, INTERMEDIATE, HIDDEN, True),
    "LM head forward": (RESPONSE_TOKENS, HIDDEN, VOCAB, False),
    "LM head backward (grad W)": (RESPONSE_TOKENS, VOCAB, HIDDEN, True),
}


def median_seconds(function, calls: int) -> float:
    function()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 calls each")
    args = parser.parse_args()
    if not onednn_available():
        sys.exit("oneDNN's linear op is not available here (it needs an x86 CPU): nothing to compare")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    calls = 2 if args.smoke else 9
    print(f"one thread, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    print(f"{'product':28s} {'m x k x n':>20s} {'torch GFLOP/s':>14s} {'oneDNN GFLOP/s':>15s} {'ratio':>6s} {'rel. diff':>9s}")
    for name, (rows, inputs, outputs, backward) in SHAPES.items():
        if args.smoke:
            rows, inputs, outputs = 8, min(inputs, 32), min(outputs, 48)
        x = torch.randn(rows, inputs)
        # Forward: W is [out, in]. Backward: the layer's W is [in, out] (it maps `outputs` back to
        # `inputs` features), given transposed, as FrozenLinear's backward gives it.
        weight = torch.randn(inputs, outputs).t() if backward else torch.randn(outputs, inputs)
        expected = torch.nn.functional.linear(x, weight)
        difference = ((onednn_linear(x, weight) - expected).abs().max() / expected.abs().max()).item()
        flops = 2 * rows * inputs * outputs
        default = flops / median_seconds(lambda: torch.nn.functional.linear(x, weight), calls) / 1e9
        onednn = flops / median_seconds(lambda: onednn_linear(x, weight), calls) / 1e9
        print(f"{name:28s} {f'{rows} x {inputs} x {outputs}':>20s} {default:14.0f} {onednn:15.0f} "
              f"{onednn / default:5.2f}x {difference:9.1e}")


if __name__ == "__main__":
    main()
