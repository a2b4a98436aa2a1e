"""Contrastive mechanisms as pluggable parts: ``MODEL.MECHANISM`` names an entry of
:data:`MECHANISM_REGISTRY`, a subclass of :class:`Mechanism` (the contract).

The MoCo paper compares three mechanisms (Sec. 4.1, Fig. 2 and 3) and the toolkit adds two more;
each lives in its own module and registers itself:

- ``moco`` (:mod:`moco.modeling.moco`): a momentum key encoder and a queue of K keys;
- ``end_to_end`` (:mod:`moco.modeling.end_to_end`): the keys of the current batch, with gradients;
- ``memory_bank`` (:mod:`moco.modeling.memory_bank`): InstDisc's bank of one feature per sample;
- ``cmc`` and ``cpc`` (:mod:`moco.modeling.cmc`, :mod:`moco.modeling.cpc`).

A new mechanism is one module with one decorator::

    @MECHANISM_REGISTRY.register()
    class MyMechanism(Mechanism):
        name = "mine"  # MODEL.MECHANISM mine
        @classmethod
        def from_config(cls, cfg, world_size, dataset_size): ...
        def forward(self, im_q, im_k): ...  # -> (logits, labels)

The engine reads nothing else: the query encoder ``encoder_q`` (kNN, conversion, lincls), the
buffers to keep equal on every replica, and what the loader must give (sample indices, colour).
"""

import math

from fvcore.common.registry import Registry
from torch import nn

from moco.modeling.heads import HEADS, resolve_head
from moco.modeling.losses import LOSSES
from moco.modeling.resnet import resnet_encoder
from moco.modeling.shuffle_bn import resolve_shuffle_bn


class MechanismRegistry(Registry):
    """fvcore's Registry keyed by each class's ``name`` (MODEL.MECHANISM's lower-case values)."""

    def register(self, obj=None):
        def deco(cls):
            self._do_register(cls.name, cls)
            return cls

        return deco if obj is None else deco(obj)


MECHANISM_REGISTRY = MechanismRegistry("MECHANISM")


class Mechanism(nn.Module):
    """What a contrastive mechanism gives the engine.

    - ``forward(im_q, im_k[, index])`` -> ``(logits, labels)``; the step's loss is their
      cross-entropy. ``index`` (the samples' dataset indices) is passed when :meth:`wants_index`.
    - ``encoder_q``: the network whose backbone is pretrained (an attribute or a property).
    - ``dictionary_buffers``: buffer names that every replica must hold bit for bit (checked by
      the engine's digest; the memory bank or queue).
    - ``losses``: the ``MODEL.LOSS`` values the mechanism trains with.
    - ``shuffle_bn``: the Shuffle BN mode it resolved (reported in the run's summary).
    """

    name = None  # the MODEL.MECHANISM value
    dictionary_buffers = ()
    losses = ("info_nce",)
    shuffle_bn = "off"  # the BatchNorm mode of its keys, reported in the run's summary

    @classmethod
    def from_config(cls, cfg, world_size, dataset_size):
        """The model of ``cfg`` (``dataset_size``: training images, for a per-sample dictionary)."""
        raise NotImplementedError

    @classmethod
    def validate(cls, cfg, world_size):
        """One-line ValueError for this mechanism's settings that cannot train (before any build)."""

    @classmethod
    def wants_index(cls, cfg):
        """Whether the loader yields each sample's index and ``forward`` takes it."""
        return False

    @classmethod
    def wants_color(cls, cfg):
        """Whether the loader's crops get colour jitter and grayscale (aug / aug+)."""
        return True


def mechanism_names():
    return sorted(name for name, _ in MECHANISM_REGISTRY)


def mechanism_class(cfg):
    """The registered class of ``MODEL.MECHANISM``; one-line ValueError naming the choices."""
    name = cfg.MODEL.MECHANISM
    if name not in dict(MECHANISM_REGISTRY):
        raise ValueError(
            f"unknown MODEL.MECHANISM {name!r}; choose one of: {', '.join(mechanism_names())}"
        )
    return MECHANISM_REGISTRY.get(name)


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


