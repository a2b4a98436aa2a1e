"""InstDisc weighted kNN classifier, the MoCo CIFAR demo's training monitor.

Features are L2-normalised. The score is read from the backbone's pooled features (the input of
the encoder's ``fc``, i.e. what detection transfer and linear classification use), as the
literature advises for monitoring (the head's output can fall while the backbone improves); the
head's output (``encoder_q`` with its projection head, the CIFAR demo's choice) is a second line.
A validation image's k nearest training features (cosine similarity) vote for their labels
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
    if cfg.KNN.BANK_SIZE < 0:
        raise ValueError(
            f"KNN.BANK_SIZE must be >= 0 (0 = every training image), got {cfg.KNN.BANK_SIZE}"
        )


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


class _PooledFeatures:
    """Captures the input of ``encoder.fc`` (the pooled backbone features) during a forward; for
    an encoder of several views (``encoder.views``, CMC) the views' pooled features concatenated."""

    def __init__(self, encoder):
        self._parts, self._handles = {}, []
        for i, view in enumerate(getattr(encoder, "views", [encoder])):
            fc = getattr(view, "fc", None)
            if fc is not None:
                self._handles.append(fc.register_forward_hook(self._store(i)))

    def _store(self, i):
        def hook(module, inputs, output):
            self._parts[i] = inputs[0]

        return hook

    @property
    def value(self):
        if not self._parts:
            return None
        return torch.cat([torch.flatten(self._parts[i], 1) for i in sorted(self._parts)], dim=1)

    def remove(self):
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def extract_features(encoder, loader, device, channels_last=False, amp=False):
    """``({"backbone": ..., "head": ...}, labels)`` of this process's part of ``loader``.

    Both are L2-normalised; "backbone" is the pooled input of ``encoder.fc`` (the head's output
    again when the encoder has no ``fc``).
    """
    feats, labels = {"backbone": [], "head": []}, []
    pooled = _PooledFeatures(encoder)
    try:
        for images, target in loader:
            images = to_device(images, device, channels_last)
            with autocast_context(device, amp):
                out = encoder(images)
            feats["head"].append(F.normalize(out.float(), dim=1))
            base = pooled.value if pooled.value is not None else out
            feats["backbone"].append(F.normalize(torch.flatten(base, 1).float(), dim=1))
            labels.append(target.to(device))
    finally:
        pooled.remove()
    if not labels:
        empty = torch.zeros(0, 0, device=device)
        return {k: empty for k in feats}, torch.zeros(0, dtype=torch.long, device=device)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def gather_features(features, labels):
    """Concatenate every process's (features, labels) in rank order (InferenceSampler order)."""
    if comm.get_world_size() == 1:
        return features, labels
    parts = comm.all_gather((features.cpu(), labels.cpu()))
    parts = [p for p in parts if p[0].numel() > 0]
    return (
        torch.cat([p[0] for p in parts]).to(features.device),
        torch.cat([p[1] for p in parts]).to(labels.device),
    )


@torch.no_grad()
def knn_evaluate(
    encoder,
    train_loader,
    val_loader,
    num_classes,
    device,
    k=200,
    t=0.1,
    channels_last=False,
    amp=False,
):
    """kNN top-1/top-5 accuracy (percent) of ``encoder`` on the val set, bank = the train set:
    ``top1`` / ``top5`` on the backbone's pooled features, ``head_top1`` / ``head_top5`` on the
    head's output.

    The encoder is put in eval mode (BatchNorm running statistics) and restored afterwards.
    Every process must call this (features are gathered).
    """
    was_training = encoder.training
    encoder.eval()
    try:
        bank, bank_labels = extract_features(encoder, train_loader, device, channels_last, amp)
        feats, labels = extract_features(encoder, val_loader, device, channels_last, amp)
    finally:
        encoder.train(was_training)
    counts = []
    for name in ("backbone", "head"):
        b, bl = gather_features(bank[name], bank_labels)
        counts.extend(knn_correct(feats[name], labels, b, bl, num_classes, k, t))
    counts.append(int(labels.shape[0]))
    if comm.get_world_size() > 1:
        counts = [sum(c) for c in zip(*comm.all_gather(counts))]
    n = counts[-1]
    if n == 0:
        raise ValueError("kNN: the validation set is empty")
    pct = [100.0 * c / n for c in counts[:4]]
    return {"top1": pct[0], "top5": pct[1], "head_top1": pct[2], "head_top5": pct[3]}
