"""Does FSDP2 (`torch.distributed.fsdp.fully_shard`) run a PEFT LoRA model here, and the studio's own
model calls under it? The check behind docs/scale-out.md's FSDP table.

    torchrun --standalone --nproc_per_node 2 bench/fsdp_probe.py    # gloo on the CPU, NCCL on GPUs
    torchrun --standalone --nproc_per_node 1 bench/fsdp_probe.py    # the reference numbers

The tiny random model with LoRA (r 8) on every decoder layer; each layer, then the whole PEFT model,
is wrapped with fully_shard. Rank 0 prints each stage as "ok" or "FAILED" with the error, and the
loss and grad norm of 2 training steps on 4 fixed sequences (each rank its share, so 1 and 2
processes must print the same numbers).
"""

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from studio.core.dpo import unwrap
    from studio.core.generation import sample
    from studio.core.models import add_lora
    from studio.core.tiny import build_tiny_model_folder

    torch.set_num_threads(1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    folder = Path(tempfile.gettempdir()) / "studio-fsdp-probe"
    if rank == 0:
        build_tiny_model_folder(folder)
    dist.barrier()

    def report(stage: str, call) -> None:
        try:
            result = call()
            message = "ok" + (f": {result}" if result else "")
        except Exception as exc:  # the point of the probe: say which stage fails, and how
            message = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        if rank == 0:
            print(f"{stage:<58} {message}", flush=True)

    torch.manual_seed(0)
    policy = add_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device), 8, 16, 0.0)
    for layer in unwrap(policy).model.layers:
        fully_shard(layer)
    fully_shard(policy)
    parameters = [p for p in policy.parameters() if p.requires_grad]
    report("fully_shard (LoRA parameter type)", lambda: type(parameters[0]).__name__)
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    sequences = (torch.arange(40, device=device).view(4, 10) % 50 + 3)
    mine = sequences[rank::world]

    def train_step() -> str:
        loss = policy(input_ids=mine, labels=mine).loss * len(mine) / len(sequences)
        (loss * world).backward()  # FSDP averages the ranks' gradients; the shares' losses add up
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().reshape(1)
        dist.all_reduce(total)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return f"loss {total.item():.6f}, grad norm {grad_norm.item():.6f}"

    for step in range(2):
        report(f"training step {step} (forward, backward, clip, AdamW)", train_step)

    def reference_forward() -> None:
        with policy.disable_adapter(), torch.no_grad():
            policy(input_ids=mine)

    def body_then_head() -> None:  # DPO's sequence_logps: the transformer body, then the LM head
        hidden = unwrap(policy).base_model(input_ids=mine, use_cache=False).last_hidden_state
        unwrap(policy).get_output_embeddings()(hidden).sum().backward()
        optimizer.zero_grad()

    def forward_after_body_then_head() -> None:  # the call above goes around the root's FSDP hooks
        with torch.no_grad():
            policy(input_ids=mine)

    def studio_sampling() -> None:
        policy.eval()
        with torch.no_grad():
            sample(policy, mine[:1], torch.ones_like(mine[:1]), 3, [0], 0, temperature=1.0)

    def transformers_generate() -> str:
        return f"{policy.generate(input_ids=mine[:1], max_new_tokens=3, do_sample=False).shape[1]} tokens"

    def full_lora_state() -> str:  # what saving the adapter needs: a collective, so on every rank
        state = {k: v.full_tensor() for k, v in policy.state_dict().items() if "lora" in k}
        return f"{len(state)} tensors, {sum(v.numel() for v in state.values())} numbers"

    report("reference forward (disable_adapter)", reference_forward)
    report("transformers generate", transformers_generate)
    report("the studio's sampling loop (generation.sample)", studio_sampling)
    report("full LoRA state dict (every rank)", full_lora_state)
    report("DPO's body-then-head call, backward", body_then_head)
    report("a whole-model forward after it", forward_after_body_then_head)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
