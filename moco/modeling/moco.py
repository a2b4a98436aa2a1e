"""MoCo (He et al. 2019), the paper's Algorithm 1: a query encoder, a momentum-updated key
encoder and a queue of K negative keys, InfoNCE over (1 positive + K negatives) / T, Shuffle BN
for the keys. ``state_dict`` keys are the official ones (``encoder_q.<torchvision key>``,
``encoder_k.*``, ``queue``, ``queue_ptr``; ``fc.0.*`` / ``fc.2.*`` with the MLP head), so an
official checkpoint with the ``module.`` prefix stripped loads with ``strict=True`` in every
Shuffle BN mode (SplitBatchNorm and SyncBatchNorm keep BatchNorm2d's keys).

As the official code, the negatives are read from ``queue.clone().detach()``: the enqueue at the
end of ``forward`` overwrites N columns that ``backward`` still needs. The copy is 2 MiB a step at
the embedded K 4096 and 32 MiB at K 65536 (docs/RESULTS.md has its measured cost).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moco.modeling.build import MECHANISM_REGISTRY, Mechanism, common_args, validate_queue
from moco.modeling.encoder import build_encoder, encode
from moco.modeling.heads import resolve_head
from moco.modeling.losses import info_nce_logits
from moco.modeling.resnet import resnet_encoder
from moco.modeling.shuffle_bn import (
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    resolve_shuffle_bn,
)
from moco.utils.dist import concat_all_gather, get_world_size


@MECHANISM_REGISTRY.register()
class MoCo(Mechanism):
    """Query encoder, momentum key encoder and a queue of K negative keys.

    ``forward(im_q, im_k)`` returns ``(logits, labels)`` for the InfoNCE loss
    ``F.cross_entropy(logits, labels)``; the positive is column 0.
    """

    name = "moco"
    dictionary_buffers = ("queue", "queue_ptr")

    def __init__(
        self,
        base_encoder,
        dim=128,
        K=65536,
        m=0.999,
        T=0.07,
        mlp=False,
        shuffle_bn="split",
        split_bn_groups=8,
        head=None,
    ):
        super().__init__()
        self.K, self.m, self.T = int(K), float(m), float(T)
        self.shuffle_bn = resolve_shuffle_bn(shuffle_bn)
        self.split_bn_groups = int(split_bn_groups)
        # MoCo v2 head (mlp=True or head="mlp"): fc -> Sequential(Linear(d, d), ReLU, fc)
        head = resolve_head(head, mlp)
        self.encoder_q = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)
        self.encoder_k = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @classmethod
    def from_config(cls, cfg, world_size, dataset_size):
        m = cfg.MODEL
        return cls(resnet_encoder(m.ARCH), K=m.K, m=m.M, **common_args(cfg, world_size))

    @classmethod
    def validate(cls, cfg, world_size):
        validate_queue(cfg)

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """theta_k = m * theta_k + (1 - m) * theta_q on parameters only (buffers: key encoder's own)."""
        params_k = list(self.encoder_k.parameters())
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, list(self.encoder_q.parameters()), alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        if get_world_size() > 1:
            keys = concat_all_gather(keys)
        # K % batch == 0 (checked at start), so the slot never wraps; the index stays on the
        # device to avoid a host sync per step.
        idx = self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)
        self.queue.index_copy_(1, idx, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(keys.shape[0]).remainder_(self.K)

    def _encode(self, encoder, x):
        return encode(encoder, x, self.shuffle_bn, self.split_bn_groups)

    def _check_inputs(self, im_q, im_k):
        if im_q.shape[0] != im_k.shape[0]:
            raise ValueError(f"MoCo: im_q has {im_q.shape[0]} samples but im_k has {im_k.shape[0]}")
        world = get_world_size()
        batch = im_q.shape[0] * world
        if self.K % batch != 0:
            raise ValueError(
                f"MoCo: queue size K={self.K} is not a multiple of the global batch {batch} "
                f"({im_q.shape[0]} per process x {world} processes); pick K and the batch so "
                "that K % batch == 0"
            )
        dist_on = dist.is_available() and dist.is_initialized()
        if self.shuffle_bn == "sync" and dist_on and im_k.device.type == "cpu":
            raise ValueError(
                "shuffle_bn='sync': torch's SyncBatchNorm does not run on CPU tensors under "
                "torch.distributed; use 'ddp' (the paper's Shuffle BN) for CPU multi-process runs"
            )

    def _query(self, im_q):
        return F.normalize(self._encode(self.encoder_q, im_q).float(), dim=1)

    @torch.no_grad()
    def _keys(self, im_k):
        """The momentum encoder's keys of ``im_k``, after its momentum update (as official)."""
        self._momentum_update_key_encoder()
        if self.shuffle_bn == "ddp":
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
        elif self.shuffle_bn == "split":
            im_k, idx_unshuffle = batch_shuffle_single(im_k)
        k = F.normalize(self._encode(self.encoder_k, im_k).float(), dim=1)
        if self.shuffle_bn == "ddp":
            k = batch_unshuffle_ddp(k, idx_unshuffle)
        elif self.shuffle_bn == "split":
            k = batch_unshuffle_single(k, idx_unshuffle)
        return k

    def _logits(self, q, k):
        """InfoNCE ``(logits, labels)`` of queries ``q``: positives ``k``, negatives this queue."""
        with torch.autocast(q.device.type, enabled=False):  # logits/T in fp32 even under AMP
            return info_nce_logits(q, k, self.queue.clone().detach(), self.T)

    def forward(self, im_q, im_k):
        self._check_inputs(im_q, im_k)
        q = self._query(im_q)  # queries: N x C
        k = self._keys(im_k)  # keys: N x C, no gradient
        logits, labels = self._logits(q, k)
        self._dequeue_and_enqueue(k)
        return logits, labels
