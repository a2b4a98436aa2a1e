"""InstDisc's memory bank (Wu et al. 2018), as the MoCo paper's "memory bank" mechanism uses it.

One L2-normalised feature per dataset sample (``bank``: size x dim). When sample i is seen, its
entry becomes ``normalize(m * v_i + (1 - m) * f_i)`` with ``m = 0.5``; negatives are K entries
drawn uniformly (with replacement, as InstDisc's sampler) from the whole bank.

Under torch.distributed every process all-gathers the batch's indices and features and applies the
same update, so the banks stay identical without broadcasting the (dataset-sized) bank.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.modeling.build import MECHANISM_REGISTRY, Mechanism, common_args, validate_memory_bank
from moco.modeling.encoder import build_encoder, encode
from moco.modeling.losses import info_nce_logits
from moco.modeling.resnet import resnet_encoder
from moco.modeling.shuffle_bn import resolve_shuffle_bn
from moco.utils.dist import concat_all_gather, get_world_size


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


@MECHANISM_REGISTRY.register()
class MemoryBankModel(Mechanism):
    """InstDisc's memory bank mechanism: ``forward(im_q, im_k, index)``; ``im_k`` is not used."""

    name = "memory_bank"
    dictionary_buffers = ("memory_bank.bank",)

    def __init__(
        self,
        base_encoder,
        size,
        dim=128,
        K=4096,
        T=0.07,
        head="linear",
        shuffle_bn="split",
        split_bn_groups=8,
        bank_momentum=0.5,
    ):
        super().__init__()
        if int(K) < 1:
            raise ValueError(f"memory_bank: K (negatives per step, MODEL.K) must be >= 1, got {K}")
        self.K, self.T = int(K), float(T)
        self.shuffle_bn = resolve_shuffle_bn(shuffle_bn)
        self.split_bn_groups = int(split_bn_groups)
        self.encoder_q = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)
        self.memory_bank = MemoryBank(size, dim, bank_momentum)
        # Every process applies the same updates (MemoryBank.update gathers them), so DDP need not
        # broadcast a dataset-sized buffer each step; it is broadcast once, at the first forward.
        self._ddp_params_and_buffers_to_ignore = ["memory_bank.bank"]
        self._bank_synced = False

    @classmethod
    def from_config(cls, cfg, world_size, dataset_size):
        if dataset_size is None:
            raise ValueError(
                "memory_bank: the dataset size (bank entries) is needed to build the model"
            )
        m = cfg.MODEL
        return cls(
            resnet_encoder(m.ARCH),
            dataset_size,
            K=m.K,
            bank_momentum=m.MEMORY_BANK_MOMENTUM,
            **common_args(cfg, world_size),
        )

    @classmethod
    def validate(cls, cfg, world_size):
        validate_memory_bank(cfg)

    @classmethod
    def wants_index(cls, cfg):
        return True

    def _sync_bank(self):
        if not self._bank_synced:
            if get_world_size() > 1:  # ranks seed differently: start from rank 0's bank
                dist.broadcast(self.memory_bank.bank, src=0)
            self._bank_synced = True

    def _query(self, im_q):
        return F.normalize(
            encode(self.encoder_q, im_q, self.shuffle_bn, self.split_bn_groups).float(), dim=1
        )

    def _logits(self, q, index):
        """InfoNCE ``(logits, labels)`` of ``q``: positives the bank's entries ``index`` (before
        this step's update), negatives K entries drawn from the bank."""
        with torch.no_grad():
            positive = self.memory_bank.bank.index_select(0, index)
            negatives, _ = self.memory_bank.sample(self.K)
        with torch.autocast(q.device.type, enabled=False):
            return info_nce_logits(q, positive, negatives, self.T)

    def forward(self, im_q, im_k, index):
        if index.shape[0] != im_q.shape[0]:
            raise ValueError(
                f"memory_bank: {im_q.shape[0]} images but {index.shape[0]} sample indices"
            )
        self._sync_bank()
        q = self._query(im_q)
        logits, labels = self._logits(q, index)
        self.memory_bank.update(index, q.detach())
        return logits, labels
