"""The MoCo paper's three contrastive mechanisms (Sec. 4.1, Fig. 2 and 3), one config switch apart.

``MODEL.MECHANISM``:

- ``moco``: :class:`moco.builder.MoCo`, a momentum key encoder and a queue of K keys.
- ``end_to_end`` (:class:`EndToEnd`): one encoder for queries and keys, both with gradients; the
  dictionary is the keys of the current global batch (K = batch: 1 positive + B - 1 negatives).
  With ``MODEL.LOSS nt_xent`` it is SimCLR's symmetric loss over the 2B views instead.
- ``memory_bank`` (:class:`MemoryBankModel`): InstDisc's bank of one feature per dataset sample
  (:mod:`moco.memory_bank`); the positive is the sample's bank entry from its last visit, the K
  negatives are drawn uniformly from the bank, and the entry is then updated with momentum 0.5.
- ``cmc`` (:class:`moco.cmc.CMC`): the L and ab views of a crop, one half-width encoder each,
  contrasted both ways with a memory bank or a MoCo queue per view (``MODEL.CMC_DICTIONARY``).
- ``cpc`` (:class:`moco.cpc.CPC`): CPC v2, a grid of patches of one crop, a masked-convolution
  context network predicting the rows below, InfoNCE against the batch's other patches.

All three use the same encoder constructor and head (:func:`moco.builder.build_encoder`), the
same augmentation, InfoNCE with temperature T and the same engine; each returns ``(logits, labels)``
(:mod:`moco.losses`). The query encoder is ``encoder_q`` in all three, so checkpoints convert and
evaluate (``module.encoder_q.*``) the same way.

BatchNorm: the paper uses Shuffle BN in MoCo *and* its end-to-end counterpart; for the memory bank
it is irrelevant (the positive key comes from an earlier batch). So ``end_to_end`` shuffles its key
batch exactly as MoCo does (``split``: within the batch over SplitBatchNorm sub-batches; ``ddp``:
across processes, keys gathered back with gradient), and ``memory_bank`` keeps MoCo's query-side
BN (per sub-batch for ``split``, per process for ``ddp``, SyncBN for ``sync``) with no shuffle.
The memory bank uses one crop per sample (InstDisc), the loader's first; the second is unused.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.builder import MoCo, build_encoder, encode
from moco.cpc import CPC
from moco.dist import all_gather_with_grad, get_world_size
from moco.heads import HEADS, resolve_head
from moco.losses import LOSSES, batch_info_nce_logits, info_nce_logits, nt_xent_logits
from moco.memory_bank import MemoryBank
from moco.resnet import half_width, resnet_encoder
from moco.shuffle_bn import batch_shuffle_ddp, batch_shuffle_single, resolve_shuffle_bn

MECHANISMS = ("moco", "end_to_end", "memory_bank", "cmc", "cpc")
CMC_DICTIONARIES = ("memory_bank", "moco")  # MODEL.CMC_DICTIONARY


class EndToEnd(nn.Module):
    """One encoder, gradients through queries and keys; negatives = the other keys of the global batch."""

    dictionary_buffers = ()  # nothing but the (DDP-synchronised) weights to keep equal on replicas
    needs_index = False

    def __init__(
        self,
        base_encoder,
        dim=128,
        T=0.07,
        head="linear",
        shuffle_bn="split",
        split_bn_groups=8,
        loss="info_nce",
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(
                f"unknown loss {loss!r} (MODEL.LOSS); choose one of: {', '.join(LOSSES)}"
            )
        self.T, self.loss = float(T), loss
        self.shuffle_bn = resolve_shuffle_bn(shuffle_bn)
        self.split_bn_groups = int(split_bn_groups)
        self.encoder_q = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)

    def _keys(self, im_k):
        """(this process's keys, all keys of the global batch or None), both with gradient."""
        if self.shuffle_bn == "split":
            im_k, idx_unshuffle = batch_shuffle_single(im_k)
            k = F.normalize(
                encode(self.encoder_q, im_k, "split", self.split_bn_groups).float(), dim=1
            )
            return k[idx_unshuffle], None
        if self.shuffle_bn == "ddp":
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            k_all = all_gather_with_grad(F.normalize(self.encoder_q(im_k).float(), dim=1))
            k_all = k_all[idx_unshuffle]  # global sample order
            n, rank = im_k.shape[0], dist.get_rank()
            return k_all[rank * n : (rank + 1) * n], k_all
        return F.normalize(self.encoder_q(im_k).float(), dim=1), None

    def forward(self, im_q, im_k):
        if im_q.shape[0] != im_k.shape[0]:
            raise ValueError(
                f"end_to_end: im_q has {im_q.shape[0]} samples but im_k has {im_k.shape[0]}"
            )
        q = F.normalize(
            encode(self.encoder_q, im_q, self.shuffle_bn, self.split_bn_groups).float(), dim=1
        )
        k, k_all = self._keys(im_k)
        with torch.autocast(q.device.type, enabled=False):  # logits in fp32 even under AMP
            if self.loss == "nt_xent":
                return nt_xent_logits(q, k, self.T, z2_all=k_all)
            return batch_info_nce_logits(q, k, self.T, k_all=k_all)


class MemoryBankModel(nn.Module):
    """InstDisc's memory bank mechanism: ``forward(im_q, im_k, index)``; ``im_k`` is not used."""

    dictionary_buffers = ("memory_bank.bank",)
    needs_index = True

    def __init__(
        self,
        base_encoder,
        size,
        dim=128,
        K=4096,
        T=0.07,
        head="linear",
        shuffle_bn="split",
        split_bn_groups=8,
        bank_momentum=0.5,
    ):
        super().__init__()
        if int(K) < 1:
            raise ValueError(f"memory_bank: K (negatives per step, MODEL.K) must be >= 1, got {K}")
        self.K, self.T = int(K), float(T)
        self.shuffle_bn = resolve_shuffle_bn(shuffle_bn)
        self.split_bn_groups = int(split_bn_groups)
        self.encoder_q = build_encoder(base_encoder, dim, head, self.shuffle_bn, split_bn_groups)
        self.memory_bank = MemoryBank(size, dim, bank_momentum)
        # Every process applies the same updates (MemoryBank.update gathers them), so DDP need not
        # broadcast a dataset-sized buffer each step; it is broadcast once, at the first forward.
        self._ddp_params_and_buffers_to_ignore = ["memory_bank.bank"]
        self._bank_synced = False

    def _sync_bank(self):
        if not self._bank_synced:
            if get_world_size() > 1:  # ranks seed differently: start from rank 0's bank
                dist.broadcast(self.memory_bank.bank, src=0)
            self._bank_synced = True

    def _query(self, im_q):
        return F.normalize(
            encode(self.encoder_q, im_q, self.shuffle_bn, self.split_bn_groups).float(), dim=1
        )

    def _logits(self, q, index):
        """InfoNCE ``(logits, labels)`` of ``q``: positives the bank's entries ``index`` (before
        this step's update), negatives K entries drawn from the bank."""
        with torch.no_grad():
            positive = self.memory_bank.bank.index_select(0, index)
            negatives, _ = self.memory_bank.sample(self.K)
        with torch.autocast(q.device.type, enabled=False):
            return info_nce_logits(q, positive, negatives, self.T)

    def forward(self, im_q, im_k, index):
        if index.shape[0] != im_q.shape[0]:
            raise ValueError(
                f"memory_bank: {im_q.shape[0]} images but {index.shape[0]} sample indices"
            )
        self._sync_bank()
        q = self._query(im_q)
        logits, labels = self._logits(q, index)
        self.memory_bank.update(index, q.detach())
        return logits, labels


def head_name(cfg):
    """MODEL.HEAD, with the official MODEL.MLP (--mlp) selecting "mlp" over the default "linear"."""
    head = resolve_head(cfg.MODEL.HEAD)
    if cfg.MODEL.MLP:
        if head not in ("linear", "mlp"):
            raise ValueError(
                f"MODEL.MLP (--mlp) selects the 'mlp' head but MODEL.HEAD is {head!r}; "
                "give one of them"
            )
        return "mlp"
    return head


def validate_mechanism(cfg, world_size):
    """One-line ValueError for a mechanism / loss / head combination that cannot train, or a MoCo
    queue that does not take whole batches."""
    m = cfg.MODEL
    if m.MECHANISM not in MECHANISMS:
        raise ValueError(
            f"unknown MODEL.MECHANISM {m.MECHANISM!r}; choose one of: {', '.join(MECHANISMS)}"
        )
    if m.LOSS not in LOSSES:
        raise ValueError(f"unknown MODEL.LOSS {m.LOSS!r}; choose one of: {', '.join(LOSSES)}")
    if m.HEAD not in HEADS:
        raise ValueError(f"unknown MODEL.HEAD {m.HEAD!r}; choose one of: {', '.join(HEADS)}")
    head_name(cfg)
    if m.LOSS == "nt_xent" and m.MECHANISM != "end_to_end":
        raise ValueError(
            f"MODEL.LOSS nt_xent (SimCLR) contrasts the views of the batch and needs "
            f"MODEL.MECHANISM end_to_end, not {m.MECHANISM}"
        )
    if m.MECHANISM == "cmc":
        if m.CMC_DICTIONARY not in CMC_DICTIONARIES:
            raise ValueError(
                f"unknown MODEL.CMC_DICTIONARY {m.CMC_DICTIONARY!r}; choose one of: "
                f"{', '.join(CMC_DICTIONARIES)}"
            )
        half_width(m.ARCH)
    if m.MECHANISM == "cpc":
        CPC.check_geometry(cfg.INPUT.CROP_SIZE, m.CPC_PATCH_SIZE, m.CPC_STEPS)
    if uses_memory_bank(cfg):
        if m.K < 1:
            raise ValueError(
                f"MODEL.K (negatives drawn from the memory bank) must be >= 1, got {m.K}"
            )
        if not 0.0 <= m.MEMORY_BANK_MOMENTUM < 1.0:
            raise ValueError(
                f"MODEL.MEMORY_BANK_MOMENTUM must be in [0, 1), got {m.MEMORY_BANK_MOMENTUM}"
            )
    batch = cfg.SOLVER.IMS_PER_BATCH
    queue = m.MECHANISM == "moco" or m.MECHANISM == "cmc" and m.CMC_DICTIONARY == "moco"
    if queue and m.K < 1:  # K % batch alone lets 0 and negatives through
        raise ValueError(f"MODEL.K (--moco-k, the queue size) must be >= 1, got {m.K}")
    if queue and m.K % batch:
        raise ValueError(
            f"MODEL.K (--moco-k) = {m.K} is not a multiple of the global batch "
            f"SOLVER.IMS_PER_BATCH = {batch}: the queue takes whole batches (official assert "
            f"K % batch_size == 0); use e.g. MODEL.K {max(1, m.K // batch) * batch}"
        )


def color_augmentation(cfg):
    """Whether the loader's crops get colour jitter and grayscale: not for CMC, whose ab view is
    what its L view predicts, nor for CPC, whose colour dropping is per patch (moco.cpc)."""
    return cfg.MODEL.MECHANISM not in ("cmc", "cpc")


def uses_memory_bank(cfg):
    """Whether the mechanism keeps a memory bank, so its loader must name each sample's index."""
    m = cfg.MODEL
    return (
        m.MECHANISM == "memory_bank" or m.MECHANISM == "cmc" and m.CMC_DICTIONARY == "memory_bank"
    )


def build_contrastive_model(cfg, world_size, dataset_size=None):
    """The ``MODEL.MECHANISM`` model of ``cfg`` (``dataset_size``: memory bank entries)."""
    from moco.cmc import CMC  # moco.cmc builds on the models of this module

    m = cfg.MODEL
    common = dict(
        dim=m.DIM,
        T=m.T,
        head=head_name(cfg),
        shuffle_bn=resolve_shuffle_bn(m.SHUFFLE_BN, world_size),
        split_bn_groups=m.SPLIT_BN_GROUPS,
    )
    base = resnet_encoder(m.ARCH)
    if m.MECHANISM == "moco":
        return MoCo(base, K=m.K, m=m.M, **common)
    if m.MECHANISM == "end_to_end":
        return EndToEnd(base, loss=m.LOSS, **common)
    if m.MECHANISM == "memory_bank":
        if dataset_size is None:
            raise ValueError(
                "memory_bank: the dataset size (bank entries) is needed to build the model"
            )
        return MemoryBankModel(
            base, dataset_size, K=m.K, bank_momentum=m.MEMORY_BANK_MOMENTUM, **common
        )
    if m.MECHANISM == "cmc":
        return CMC(
            m.ARCH,
            m.CMC_DICTIONARY,
            dataset_size,
            K=m.K,
            m=m.M,
            bank_momentum=m.MEMORY_BANK_MOMENTUM,
            **common,
        )
    if m.MECHANISM == "cpc":
        return CPC(
            base, cfg.INPUT.CROP_SIZE, m.CPC_PATCH_SIZE, m.CPC_STEPS, dim=m.DIM, head=common["head"]
        )
    raise ValueError(
        f"unknown MODEL.MECHANISM {m.MECHANISM!r}; choose one of: {', '.join(MECHANISMS)}"
    )
