"""CPC v2 (Hénaff et al. 2019; CPC: van den Oord et al. 2018) at the scale of a CPU study.

``MODEL.MECHANISM cpc``. Each training crop (the loader's first) is cut into a G x G grid of
overlapping patches of ``MODEL.CPC_PATCH_SIZE`` pixels with stride half a patch (CPC: 64-px patches,
stride 32, of 256-px crops, a 7 x 7 grid; 16-px patches of 64-px crops give the same grid).

- Patch augmentation (v2), in training only, per patch: a horizontal flip with probability 1/2 and
  colour dropping (two of the three channels set to zero, the normalised mean); the image-level
  crops keep their colours (moco.data.augment.crop_flip_transform).
- ``encoder_q``: the ResNet (MODEL.ARCH) with its head (MODEL.HEAD) encodes every patch into
  ``z`` (MODEL.DIM). It is the network that transfers: on a whole image it is a plain ResNet, so
  checkpoints convert and evaluate (kNN, lincls, detection) exactly as MoCo's encoder_q.
- ``context``: a masked-convolution network over the grid of ``z``. Its convolutions see only the
  rows above and the current row (:class:`RowCausalConv2d`), so the context ``c[i, j]`` summarises
  rows ``<= i``.
- ``predictors[k-1]``: a linear map per step k = 1 .. ``MODEL.CPC_STEPS`` from ``c[i, j]`` to a
  prediction of ``z[i + k, j]``; a prediction never sees its target row.
- InfoNCE: each prediction is scored (dot product, no temperature, as CPC) against every patch
  of the global batch: its target is the positive, the other patches of the same image and of the
  other images are the negatives. Gathers across processes keep their gradient (moco.utils.dist).

BatchNorm stays in the encoder (v2 uses layer norm), so it transfers to the detectors' BatchNorm
ResNets unchanged; batch statistics are over the process's patches. ``MODEL.T`` is not used.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from moco.modeling.build import MECHANISM_REGISTRY, Mechanism, head_name
from moco.modeling.encoder import build_encoder
from moco.modeling.resnet import resnet_encoder
from moco.utils.dist import all_gather_with_grad, get_rank


def grid_size(image_size, patch_size):
    """Patches per side of an ``image_size`` crop cut into ``patch_size`` patches, stride half a patch."""
    stride = patch_size // 2
    if (
        patch_size < 2
        or patch_size % 2
        or image_size < patch_size
        or (image_size - patch_size) % stride
    ):
        raise ValueError(
            f"cpc: MODEL.CPC_PATCH_SIZE {patch_size} must be even and tile the "
            f"INPUT.CROP_SIZE {image_size} crop in steps of half a patch"
        )
    return (image_size - patch_size) // stride + 1


def patch_grid(x, patch_size):
    """``x`` (N x C x S x S) -> patches (N x G x G x C x P x P): patch (i, j) is
    ``x[:, :, i*P/2 : i*P/2 + P, j*P/2 : j*P/2 + P]``."""
    grid_size(x.shape[-1], patch_size)
    stride = patch_size // 2
    patches = x.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # N C G G P P
    return patches.permute(0, 2, 3, 1, 4, 5)


def augment_patches(patches, generator=None):
    """CPC v2's patch augmentation on ``patches`` (... x C x P x P), each patch on its own: a
    horizontal flip with probability 1/2, and colour dropping (one random channel kept)."""
    shape = patches.shape
    flat = patches.reshape(-1, *shape[-3:])
    n, c = flat.shape[:2]
    flip = torch.rand(n, device=flat.device, generator=generator) < 0.5
    flat = torch.where(flip.view(n, 1, 1, 1), flat.flip(-1), flat)
    keep = torch.randint(c, (n,), device=flat.device, generator=generator)
    mask = F.one_hot(keep, c).to(flat.dtype).view(n, c, 1, 1)
    return (flat * mask).reshape(shape)


class RowCausalConv2d(nn.Conv2d):
    """A convolution whose output row i sees input rows ``i - kh + 1 .. i`` only (padding on top,
    none below), and ``kw // 2`` columns either side."""

    def __init__(self, in_channels, out_channels, kernel_size=(3, 3)):
        super().__init__(in_channels, out_channels, kernel_size)
        self.causal_pad = (kernel_size[1] // 2, kernel_size[1] // 2, kernel_size[0] - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.causal_pad))


def context_network(dim, grid):
    """The masked-convolution context network: row-causal 3 x 3 convolutions with ReLUs between
    them, as many as it takes for the last row's context to see every row of a ``grid``-row grid."""
    layers = max(1, math.ceil((grid - 1) / 2))  # each one reaches 2 rows further up
    modules = []
    for i in range(layers):
        modules += [RowCausalConv2d(dim, dim)] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*modules)


