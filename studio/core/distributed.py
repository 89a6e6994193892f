"""Data-parallel training with torch.distributed, as ``torchrun`` and ``accelerate launch`` start it.

Every rank runs the same engine on the same data with the same seed, so every rank holds the same
weights. Each step, a rank computes the loss of its share of the step's samples, scaled to its part
of the whole step (DPO: divided by the step's pair count; PPO: weighted by its share of each
minibatch's tokens; GRPO/RLOO: normalised by the whole batch's totals); summing the ranks'
gradients then gives exactly the one-process gradient, whatever the number of processes. That sum is DDP's gradient all-reduce (DDP divides by the world
size; our losses are already scaled, so we sum). The engines call it here directly rather than
through ``DistributedDataParallel``'s forward hooks, because DPO's forward runs the transformer body
and the LM head separately. Metrics are summed over ranks the same way. Rank 0 alone writes
checkpoints and metrics.

The shaping engines (PPO, GRPO, RLOO) also split the sampling: each rank samples and scores its
share of the step's prompts (``shard_groups``: a prompt's group of completions stays on one rank),
with random numbers seeded per rollout row rather than drawn from one stream, and every rank gets
the whole step's rollouts back (``all_gather_object``): the batch-wide statistics (advantage
whitening, reward normalisation and scaling, metrics) are then computed whole, identically on every rank.

In one process (no ``torch.distributed`` group) every function here is a no-op.
"""

from __future__ import annotations

import os


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_environment() -> bool:
    """Join the process group that torchrun / accelerate launch describe in the environment
    (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA. Returns whether this is a distributed launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _dist() is not None:
        return _dist() is not None
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # NCCL's object collectives run on the current device: this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """One GPU per process on a node: cuda:LOCAL_RANK; other devices unchanged."""
    if device == "cuda" and _dist() is not None:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shard(items: list) -> list:
    """This rank's share of a step's items: every world_size-th one, starting at its rank."""
    return items[rank()::world_size()]


def shard_groups(count: int, group_size: int) -> list[int]:
    """This rank's share of `count` rows made of groups of `group_size` adjacent rows: every
    world_size-th group, whole (a group's rows stay on one rank)."""
    return [group * group_size + row for group in shard(range(count // group_size)) for row in range(group_size)]


def all_gather_object(value) -> list:
    """[rank 0's value, rank 1's, ...] on every rank (pickled: for small Python objects)."""
    dist = _dist()
    if dist is None:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def all_reduce_sum(tensor):
    """The element-wise sum of `tensor` over ranks (in place, and returned)."""
    dist = _dist()
    if dist is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_gradients(parameters) -> None:
    """Sum the gradients of `parameters` over ranks in one flat all-reduce (DDP's bucket, unscaled)."""
    import torch

    if _dist() is None:
        return
    parameters = list(parameters)
    for p in parameters:  # a rank whose share of the step was empty has no gradients: zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in parameters]))
    for p, grad in zip(parameters, flat.split([p.numel() for p in parameters])):
        p.grad.copy_(grad.view_as(p.grad))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on one (a stop request reaches one rank only)."""
    import torch

    if _dist() is None:
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)])).item())
