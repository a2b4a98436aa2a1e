"""Shuffle BN: keep the key encoder's BatchNorm from leaking which sample is the positive.

Without it, a query and its positive key are normalised with statistics of the same batch and the
model "cheats" through them (MoCo paper, Sec. 3.3). Modes (``MODEL.SHUFFLE_BN``):

- ``ddp``: the paper's Shuffle BN. Keys are gathered from all processes, permuted by a random
  permutation drawn on rank 0 and broadcast, each process encodes its slice, and the inverse
  permutation restores the order (official ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``).
- ``split``: one-process emulation of G devices (official MoCo CIFAR demo). Every BatchNorm2d
  becomes a :class:`SplitBatchNorm` whose training statistics are per sub-batch, and the keys are
  shuffled within the batch so a sample's key lands in another sub-batch than its query
  (probability 1 - 1/G per sample).
- ``sync``: ``torch.nn.SyncBatchNorm`` in both encoders, no shuffle. torch's SyncBatchNorm rejects
  CPU tensors whenever a process group is initialised (``nn/modules/batchnorm.py``: "SyncBatchNorm
  expected input tensor to be on GPU ..."), so CPU multi-process (gloo) runs cannot use it; in one
  process without a process group it is plain BN.
- ``off``: plain BatchNorm, no shuffle.
- ``auto`` (resolved by :func:`resolve_shuffle_bn`): ``ddp`` when world size > 1, else ``split``.

Split BN and channels_last: the strided sub-batches ``input[j::G]`` cannot be viewed as channels of
a channels_last tensor, so the reshape trick would copy and convert memory formats at every BN
layer (measured: it cancels the channels_last speed-up). :func:`blocked_split_batchnorm` switches
every SplitBatchNorm of a module to contiguous sub-batches ``input[j*N/G:(j+1)*N/G]`` (one
native BN call per block, no layout change); feeding the encoder ``x[blocked_order(N, G)]`` puts
exactly the strided sub-batch j into block j, so the statistics, outputs and gradients are the
strided ones (``MoCo`` does this for channels_last input).
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.utils.dist import concat_all_gather, get_world_size

SHUFFLE_BN_MODES = ("ddp", "split", "sync", "off")


def resolve_shuffle_bn(mode, world_size=None):
    """One of SHUFFLE_BN_MODES; ``auto`` is ``ddp`` for world size > 1, else ``split``.

    ``world_size`` defaults to the current process group's (1 without torch.distributed).
    """
    if mode == "auto":
        world_size = get_world_size() if world_size is None else world_size
        return "ddp" if world_size > 1 else "split"
    if mode not in SHUFFLE_BN_MODES:
        raise ValueError(
            f"unknown shuffle_bn mode {mode!r} (MODEL.SHUFFLE_BN); "
            f"choose one of: auto, {', '.join(SHUFFLE_BN_MODES)}"
        )
    return mode


def validate_shuffle_bn(cfg, world_size):
    """MODEL.SHUFFLE_BN and SPLIT_BN_GROUPS for ``world_size`` processes: one-line ValueError."""
    mode = resolve_shuffle_bn(cfg.MODEL.SHUFFLE_BN, world_size)  # rejects unknown names
    batch = cfg.SOLVER.IMS_PER_BATCH // world_size
    groups = cfg.MODEL.SPLIT_BN_GROUPS
    if (
        mode == "sync"
        and world_size > 1
        and (cfg.MODEL.DEVICE == "cpu" or not torch.cuda.is_available())
    ):
        raise ValueError(
            "MODEL.SHUFFLE_BN=sync needs CUDA with several processes (torch's "
            "SyncBatchNorm rejects CPU tensors); use 'ddp' or 'auto'"
        )
    if mode == "ddp" and world_size < 2:
        raise ValueError(
            "MODEL.SHUFFLE_BN=ddp shuffles across processes and needs >= 2; use "
            "'auto' or 'split' for one process"
        )
    if mode == "split" and batch % groups:
        raise ValueError(
            f"split Shuffle BN: the per-process batch {batch} is not divisible by "
            f"MODEL.SPLIT_BN_GROUPS = {groups}"
        )
    if mode == "split" and batch < 2 * groups:
        # one sample per sub-batch: BN over a 1x1 map (small crops) has a single value per channel
        raise ValueError(
            f"split Shuffle BN: the per-process batch {batch} gives fewer than 2 "
            f"samples per sub-batch with MODEL.SPLIT_BN_GROUPS = {groups}; "
            "lower MODEL.SPLIT_BN_GROUPS or raise SOLVER.IMS_PER_BATCH"
        )


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over ``num_splits`` sub-batches.

    Following the official MoCo CIFAR demo, the batch (N, C, H, W) is reshaped to
    (N/G, C*G, H, W), so sub-batch j is the strided slice ``input[j::G]``. Running statistics are
    updated per sub-batch and folded back as their mean over sub-batches. In eval mode this is
    plain BatchNorm2d with the shared running statistics. Subclassing BatchNorm2d keeps its
    state_dict keys, so official checkpoints load unchanged.
    """

    def __init__(self, num_features, num_splits, **kwargs):
        super().__init__(num_features, **kwargs)
        if int(num_splits) < 1:
            raise ValueError(f"SplitBatchNorm: num_splits must be >= 1, got {num_splits}")
        self.num_splits = int(num_splits)
        # True inside blocked_split_batchnorm(): sub-batch j is the j-th contiguous block
        self.blocked = False

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training and self.running_mean is not None:
            return super().forward(input)
        N, C, H, W = input.shape
        G = self.num_splits
        if N % G != 0:
            raise ValueError(
                f"SplitBatchNorm: batch size {N} is not divisible by num_splits={G} "
                "(MODEL.SPLIT_BN_GROUPS); use a per-process batch that is a multiple of it"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = self.training and self.running_mean is not None
        mean_split = self.running_mean.repeat(G) if tracked else None
        var_split = self.running_var.repeat(G) if tracked else None
        if self.blocked:
            # one native BN per contiguous block keeps channels_last; split/cat cost one copy
            means = mean_split.view(G, C) if tracked else [None] * G
            vars_ = var_split.view(G, C) if tracked else [None] * G
            out = torch.cat(
                [
                    F.batch_norm(
                        block, means[j], vars_[j], self.weight, self.bias, True, factor, self.eps
                    )
                    for j, block in enumerate(input.split(N // G))
                ]
            )
        else:
            weight = self.weight.repeat(G) if self.weight is not None else None
            bias = self.bias.repeat(G) if self.bias is not None else None
            out = F.batch_norm(
                input.reshape(N // G, C * G, H, W),
                mean_split,
                var_split,
                weight,
                bias,
                True,
                factor,
                self.eps,
            ).reshape(N, C, H, W)
        if tracked:
            with torch.no_grad():
                self.running_mean.copy_(mean_split.view(G, C).mean(dim=0))
                self.running_var.copy_(var_split.view(G, C).mean(dim=0))
        return out

    def extra_repr(self):
        return super().extra_repr() + f", num_splits={self.num_splits}"


def convert_split_batchnorm(module, num_splits):
    """Replace every BatchNorm2d in ``module`` by a SplitBatchNorm with the same parameters/buffers."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        new = SplitBatchNorm(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None else None,
        )
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_split_batchnorm(child, num_splits)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def blocked_order(n, num_splits, device=None):
    """Permutation ``p`` with ``x[p][j*n/G:(j+1)*n/G] == x[j::G]``: strided sub-batches -> blocks."""
    if n % num_splits:
        raise ValueError(
            f"SplitBatchNorm: batch size {n} is not divisible by num_splits={num_splits} "
            "(MODEL.SPLIT_BN_GROUPS); use a per-process batch that is a multiple of it"
        )
    return torch.arange(n, device=device).view(n // num_splits, num_splits).t().reshape(-1)


@contextlib.contextmanager
def blocked_split_batchnorm(module):
    """Within the block, every SplitBatchNorm in ``module`` uses contiguous sub-batches."""
    layers = [m for m in module.modules() if isinstance(m, SplitBatchNorm)]
    previous = [m.blocked for m in layers]
    for m in layers:
        m.blocked = True
    try:
        yield layers
    finally:
        for m, was in zip(layers, previous):
            m.blocked = was


@torch.no_grad()
def batch_shuffle_single(x):
    """Random permutation of the batch in this process; returns (x[perm], inverse permutation)."""
    idx_shuffle = torch.randperm(x.shape[0], device=x.device)
    return x[idx_shuffle], torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle_single(x, idx_unshuffle):
    return x[idx_unshuffle]


def _require_ddp():
    if get_world_size() < 2:
        raise ValueError(
            "shuffle_bn='ddp' needs an initialised torch.distributed process group with world "
            "size > 1; use 'split' (or 'auto') for one process"
        )


@torch.no_grad()
def batch_shuffle_ddp(x):
    """Shuffle the global batch across processes; returns (this rank's slice, inverse permutation)."""
    _require_ddp()
    x_gather = concat_all_gather(x)
    num_procs = x_gather.shape[0] // x.shape[0]
    idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)  # every rank must use rank 0's permutation
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(num_procs, -1)[dist.get_rank()]
    return x_gather[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x, idx_unshuffle):
    """Inverse of :func:`batch_shuffle_ddp`: this rank gets back the outputs of its own samples."""
    _require_ddp()
    x_gather = concat_all_gather(x)
    num_procs = x_gather.shape[0] // x.shape[0]
    idx_this = idx_unshuffle.view(num_procs, -1)[dist.get_rank()]
    return x_gather[idx_this]