def cpc_logits(z, predictions):
    """``(logits, labels)`` of CPC's InfoNCE on this process's part of the batch.

    ``z``: N x D x G x G patch embeddings; ``predictions[k-1]``: N x D x G x G, the predictions of
    ``z`` k rows below each position. Rows: for each step k, image n, row i < G - k and column j
    (in that order), the prediction of ``z[n, :, i + k, j]``; columns: every patch of the global
    batch (gathered, in rank, image, row, column order); the label is the target's column.
    """
    n, d, g, _ = z.shape
    targets = z.permute(0, 2, 3, 1).reshape(n * g * g, d)
    all_targets = all_gather_with_grad(targets)
    first = get_rank() * n * g * g  # this process's first patch among all_targets
    index = torch.arange(n * g * g, device=z.device).view(n, g, g)
    rows, labels = [], []
    for k, pred in enumerate(predictions, start=1):
        rows.append(pred[:, :, : g - k].permute(0, 2, 3, 1).reshape(-1, d))
        labels.append(first + index[:, k:].reshape(-1))
    queries = torch.cat(rows)
    return queries @ all_targets.t(), torch.cat(labels)


@MECHANISM_REGISTRY.register()
class CPC(Mechanism):
    """``forward(im_q, im_k)`` -> ``(logits, labels)``; ``im_k`` is unused (one crop per image)."""

    name = "cpc"  # no dictionary: the negatives are the batch's patches
    shuffle_bn = "off"  # no key encoder to shuffle for; BatchNorm over the process's patches

    def __init__(self, base_encoder, image_size, patch_size=16, steps=2, dim=128, head="linear"):
        super().__init__()
        g = self.check_geometry(image_size, patch_size, steps)
        self.image_size, self.patch_size, self.steps = int(image_size), int(patch_size), int(steps)
        self.encoder_q = build_encoder(base_encoder, dim, head, "off", 1)
        self.context = context_network(dim, g)
        self.predictors = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(self.steps))

    @classmethod
    def from_config(cls, cfg, world_size, dataset_size):
        m = cfg.MODEL
        return cls(
            resnet_encoder(m.ARCH),
            cfg.INPUT.CROP_SIZE,
            m.CPC_PATCH_SIZE,
            m.CPC_STEPS,
            dim=m.DIM,
            head=head_name(cfg),
        )

    @classmethod
    def validate(cls, cfg, world_size):
        cls.check_geometry(cfg.INPUT.CROP_SIZE, cfg.MODEL.CPC_PATCH_SIZE, cfg.MODEL.CPC_STEPS)

    @classmethod
    def wants_color(cls, cfg):
        return False  # colour dropping is per patch (augment_patches)

    @staticmethod
    def check_geometry(image_size, patch_size, steps):
        """The grid size; one-line ValueError for a patch size or step count that cannot train."""
        g = grid_size(image_size, patch_size)
        if not 1 <= steps < g:
            raise ValueError(
                f"MODEL.CPC_STEPS {steps} must be in [1, {g}) for the {g} x {g} patch "
                "grid (a prediction needs a row above its target)"
            )
        return g

    def embed(self, images):
        """N x D x G x G patch embeddings of ``images`` (patches augmented in training mode)."""
        patches = patch_grid(images, self.patch_size)
        if self.training:
            patches = augment_patches(patches)
        n, g = patches.shape[:2]
        z = self.encoder_q(patches.reshape(n * g * g, *patches.shape[3:]))
        return z.float().view(n, g, g, -1).permute(0, 3, 1, 2)

    def forward(self, im_q, im_k=None):
        if tuple(im_q.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"cpc: crops of {tuple(im_q.shape[-2:])} pixels; the model is built for "
                f"{self.image_size} (INPUT.CROP_SIZE)"
            )
        z = self.embed(im_q)
        c = self.context(z)
        with torch.autocast(z.device.type, enabled=False):  # logits in fp32 even under AMP
            return cpc_logits(z, [p(c.float()) for p in self.predictors])
