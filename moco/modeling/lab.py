"""RGB -> CIE L*a*b* on image batches, and CMC's split into an L view and an ab view.

:func:`rgb_to_lab` is the sRGB (D65) conversion of OpenCV's ``cv2.cvtColor(..., COLOR_RGB2Lab)``
on float images (and of skimage's ``rgb2lab``, which CMC's code uses): undo the sRGB gamma,
multiply by the sRGB -> XYZ matrix, divide by the D65 white point, then
``L = 116 f(Y) - 16``, ``a = 500 (f(X) - f(Y))``, ``b = 200 (f(Y) - f(Z))`` with the cube root
``f`` (linear near 0). It is written in torch because it runs inside the model on whole batches,
in pretraining (after the loader's augmentation) and in the detection backbone (on Detectron2's
normalised input), on any device; the tests check it against OpenCV.

:class:`LabSplit` takes the loader's ImageNet-normalised RGB batch and returns the two CMC views,
each scaled to about [-1, 1] with the constants of CMC's code (the sRGB gamut's range per channel).
"""

import torch
from torch import nn

from moco.data.augment import IMAGENET_MEAN, IMAGENET_STD

# sRGB (linear) -> XYZ, and the D65 white point (OpenCV's constants)
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE = (0.950456, 1.0, 1.088754)
_EPS = 216.0 / 24389.0  # (6/29)^3: below it f is the linear segment

# CMC's Normalize after RGB2Lab: per channel (min + max) / 2 and (max - min) / 2 over sRGB
LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def rgb_to_lab(rgb):
    """``rgb``: N x 3 x H x W in [0, 1] (sRGB) -> N x 3 x H x W L*a*b* (L in [0, 100])."""
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / white
    f = torch.where(
        xyz > _EPS, xyz.clamp_min(_EPS) ** (1.0 / 3.0), (841.0 / 108.0) * xyz + 4.0 / 29.0
    )
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


class LabSplit(nn.Module):
    """Normalised RGB batch -> ``(L, ab)``: N x 1 and N x 2 channels, each scaled as CMC's code.

    ``mean`` / ``std``: the RGB normalisation of the input (the loader's ImageNet statistics, in
    [0, 1] units). The constants are buffers not saved in checkpoints.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        constants = {"rgb_mean": mean, "rgb_std": std, "lab_mean": LAB_MEAN, "lab_std": LAB_STD}
        for name, value in constants.items():
            self.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # the cube root wants fp32
            lab = rgb_to_lab(x.float() * self.rgb_std + self.rgb_mean)
            lab = (lab - self.lab_mean) / self.lab_std
        return lab[:, :1], lab[:, 1:]