def validate_model(cfg):
    """MODEL.ARCH, M, T and DIM: one-line ValueError for values MoCo cannot train with."""
    resnet_encoder(cfg.MODEL.ARCH)  # raises for an unknown arch
    # T must be finite too: with T = inf every logit is 0 and the run learns nothing
    if not 0.0 <= cfg.MODEL.M <= 1.0 or not 0 < cfg.MODEL.T < math.inf or cfg.MODEL.DIM < 1:
        raise ValueError(
            f"MODEL.M (--moco-m) must be in [0, 1], MODEL.T (--moco-t) > 0 and "
            f"MODEL.DIM >= 1; got {cfg.MODEL.M}, {cfg.MODEL.T}, {cfg.MODEL.DIM}"
        )


def validate_mechanism(cfg, world_size):
    """One-line ValueError for a mechanism / loss / head combination that cannot train."""
    m = cfg.MODEL
    cls = mechanism_class(cfg)
    if m.LOSS not in LOSSES:
        raise ValueError(f"unknown MODEL.LOSS {m.LOSS!r}; choose one of: {', '.join(LOSSES)}")
    if m.HEAD not in HEADS:
        raise ValueError(f"unknown MODEL.HEAD {m.HEAD!r}; choose one of: {', '.join(HEADS)}")
    head_name(cfg)
    if m.LOSS not in cls.losses:
        takes = [n for n, c in MECHANISM_REGISTRY if m.LOSS in c.losses]
        raise ValueError(
            f"MODEL.LOSS {m.LOSS} is not a loss of MODEL.MECHANISM {m.MECHANISM} "
            f"({', '.join(cls.losses)}); it needs MODEL.MECHANISM {' or '.join(takes)}, not {m.MECHANISM}"
        )
    cls.validate(cfg, world_size)


def validate_queue(cfg):
    """A queue of MODEL.K keys takes whole global batches (official assert K % batch_size == 0)."""
    k, batch = cfg.MODEL.K, cfg.SOLVER.IMS_PER_BATCH
    if k < 1:  # K % batch alone lets 0 and negatives through
        raise ValueError(f"MODEL.K (--moco-k, the queue size) must be >= 1, got {k}")
    if k % batch:
        raise ValueError(
            f"MODEL.K (--moco-k) = {k} is not a multiple of the global batch "
            f"SOLVER.IMS_PER_BATCH = {batch}: the queue takes whole batches (official assert "
            f"K % batch_size == 0); use e.g. MODEL.K {max(1, k // batch) * batch}"
        )


def validate_memory_bank(cfg):
    """MODEL.K negatives drawn from a bank updated with MODEL.MEMORY_BANK_MOMENTUM."""
    m = cfg.MODEL
    if m.K < 1:
        raise ValueError(f"MODEL.K (negatives drawn from the memory bank) must be >= 1, got {m.K}")
    if not 0.0 <= m.MEMORY_BANK_MOMENTUM < 1.0:
        raise ValueError(
            f"MODEL.MEMORY_BANK_MOMENTUM must be in [0, 1), got {m.MEMORY_BANK_MOMENTUM}"
        )


def build_contrastive_model(cfg, world_size, dataset_size=None) -> nn.Module:
    """The ``MODEL.MECHANISM`` model of ``cfg`` (``dataset_size``: memory bank entries)."""
    return mechanism_class(cfg).from_config(cfg, world_size, dataset_size)


def common_args(cfg, world_size):
    """The constructor arguments every ResNet-based mechanism shares."""
    m = cfg.MODEL
    return dict(
        dim=m.DIM,
        T=m.T,
        head=head_name(cfg),
        shuffle_bn=resolve_shuffle_bn(m.SHUFFLE_BN, world_size),
        split_bn_groups=m.SPLIT_BN_GROUPS,
    )
