"""End-to-end (the MoCo paper's Fig. 2a; SimCLR with ``MODEL.LOSS nt_xent``): one encoder for
queries and keys, both with gradients; the dictionary is the keys of the current global batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moco.modeling.build import MECHANISM_REGISTRY, Mechanism, common_args
from moco.modeling.encoder import build_encoder, encode
from moco.modeling.losses import LOSSES, batch_info_nce_logits, nt_xent_logits
from moco.modeling.resnet import resnet_encoder
from moco.modeling.shuffle_bn import batch_shuffle_ddp, batch_shuffle_single, resolve_shuffle_bn
from moco.utils.dist import all_gather_with_grad


@MECHANISM_REGISTRY.register()
class EndToEnd(Mechanism):
    """One encoder, gradients through queries and keys; negatives = the other keys of the global batch."""

    name = "end_to_end"
    losses = LOSSES  # InfoNCE, or SimCLR's NT-Xent over the 2B views

    def __init__(
        self,
        base_encoder,
        dim=128,
        T=0.07,
        head="linear",
        shuffle_bn="split",
        split_bn_groups=8,
        loss="info_nce",
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(
                f"unknown loss {loss!r} (MODEL.LOSS); choose one of: {', '.join(LOSSES)}"
            )
        self.T, self.loss = float(T), loss
        self.shuffle_bn = resolve_shuffle_bn(shuffle_bn)
        self.split_bn_groups = int(split_bn_groups)
        self.encoder_q = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)

    @classmethod
    def from_config(cls, cfg, world_size, dataset_size):
        m = cfg.MODEL
        return cls(resnet_encoder(m.ARCH), loss=m.LOSS, **common_args(cfg, world_size))

    def _keys(self, im_k):
        """(this process's keys, all keys of the global batch or None), both with gradient."""
        if self.shuffle_bn == "split":
            im_k, idx_unshuffle = batch_shuffle_single(im_k)
            k = F.normalize(
                encode(self.encoder_q, im_k, "split", self.split_bn_groups).float(), dim=1
            )
            return k[idx_unshuffle], None
        if self.shuffle_bn == "ddp":
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            k_all = all_gather_with_grad(F.normalize(self.encoder_q(im_k).float(), dim=1))
            k_all = k_all[idx_unshuffle]  # global sample order
            n, rank = im_k.shape[0], dist.get_rank()
            return k_all[rank * n : (rank + 1) * n], k_all
        return F.normalize(self.encoder_q(im_k).float(), dim=1), None

    def forward(self, im_q, im_k):
        if im_q.shape[0] != im_k.shape[0]:
            raise ValueError(
                f"end_to_end: im_q has {im_q.shape[0]} samples but im_k has {im_k.shape[0]}"
            )
        q = F.normalize(
            encode(self.encoder_q, im_q, self.shuffle_bn, self.split_bn_groups).float(), dim=1
        )
        k, k_all = self._keys(im_k)
        with torch.autocast(q.device.type, enabled=False):  # logits in fp32 even under AMP
            if self.loss == "nt_xent":
                return nt_xent_logits(q, k, self.T, z2_all=k_all)
            return batch_info_nce_logits(q, k, self.T, k_all=k_all)
