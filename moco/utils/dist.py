"""Distributed helpers that work with and without a process group.

``get_world_size`` / ``get_rank`` are 1 / 0 when torch.distributed is not initialised;
``concat_all_gather`` is the official gather without gradient (Shuffle BN, the queue, the memory
bank); ``all_gather_with_grad`` keeps the gradient (the batch-wise losses): each key's gradient
comes back to the process that computed it.
"""

import warnings

import torch
import torch.distributed as dist

# torch 2.x marks torch.distributed.nn.functional.all_gather deprecated in favour of a private
# module; it is the public differentiable gather, so keep it and keep the runs' stderr clean.
warnings.filterwarnings(
    "ignore",
    message="torch.distributed.nn.functional.all_gather is deprecated",
    category=FutureWarning,
)


def get_world_size():
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def get_rank():
    """Rank in the default group (0 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@torch.no_grad()
def concat_all_gather(tensor):
    """all_gather along dim 0 without gradient (official). Every process must pass the same shape."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def all_gather_with_grad(x):
    """Concatenation along dim 0 of ``x`` from every process, differentiable (x itself in 1 process)."""
    if get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)
