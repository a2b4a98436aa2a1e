"""ResNet encoders by name: torchvision's, and the same networks at a narrower base width.

``resnet18`` ... ``wide_resnet101_2`` are torchvision's constructors. ``<arch>_w<W>`` (for example
``resnet18_w32``) is torchvision's ``<arch>`` with base width W instead of 64: the stem and the
four stages have W, 2W, 4W, 8W channels (times the block expansion). Keys, module layout and
initialisation are torchvision's, so checkpoints, the official MoCo layout and the Detectron2
conversion rule (moco-det's ``detection.convert``) are unchanged; only tensor shapes differ.

Why: on a 2-core CPU, width is the cheapest lever for a study (measured here: a MoCo v2 step of
ResNet-18 at width 32 runs about 4x faster than at width 64, width 16 at 32 px about 33x).
"""

import re

import torchvision
from torch import nn

__all__ = ["STANDARD_WIDTH", "half_width", "parse_arch", "resnet_encoder"]

STANDARD_WIDTH = 64
_NARROW = re.compile(r"^(?P<base>[a-z0-9_]+?)_w(?P<width>\d+)$")


def _torchvision_names():
    return [n for n in torchvision.models.resnet.__all__ if n[0].islower()]


def parse_arch(arch):
    """``(torchvision constructor name, base width)`` of ``arch``; raises ValueError naming the
    choices for an unknown name."""
    names = _torchvision_names()
    if arch in names:
        return arch, STANDARD_WIDTH
    match = _NARROW.match(str(arch))
    if match and match["base"] in names and int(match["width"]) >= 1:
        if match["base"].startswith(("resnext", "wide_")):
            raise ValueError(
                f"arch {arch!r}: a _w<width> suffix applies to resnet18..resnet152 only"
            )
        return match["base"], int(match["width"])
    raise ValueError(
        f"unknown ResNet arch {arch!r}; choose one of: {', '.join(names)}, or one of "
        "resnet18..resnet152 with a base width suffix such as resnet18_w32"
    )


def half_width(arch):
    """``arch`` at half its base width (CMC splits a network's width between its two views)."""
    base, width = parse_arch(arch)
    if width % 2 or width < 2:
        raise ValueError(
            f"MODEL.ARCH {arch} has base width {width}: CMC's two views split it, "
            "so it must be even"
        )
    return f"{base}_w{width // 2}"


def _narrow(base, width, **kwargs):
    model = getattr(torchvision.models, base)(**kwargs)
    block = type(model.layer1[0])
    depths = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    # torchvision's _make_layer reads self.inplanes: rebuild stem and stages at the new width
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    for i, depth in enumerate(depths):
        stage = model._make_layer(block, width * 2**i, depth, stride=1 if i == 0 else 2)
        setattr(model, f"layer{i + 1}", stage)
    model.fc = nn.Linear(width * 8 * block.expansion, model.fc.out_features)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model


def _set_in_channels(model, in_channels):
    """A stem for ``in_channels`` input channels (CMC's L and ab views: 1 and 2), same init."""
    old = model.conv1
    model.conv1 = nn.Conv2d(
        in_channels, old.out_channels, kernel_size=7, stride=2, padding=3, bias=False
    )
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet_encoder(arch, in_channels=3):
    """The constructor for ``arch``: called as ``constructor(num_classes=N)``, like torchvision's.
    ``in_channels``: input channels of the stem (3: RGB)."""
    base, width = parse_arch(arch)
    if width == STANDARD_WIDTH and in_channels == 3:
        return getattr(torchvision.models, base)

    def build(**kwargs):
        if width == STANDARD_WIDTH:
            model = getattr(torchvision.models, base)(**kwargs)
        else:
            model = _narrow(base, width, **kwargs)
        return model if in_channels == 3 else _set_in_channels(model, in_channels)

    build.__name__ = arch if in_channels == 3 else f"{arch}_in{in_channels}"
    return build
