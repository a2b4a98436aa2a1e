"""The official MoCo algorithm, faithfully re-implemented for one process: the reference that
experiments.benchmark times and the tests compare moco.modeling.moco.MoCo against.

:class:`OfficialMoCo` is facebookresearch/moco's ``moco/builder.py`` ``MoCo`` and
:func:`official_train_step` the step of its ``main_moco.py`` ``train()``: fp32, per-parameter
momentum loop on ``.data``, queue cloned every step, slice enqueue with a host-read pointer.
"""

import torch
from torch import nn

from moco.modeling.shuffle_bn import convert_split_batchnorm


class OfficialMoCo(nn.Module):
    """facebookresearch/moco ``MoCo`` as published, for one process.

    Differences forced by one process: ``concat_all_gather`` is the identity and the batch
    shuffle is the official CIFAR demo's single-GPU one (``randperm`` on the batch) with its
    SplitBatchNorm (``split_bn_groups`` > 1; 1 = plain BN, no shuffle).
    """

    def __init__(
        self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, split_bn_groups=8
    ):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.split = split_bn_groups > 1
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(
                nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc
            )
            self.encoder_k.fc = nn.Sequential(
                nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc
            )
        if self.split:
            convert_split_batchnorm(self.encoder_q, split_bn_groups)
            convert_split_batchnorm(self.encoder_k, split_bn_groups)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = nn.functional.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K
        self.queue_ptr[0] = ptr

    @torch.no_grad()
    def _batch_shuffle_single_gpu(self, x):
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        idx_unshuffle = torch.argsort(idx_shuffle)
        return x[idx_shuffle], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_single_gpu(self, x, idx_unshuffle):
        return x[idx_unshuffle]

    def forward(self, im_q, im_k):
        q = self.encoder_q(im_q)
        q = nn.functional.normalize(q, dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            if self.split:
                im_k, idx_unshuffle = self._batch_shuffle_single_gpu(im_k)
            k = self.encoder_k(im_k)
            k = nn.functional.normalize(k, dim=1)
            if self.split:
                k = self._batch_unshuffle_single_gpu(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def official_train_step(model, optimizer, criterion, im_q, im_k):
    """main_moco.py ``train()``'s step (accuracy bookkeeping left out, as in every row)."""
    output, target = model(im_q=im_q, im_k=im_k)
    loss = criterion(output, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
