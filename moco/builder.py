"""The MoCo model: the paper's Algorithm 1, state_dict-compatible with facebookresearch/moco.

Keys of ``MoCo(...).state_dict()`` are ``encoder_q.<torchvision key>``, ``encoder_k.*``, ``queue``
and ``queue_ptr`` (``fc.0.*`` / ``fc.2.*`` with the MLP head), so an official checkpoint's
``state_dict`` with the ``module.`` prefix stripped loads with ``strict=True`` in every Shuffle BN
mode (SplitBatchNorm and SyncBatchNorm keep BatchNorm2d's keys).

The queue is not copied per step. The official code computes the negatives from
``self.queue.clone().detach()`` because the enqueue at the end of ``forward`` overwrites N of them
before ``backward`` needs them. Here ``l_neg`` is :class:`_NegativeLogits`, whose backward briefly
puts the overwritten columns back (an undo log of the N-column writes made since its forward), so
the gradient uses exactly the forward-time negatives; any other in-place change of the queue
between forward and backward raises instead of giving a wrong gradient.
"""

import math
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.dist import concat_all_gather, get_world_size
from moco.heads import attach_head, resolve_head
from moco.losses import info_nce_logits
from moco.resnet import resnet_encoder
from moco.shuffle_bn import (
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    blocked_order,
    blocked_split_batchnorm,
    convert_split_batchnorm,
    resolve_shuffle_bn,
)


class _UndoLog:
    """In-place writes to ``queue`` since one forward: (column index, old columns), oldest first."""

    __slots__ = ("__weakref__", "entries", "expected_version", "peers", "queue")

    def __init__(self, queue, peers):
        self.queue, self.entries, self.peers = queue, [], peers
        self.expected_version = queue._version
        peers.add(self)


def _bump_versions(peers, queue, delta):
    for log in list(peers):
        if log.queue is queue:
            log.expected_version += delta


class _NegativeLogits(torch.autograd.Function):
    """``q @ queue`` whose backward sees the queue as it was at forward time, without a copy."""

    @staticmethod
    def forward(ctx, q, queue, log):
        ctx.log = log
        return q.mm(queue)

    @staticmethod
    def backward(ctx, grad):
        log = ctx.log
        queue = log.queue
        if queue._version != log.expected_version:
            raise RuntimeError(
                "MoCo: the queue was modified in place between forward and backward by something "
                "other than MoCo's enqueue (e.g. load_state_dict or queue.copy_); the gradient "
                "would use the wrong negatives, so run the forward again after the change"
            )
        before = queue._version
        with torch.no_grad():
            redo = []
            for idx, old in reversed(log.entries):  # undo newest first
                redo.append((idx, queue.index_select(1, idx)))
                queue.index_copy_(1, idx, old)
            grad_q = grad.mm(queue.t())
            for idx, current in reversed(redo):
                queue.index_copy_(1, idx, current)
        _bump_versions(log.peers, queue, queue._version - before)
        return grad_q, None, None


def _is_channels_last(x):
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return channels_last and not x.is_contiguous()


def validate_model(cfg):
    """MODEL.ARCH, M, T and DIM: one-line ValueError for values MoCo cannot train with."""
    resnet_encoder(cfg.MODEL.ARCH)  # raises for an unknown arch
    # T must be finite too: with T = inf every logit is 0 and the run learns nothing
    if not 0.0 <= cfg.MODEL.M <= 1.0 or not 0 < cfg.MODEL.T < math.inf or cfg.MODEL.DIM < 1:
        raise ValueError(
            f"MODEL.M (--moco-m) must be in [0, 1], MODEL.T (--moco-t) > 0 and "
            f"MODEL.DIM >= 1; got {cfg.MODEL.M}, {cfg.MODEL.T}, {cfg.MODEL.DIM}"
        )


def build_encoder(base_encoder, dim, head, shuffle_bn, split_bn_groups):
    """``base_encoder(num_classes=dim)`` with projection ``head`` (moco.heads) and the BatchNorm
    of Shuffle BN mode ``shuffle_bn`` (split: SplitBatchNorm, sync: SyncBatchNorm, else plain)."""
    encoder = attach_head(base_encoder(num_classes=dim), head)
    if shuffle_bn == "split":
        return convert_split_batchnorm(encoder, split_bn_groups)
    if shuffle_bn == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    return encoder


def encode(encoder, x, shuffle_bn, split_bn_groups):
    """``encoder(x)``. Split BN on channels_last input runs on blocked sub-batches: the encoder
    sees ``x[blocked_order]``, so block j holds the strided sub-batch j and results are those
    of the strided split, in x's order."""
    if shuffle_bn != "split" or not _is_channels_last(x):
        return encoder(x)
    order = blocked_order(x.shape[0], split_bn_groups, x.device)
    with blocked_split_batchnorm(encoder):
        out = encoder(x[order])
    return out[torch.argsort(order)]


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of K negative keys.

    ``forward(im_q, im_k)`` returns ``(logits, labels)`` for the InfoNCE loss
    ``F.cross_entropy(logits, labels)``; the positive is column 0.
    """

    dictionary_buffers = ("queue", "queue_ptr")  # equal on every replica (moco.engine.queue_digest)
    needs_index = False

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
        self._undo_logs = weakref.WeakSet()  # of forwards whose graph may still run backward
        # MoCo v2 head (mlp=True or head="mlp"): fc -> Sequential(Linear(d, d), ReLU, fc)
        head = resolve_head(head, mlp)
        self.encoder_q = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)
        self.encoder_k = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def __getstate__(self):  # pickling (torch.save of the module): the undo logs are transient
        state = self.__dict__.copy()
        state.pop("_undo_logs", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._undo_logs = weakref.WeakSet()

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
        queue = self.queue
        logs = [log for log in list(self._undo_logs) if log.queue is queue]
        for log in logs:  # the N columns about to be overwritten, for pending backwards
            log.entries.append((idx, queue.index_select(1, idx)))
        before = queue._version
        queue.index_copy_(1, idx, keys.T.to(queue.dtype))
        _bump_versions(self._undo_logs, queue, queue._version - before)
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
            l_neg = None
            if q.requires_grad:  # the enqueue after the forward overwrites negatives backward needs
                l_neg = _NegativeLogits.apply(q, self.queue, _UndoLog(self.queue, self._undo_logs))
            return info_nce_logits(q, k, self.queue, self.T, l_neg=l_neg)

    def forward(self, im_q, im_k):
        self._check_inputs(im_q, im_k)
        q = self._query(im_q)
        k = self._keys(im_k)
        logits, labels = self._logits(q, k)
        self._dequeue_and_enqueue(k)
        return logits, labels
