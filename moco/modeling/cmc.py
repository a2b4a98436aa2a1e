"""CMC (Tian, Krishnan, Isola 2019): contrastive multiview coding of the L and ab views of Lab.

``MODEL.MECHANISM cmc``. Each training crop (the loader's first; CMC contrasts the two views of
one crop) is converted to Lab (:mod:`moco.modeling.lab`) and split into its L channel and its ab channels.
Each view has its own encoder, half of ``MODEL.ARCH``'s base width with a 1- or 2-channel stem
(``resnet18_w16`` -> two ``resnet18_w8``), so the two views' concatenated features have the
width of the full network, as the paper splits a ResNet between the views.

The loss runs in both directions: the L view's queries against the ab view's positive and
negatives (L -> ab), and the ab view's queries against the L view's (ab -> L); the step's
cross-entropy over both sets of rows is the mean of the two directions. Each view keeps its own
dictionary of its own features (``MODEL.CMC_DICTIONARY``):

- ``memory_bank`` (the paper): a bank of one feature per training image and view
  (:class:`moco.modeling.build.MemoryBankModel`); the positive is the other view's entry of the same
  image from its last visit, the K negatives are drawn from the other view's bank, and both
  entries are then updated with momentum ``MODEL.MEMORY_BANK_MOMENTUM``.
- ``moco`` (CMC's later versions): a momentum encoder and a queue of K keys per view
  (:class:`moco.modeling.moco.MoCo`, Shuffle BN included); the positive is the other view's momentum key
  of the same crop, the negatives the other view's queue.

The views are submodules ``l`` and ``ab``, each a MoCo or memory-bank model, so a checkpoint holds
``module.l.encoder_q.*``, ``module.ab.encoder_q.*`` and both dictionaries
(``module.{l,ab}.{encoder_k.*,queue,queue_ptr}`` or ``module.{l,ab}.memory_bank.bank``).
Evaluation (kNN, :class:`LabEncoder`) concatenates the two views' features, the paper's protocol.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moco.modeling.build import (
    MECHANISM_REGISTRY,
    Mechanism,
    common_args,
    validate_memory_bank,
    validate_queue,
)
from moco.modeling.lab import LabSplit
from moco.modeling.memory_bank import MemoryBankModel
from moco.modeling.moco import MoCo
from moco.modeling.resnet import half_width, resnet_encoder

CMC_DICTIONARIES = ("memory_bank", "moco")  # MODEL.CMC_DICTIONARY
VIEWS = ("l", "ab")
VIEW_CHANNELS = {"l": 1, "ab": 2}


class LabEncoder(nn.Module):
    """RGB batch -> the L and ab encoders' outputs, each L2-normalised, concatenated.

    ``views``: the two encoders; feature readers (moco.evaluation.knn) concatenate their pooled features.
    """

    def __init__(self, lab, l_encoder, ab_encoder):
        super().__init__()
        self.lab = lab
        self.views = nn.ModuleList([l_encoder, ab_encoder])

    def forward(self, x):
        features = [enc(v).float() for enc, v in zip(self.views, self.lab(x))]
        return torch.cat([F.normalize(f, dim=1) for f in features], dim=1)


@MECHANISM_REGISTRY.register()
class CMC(Mechanism):
    """``forward(im_q, im_k, index=None)`` -> ``(logits, labels)``: 2N rows, L -> ab then ab -> L."""

    name = "cmc"

    def __init__(
        self,
        arch,
        dictionary="memory_bank",
        size=None,
        dim=128,
        K=4096,
        m=0.999,
        T=0.07,
        head="linear",
        shuffle_bn="split",
        split_bn_groups=8,
        bank_momentum=0.5,
    ):
        super().__init__()
        if dictionary not in CMC_DICTIONARIES:
            raise ValueError(
                f"cmc: unknown dictionary {dictionary!r} (MODEL.CMC_DICTIONARY); "
                f"choose one of: {', '.join(CMC_DICTIONARIES)}"
            )
        if dictionary == "memory_bank" and size is None:
            raise ValueError(
                "cmc: the dataset size (memory bank entries) is needed to build the model"
            )
        self.dictionary = dictionary
        self.lab = LabSplit()
        common = dict(
            dim=dim, K=K, T=T, head=head, shuffle_bn=shuffle_bn, split_bn_groups=split_bn_groups
        )
        for view in VIEWS:
            base = resnet_encoder(half_width(arch), in_channels=VIEW_CHANNELS[view])
            if dictionary == "moco":
                model = MoCo(base, m=m, **common)
            else:
                model = MemoryBankModel(base, size, bank_momentum=bank_momentum, **common)
            self.add_module(view, model)
        self.shuffle_bn = self.l.shuffle_bn
        self.dictionary_buffers = tuple(
            f"{v}.{b}" for v in VIEWS for b in self.l.dictionary_buffers
        )
        if dictionary == "memory_bank":  # kept equal by the banks' own gathered updates
            self._ddp_params_and_buffers_to_ignore = [f"{v}.memory_bank.bank" for v in VIEWS]

    @classmethod
    def from_config(cls, cfg, world_size, dataset_size):
        m = cfg.MODEL
        return cls(
            m.ARCH,
            m.CMC_DICTIONARY,
            dataset_size,
            K=m.K,
            m=m.M,
            bank_momentum=m.MEMORY_BANK_MOMENTUM,
            **common_args(cfg, world_size),
        )

    @classmethod
    def validate(cls, cfg, world_size):
        m = cfg.MODEL
        if m.CMC_DICTIONARY not in CMC_DICTIONARIES:
            raise ValueError(
                f"unknown MODEL.CMC_DICTIONARY {m.CMC_DICTIONARY!r}; choose one of: "
                f"{', '.join(CMC_DICTIONARIES)}"
            )
        half_width(m.ARCH)
        if m.CMC_DICTIONARY == "moco":
            validate_queue(cfg)
        else:
            validate_memory_bank(cfg)

    @classmethod
    def wants_index(cls, cfg):
        return cfg.MODEL.CMC_DICTIONARY == "memory_bank"

    @classmethod
    def wants_color(cls, cfg):
        return False  # colour jitter would change the ab view that the L view learns to predict

    @property
    def encoder_q(self):
        """The query encoders of both views behind one RGB input (what kNN scores)."""
        return LabEncoder(self.lab, self.l.encoder_q, self.ab.encoder_q)

    def forward(self, im_q, im_k=None, index=None):
        l_view, ab_view = self.lab(im_q)
        if self.dictionary == "moco":
            self.l._check_inputs(l_view, l_view)
            q_l, q_ab = self.l._query(l_view), self.ab._query(ab_view)
            k_l, k_ab = self.l._keys(l_view), self.ab._keys(ab_view)
            l_to_ab, ab_to_l = self.ab._logits(q_l, k_ab), self.l._logits(q_ab, k_l)
            self.l._dequeue_and_enqueue(k_l)
            self.ab._dequeue_and_enqueue(k_ab)
        else:
            if index is None or index.shape[0] != im_q.shape[0]:
                raise ValueError("cmc (memory_bank): one sample index per image is needed")
            self.l._sync_bank()
            self.ab._sync_bank()
            q_l, q_ab = self.l._query(l_view), self.ab._query(ab_view)
            l_to_ab, ab_to_l = self.ab._logits(q_l, index), self.l._logits(q_ab, index)
            self.l.memory_bank.update(index, q_l.detach())
            self.ab.memory_bank.update(index, q_ab.detach())
        return torch.cat([l_to_ab[0], ab_to_l[0]]), torch.cat([l_to_ab[1], ab_to_l[1]])
