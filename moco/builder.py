"""The MoCo model: the paper's Algorithm 1, state_dict-compatible with facebookresearch/moco.

Keys of ``MoCo(...).state_dict()`` are ``encoder_q.<torchvision key>``, ``encoder_k.*``, ``queue``
and ``queue_ptr`` (``fc.0.*`` / ``fc.2.*`` with the MLP head), so an official checkpoint's
``state_dict`` with the ``module.`` prefix stripped loads with ``strict=True`` in every Shuffle BN
mode (SplitBatchNorm and SyncBatchNorm keep BatchNorm2d's keys).
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from moco.shuffle_bn import (
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    concat_all_gather,
    convert_split_batchnorm,
    get_world_size,
    resolve_shuffle_bn,
)


def resnet_encoder(arch):
    """torchvision constructor for a ResNet-family ``arch`` (resnet50, resnext50_32x4d, ...)."""
    names = [n for n in torchvision.models.resnet.__all__ if n[0].islower()]
    if arch not in names:
        raise ValueError(f"unknown ResNet arch {arch!r}; choose one of: {', '.join(names)}")
    return getattr(torchvision.models, arch)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of K negative keys.

    ``forward(im_q, im_k)`` returns ``(logits, labels)`` for the InfoNCE loss
    ``F.cross_entropy(logits, labels)``; the positive is column 0.
    """

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False,
                 shuffle_bn="split", split_bn_groups=8):
        super().__init__()
        self.K, self.m, self.T = int(K), float(m), float(T)
        self.shuffle_bn = resolve_shuffle_bn(shuffle_bn)
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:  # MoCo v2 head: fc -> Sequential(Linear(d, d), ReLU, fc), keys fc.0.* / fc.2.*
            for enc in (self.encoder_q, self.encoder_k):
                if not isinstance(getattr(enc, "fc", None), nn.Linear):
                    raise ValueError("mlp=True needs an encoder whose head is an nn.Linear named 'fc'")
                d = enc.fc.weight.shape[1]
                enc.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), enc.fc)
        if self.shuffle_bn == "split":
            convert_split_batchnorm(self.encoder_q, split_bn_groups)
            convert_split_batchnorm(self.encoder_k, split_bn_groups)
        elif self.shuffle_bn == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
            self.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_k)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

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
        # K % batch == 0 (checked in forward), so the slot never wraps; the index stays on the
        # device to avoid a host sync per step.
        idx = self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)
        self.queue.index_copy_(1, idx, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(keys.shape[0]).remainder_(self.K)

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

    def forward(self, im_q, im_k):
        self._check_inputs(im_q, im_k)
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()  # before computing k, as the official code
            if self.shuffle_bn == "ddp":
                im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            elif self.shuffle_bn == "split":
                im_k, idx_unshuffle = batch_shuffle_single(im_k)
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
            if self.shuffle_bn == "ddp":
                k = batch_unshuffle_ddp(k, idx_unshuffle)
            elif self.shuffle_bn == "split":
                k = batch_unshuffle_single(k, idx_unshuffle)
        # Autograd keeps the negatives for q's gradient and the in-place enqueue below overwrites
        # N of them before backward, so snapshot the queue when a backward can follow.
        queue = self.queue.clone() if q.requires_grad else self.queue
        with torch.autocast(q.device.type, enabled=False):  # logits/T in fp32 even under AMP
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", q, queue)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels
