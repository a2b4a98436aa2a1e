"""InstDisc weighted kNN classifier, the MoCo CIFAR demo's training monitor.

Features are the L2-normalised outputs of the query encoder (``encoder_q``, head included, as the
demo). A validation image's k nearest training features (cosine similarity) vote for their labels
with weight ``exp(similarity / T)``; the class with the largest total weight is the prediction
(InstDisc: k=200, T=0.1). Under DDP every process encodes its shard; the training features are
gathered so each process votes for its own validation shard, and the counts are summed.
"""

import torch
import torch.nn.functional as F
from detectron2.utils import comm

from moco.fast import autocast_context, to_device


def validate_knn(cfg):
    """KNN.K and KNN.T of the monitor (when KNN.DATA is set): one-line ValueError."""
    if cfg.KNN.DATA and (cfg.KNN.K < 1 or cfg.KNN.T <= 0):
        raise ValueError(f"KNN.K must be >= 1 and KNN.T > 0, got {cfg.KNN.K} and {cfg.KNN.T}")


def knn_scores(features, bank, bank_labels, num_classes, k=200, t=0.1):
    """Class scores (N x C) of ``features`` (N x D) against ``bank`` (M x D, labels M).

    Both must be L2-normalised. ``k`` is capped at M.
    """
    if features.shape[1] != bank.shape[1]:
        raise ValueError(f"kNN: feature dim {features.shape[1]} != bank dim {bank.shape[1]}")
    k = min(int(k), bank.shape[0])
    sim = features @ bank.T  # N x M cosine similarities
    sim_weight, sim_idx = sim.topk(k, dim=1)
    sim_labels = bank_labels[sim_idx]  # N x k
    weights = (sim_weight / t).exp()
    scores = torch.zeros(features.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, sim_labels, weights)


def knn_correct(features, labels, bank, bank_labels, num_classes, k=200, t=0.1, chunk=1024):
    """(top-1 correct, top-5 correct) counts, querying ``chunk`` features at a time."""
    top1 = top5 = 0
    maxk = min(5, num_classes)
    for start in range(0, features.shape[0], chunk):
        f, y = features[start : start + chunk], labels[start : start + chunk]
        pred = knn_scores(f, bank, bank_labels, num_classes, k, t).topk(maxk, dim=1).indices
        hit = pred == y[:, None]
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
    return top1, top5


@torch.no_grad()
def extract_features(encoder, loader, device, channels_last=False, amp=False):
    """L2-normalised ``encoder`` outputs and labels of this process's part of ``loader``."""
    feats, labels = [], []
    for images, target in loader:
        images = to_device(images, device, channels_last)
        with autocast_context(device, amp):
            out = encoder(images)
        feats.append(F.normalize(out.float(), dim=1))
        labels.append(target.to(device))
    dim = feats[0].shape[1] if feats else 0
    if not feats:
        return torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def gather_features(features, labels):
    """Concatenate every process's (features, labels) in rank order (InferenceSampler order)."""
    if comm.get_world_size() == 1:
        return features, labels
    parts = comm.all_gather((features.cpu(), labels.cpu()))
    parts = [p for p in parts if p[0].numel() > 0]
    return (torch.cat([p[0] for p in parts]).to(features.device),
            torch.cat([p[1] for p in parts]).to(labels.device))  # fmt: skip


@torch.no_grad()
def knn_evaluate(encoder, train_loader, val_loader, num_classes, device, k=200, t=0.1,
                 channels_last=False, amp=False):  # fmt: skip
    """kNN top-1/top-5 accuracy (percent) of ``encoder`` on the val set, bank = the train set.

    The encoder is put in eval mode (BatchNorm running statistics) and restored afterwards.
    Every process must call this (features are gathered).
    """
    was_training = encoder.training
    encoder.eval()
    try:
        bank, bank_labels = extract_features(encoder, train_loader, device, channels_last, amp)
        bank, bank_labels = gather_features(bank, bank_labels)
        feats, labels = extract_features(encoder, val_loader, device, channels_last, amp)
    finally:
        encoder.train(was_training)
    c1, c5 = knn_correct(feats, labels, bank, bank_labels, num_classes, k, t)
    counts = [(c1, c5, int(labels.shape[0]))]
    if comm.get_world_size() > 1:
        counts = comm.all_gather(counts[0])
    c1, c5, n = (sum(c[i] for c in counts) for i in range(3))
    if n == 0:
        raise ValueError("kNN: the validation set is empty")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}
