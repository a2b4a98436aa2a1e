"""InstDisc's memory bank (Wu et al. 2018), as the MoCo paper's "memory bank" mechanism uses it.

One L2-normalised feature per dataset sample (``bank``: size x dim). When sample i is seen, its
entry becomes ``normalize(m * v_i + (1 - m) * f_i)`` with ``m = 0.5``; negatives are K entries
drawn uniformly (with replacement, as InstDisc's sampler) from the whole bank.

Under torch.distributed every process all-gathers the batch's indices and features and applies the
same update, so the banks stay identical without broadcasting the (dataset-sized) bank.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moco.dist import concat_all_gather, get_world_size


class MemoryBank(nn.Module):
    """``bank`` buffer (saved in checkpoints with the model) plus the update and sampling rules."""

    def __init__(self, size, dim, momentum=0.5):
        super().__init__()
        if int(size) < 1:
            raise ValueError(f"memory bank: size must be >= 1 (one entry per sample), got {size}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"memory bank: momentum must be in [0, 1) (MODEL.MEMORY_BANK_MOMENTUM), "
                f"got {momentum}"
            )
        self.momentum = float(momentum)
        self.register_buffer("bank", F.normalize(torch.randn(int(size), int(dim)), dim=1))

    def __len__(self):
        return self.bank.shape[0]

    def sample(self, k, generator=None):
        """``(entries C x k, indices)``: k entries drawn uniformly with replacement."""
        idx = torch.randint(len(self), (int(k),), device=self.bank.device, generator=generator)
        return self.bank.index_select(0, idx).t(), idx

    @torch.no_grad()
    def update(self, index, features):
        """``bank[i] = normalize(m * bank[i] + (1 - m) * f)`` for each (i, f); all processes' batches."""
        if get_world_size() > 1:
            index, features = concat_all_gather(index), concat_all_gather(features)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise ValueError(
                f"memory bank: sample index out of range [0, {len(self)}): the bank is "
                "sized for another dataset (DATA.ROOT changed since the checkpoint?)"
            )
        old = self.bank.index_select(0, index)
        new = F.normalize(
            self.momentum * old + (1.0 - self.momentum) * features.to(old.dtype), dim=1
        )
        self.bank.index_copy_(0, index, new)
