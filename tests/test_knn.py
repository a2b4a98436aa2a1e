"""InstDisc weighted kNN against a hand computation."""

import math
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from moco.evaluation.knn import knn_correct, knn_evaluate, knn_scores


def _unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_knn_scores_equal_hand_computation():
    # bank on the unit circle at these angles, with these labels
    angles = [0, 10, 80, 90, 180]
    labels = [0, 1, 1, 2, 0]
    bank = torch.tensor([_unit(a) for a in angles], dtype=torch.float64)
    bank_labels = torch.tensor(labels)
    query = torch.tensor([_unit(5)], dtype=torch.float64)
    k, t = 3, 0.1
    # by hand: similarities cos(5-a); top-3 neighbours are 0, 10 and 80 degrees
    sims = {a: math.cos(math.radians(5 - a)) for a in angles}
    top = sorted(angles, key=lambda a: -sims[a])[:k]
    assert top == [0, 10, 80]
    expected = [0.0, 0.0, 0.0]
    for a in top:
        expected[labels[angles.index(a)]] += math.exp(sims[a] / t)
    scores = knn_scores(query, bank, bank_labels, num_classes=3, k=k, t=t)
    assert scores.shape == (1, 3)
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-12)
    # class 1 (10 and 80 degrees) outvotes class 0 (0 degrees) only through the weights
    assert expected[1] > expected[0]
    assert int(scores.argmax()) == 1

    # k larger than the bank uses the whole bank
    all_scores = knn_scores(query, bank, bank_labels, num_classes=3, k=200, t=t)
    full = [0.0, 0.0, 0.0]
    for a, y in zip(angles, labels):
        full[y] += math.exp(sims[a] / t)
    assert all_scores[0].tolist() == pytest.approx(full, rel=1e-12)


def test_knn_correct_counts_top1_and_top5():
    bank = torch.eye(6)
    bank_labels = torch.arange(6)
    # query 1 is nearest to class 1 but labeled 5, its second-nearest class
    queries = torch.nn.functional.normalize(
        torch.eye(6)[[0, 1, 2]]
        + 0.5 * torch.eye(6)[[0, 5, 2]] * torch.tensor([[0.0], [1.0], [0.0]]),
        dim=1,
    )
    labels = torch.tensor([0, 5, 2])
    c1, c5 = knn_correct(queries, labels, bank, bank_labels, num_classes=6, k=6, t=0.1, chunk=2)
    assert (c1, c5) == (2, 3)


def test_knn_evaluate_uses_encoder_features_and_restores_mode():
    # 2-D points in two clusters; the "encoder" is a fixed linear map (features get normalised)
    torch.manual_seed(0)
    x_train = torch.cat(
        [
            torch.randn(20, 2) * 0.1 + torch.tensor([1.0, 0.0]),
            torch.randn(20, 2) * 0.1 + torch.tensor([0.0, 1.0]),
        ]
    )
    y_train = torch.tensor([0] * 20 + [1] * 20)
    x_val = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 0.9]])
    y_val = torch.tensor([0, 1, 1])
    enc = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        enc.weight.copy_(torch.eye(2))
    enc.train()
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=7)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=2)
    res = knn_evaluate(enc, train, val, num_classes=2, device=torch.device("cpu"), k=5, t=0.1)
    assert enc.training
    # by hand: normalised val points; the third (angle ~42 deg) is closer to class 0's direction
    bank = torch.nn.functional.normalize(x_train, dim=1)
    expected_correct = 0
    for xv, yv in zip(torch.nn.functional.normalize(x_val, dim=1), y_val):
        sims = bank @ xv
        idx = sims.topk(5).indices
        votes = [
            sum(math.exp(float(sims[i]) / 0.1) for i in idx if int(y_train[i]) == c) for c in (0, 1)
        ]
        expected_correct += int(max(range(2), key=lambda c: votes[c]) == int(yv))
    assert res["top1"] == pytest.approx(100.0 * expected_correct / 3)
    assert res["top5"] == pytest.approx(100.0)


class _WithHead(torch.nn.Module):
    """A 'backbone' (identity on 2-D points) and an ``fc`` head that maps everything onto one ray."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))

    def forward(self, x):
        return self.fc(x)


def test_knn_scores_the_backbone_features_and_reports_the_head_second():
    torch.manual_seed(0)
    x_train = torch.cat(
        [
            torch.randn(20, 2) * 0.1 + torch.tensor([1.0, 0.0]),
            torch.randn(20, 2) * 0.1 + torch.tensor([0.0, 1.0]),
        ]
    ).abs()
    y_train = torch.tensor([0] * 20 + [1] * 20)
    x_val = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.5, 0.2], [0.2, 1.0]])
    y_val = torch.tensor([0, 1, 0, 1])
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=7)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=3)
    enc = _WithHead()
    res = knn_evaluate(enc, train, val, num_classes=2, device=torch.device("cpu"), k=5, t=0.1)
    assert res["top1"] == pytest.approx(100.0)  # the pooled input of fc separates the clusters
    # the head sends every point to (1, 1)/sqrt(2): all similarities tie, top-5 votes decide nothing
    assert res["head_top1"] == pytest.approx(50.0)
    assert set(res) == {"top1", "top5", "head_top1", "head_top5"}
    assert not enc.fc._forward_hooks  # the capture hook is removed afterwards


def test_knn_bank_size_keeps_evenly_spaced_images_of_every_class(synthetic_root):
    from moco.data.datasets import build_labeled_datasets, knn_bank

    train, _ = build_labeled_datasets(os.path.join(synthetic_root, "imagefolder"), 32, "KNN.DATA")
    per_class = len(train) // len(train.classes)
    bank = knn_bank(train, len(train) // per_class * 2)  # two images of each class
    labels = [train.targets[i] for i in bank.indices]
    assert sorted(labels) == sorted(list(range(len(train.classes))) * 2)
    assert knn_bank(train, 0) is train and knn_bank(train, len(train) + 5) is train


def test_a_negative_bank_size_is_one_line():
    from moco.config import get_cfg
    from moco.evaluation.knn import validate_knn

    cfg = get_cfg()
    cfg.KNN.DATA, cfg.KNN.BANK_SIZE = "somewhere", -1
    with pytest.raises(ValueError, match="KNN.BANK_SIZE must be >= 0"):
        validate_knn(cfg)
