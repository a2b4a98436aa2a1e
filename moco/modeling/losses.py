"""Contrastive losses as ``(logits, labels)`` pairs: the loss is ``F.cross_entropy(logits, labels)``.

Every mechanism hands the engine logits and the index of the positive, so one training step (and
its top-1/top-5 "instance accuracy") serves MoCo, the end-to-end and memory-bank baselines and
SimCLR's NT-Xent alike.

- :func:`info_nce_logits`: the MoCo paper's InfoNCE, positive ``q·k`` in column 0, then ``q`` against
  a shared set of negatives (a C x K matrix: MoCo's queue, memory-bank samples).
- :func:`batch_info_nce_logits`: InfoNCE with the keys of the *global* batch as the dictionary (the
  end-to-end mechanism): query i's positive is key i, the other B - 1 keys are its negatives.
- :func:`nt_xent_logits`: SimCLR's NT-Xent. Both views are anchors (symmetric); each of the 2B
  anchors has its other view as positive and the 2B - 2 remaining samples as negatives.

Under torch.distributed the batch-wise losses gather the keys of all processes with
``torch.distributed.nn.functional.all_gather``, which keeps the gradient: each key's gradient
comes back to the process that computed it (its backward sums every rank's contribution), and
DDP's averaging then gives the gradient of the mean loss over ranks.
"""

import torch
import torch.nn.functional as F

from moco.utils.dist import all_gather_with_grad, get_rank, get_world_size

LOSSES = ("info_nce", "nt_xent")


def info_nce_logits(q, k, negatives, T, l_neg=None):
    """``(logits, labels)``: ``[q·k, q·negatives] / T`` (N x (1+K)), labels all 0.

    ``q``, ``k``: N x C, L2-normalised; ``negatives``: C x K (the columns are keys). ``l_neg``:
    ``q·negatives`` when the caller computes it itself (MoCo's copy-free queue product).
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    if l_neg is None:
        l_neg = q.mm(negatives)
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    return logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)


def batch_info_nce_logits(q, k, T, k_all=None):
    """End-to-end InfoNCE: ``(q @ k_all.T / T, labels)`` with k_all the keys of the global batch.

    Query i of this process (global index ``rank * N + i``) has its own key as positive and the
    other ``global batch - 1`` keys as negatives; gradients flow into q and every key.
    ``k_all``: the already gathered keys (B x C, global order), else gathered here.
    """
    rank = get_rank()
    k_all = all_gather_with_grad(k) if k_all is None else k_all
    logits = q.mm(k_all.t()) / T
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return logits, labels


def nt_xent_logits(z1, z2, T, z2_all=None):
    """SimCLR's NT-Xent as ``(logits, labels)`` over this process's 2N anchors.

    ``z1``, ``z2``: N x C, the two views, L2-normalised. With the global batch of B pairs, anchor
    ``a`` (one of 2B) is scored against the 2B - 1 other samples: its other view (the label) and
    2B - 2 negatives; the self-similarity column is removed, not masked. ``z2_all``: the
    already gathered second views (B x C, global order), else gathered here.
    """
    world, rank = get_world_size(), get_rank()
    n = z1.shape[0]
    b = n * world
    z2_all = all_gather_with_grad(z2) if z2_all is None else z2_all
    z_all = torch.cat([all_gather_with_grad(z1), z2_all], dim=0)  # 2B x C
    anchors = torch.cat([z1, z2], dim=0)  # 2N x C
    mine = torch.arange(n, device=z1.device) + rank * n
    anchor_idx = torch.cat([mine, mine + b])  # global row of each anchor in z_all
    positive_idx = torch.cat([mine + b, mine])
    sim = anchors.mm(z_all.t()) / T  # 2N x 2B
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[torch.arange(2 * n, device=z1.device), anchor_idx] = False
    logits = sim[keep].view(2 * n, 2 * b - 1)
    labels = positive_idx - (positive_idx > anchor_idx).long()  # columns after self shift left
    return logits, labels


def contrastive_loss(logits, labels):
    """Mean cross-entropy of the positive: InfoNCE / NT-Xent value of the logits above."""
    return F.cross_entropy(logits.float(), labels)


def info_nce(q, k, negatives, T):
    """InfoNCE loss value (see :func:`info_nce_logits`)."""
    return contrastive_loss(*info_nce_logits(q, k, negatives, T))


def nt_xent(z1, z2, T):
    """NT-Xent loss value, symmetric in the two views (see :func:`nt_xent_logits`)."""
    return contrastive_loss(*nt_xent_logits(z1, z2, T))
