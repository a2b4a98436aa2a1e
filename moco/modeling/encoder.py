"""The encoder every mechanism builds on: a ResNet (``MODEL.ARCH``) with its projection head
(``MODEL.HEAD``) and the BatchNorm of its Shuffle BN mode, and the forward that keeps Split BN's
sub-batches right on channels_last input.
"""

import torch
from torch import nn

from moco.modeling.heads import attach_head
from moco.modeling.shuffle_bn import blocked_order, blocked_split_batchnorm, convert_split_batchnorm


def _is_channels_last(x):
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return channels_last and not x.is_contiguous()


def build_encoder(base_encoder, dim, head, shuffle_bn, split_bn_groups):
    """``base_encoder(num_classes=dim)`` with projection ``head`` (moco.modeling.heads) and the BatchNorm
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
