"""Projection heads, replacing a torchvision ResNet's ``fc`` (so the head's keys stay ``fc.*``).

- ``linear`` (MoCo v1): the encoder's own ``fc`` (d -> dim).
- ``mlp`` (MoCo v2): ``fc = Sequential(Linear(d, d), ReLU, Linear(d, dim))``, keys ``fc.0.*`` /
  ``fc.2.*`` as in the official checkpoints (the last layer is the encoder's original ``fc``).
- ``simclr_v2`` (SimCLR v2): three layers, each Linear + BatchNorm1d, ReLU after the first two,
  hidden width d; as SimCLR v2 the Linear layers have no bias (BN follows) and the output BN has
  no shift. Its BatchNorm1d layers are plain batch norm over the process's batch.

Checkpoint converters and linear evaluation drop every ``fc.*`` key, so any head converts.
"""

from torch import nn

HEADS = ("linear", "mlp", "simclr_v2")


def resolve_head(head=None, mlp=False):
    """The head name; ``head=None`` follows the official ``--mlp`` flag (mlp, else linear)."""
    if head is None:
        return "mlp" if mlp else "linear"
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r} (MODEL.HEAD); choose one of: {', '.join(HEADS)}")
    return head


def simclr_v2_head(d, dim):
    """SimCLR v2's 3-layer projection head: (Linear, BN, ReLU) x 2, then Linear, BN (scale only)."""
    out_bn = nn.BatchNorm1d(dim)
    out_bn.bias.requires_grad_(False)  # SimCLR v2: center=False on the output layer
    return nn.Sequential(
        nn.Linear(d, d, bias=False),
        nn.BatchNorm1d(d),
        nn.ReLU(),
        nn.Linear(d, d, bias=False),
        nn.BatchNorm1d(d),
        nn.ReLU(),
        nn.Linear(d, dim, bias=False),
        out_bn,
    )


def attach_head(encoder, head):
    """Replace ``encoder.fc`` (an nn.Linear d -> dim) by the projection head ``head``, in place."""
    head = resolve_head(head)
    if head == "linear":
        return encoder
    fc = getattr(encoder, "fc", None)
    if not isinstance(fc, nn.Linear):
        what = "mlp=True" if head == "mlp" else f"head {head!r}"  # mlp: the official flag
        raise ValueError(f"{what} needs an encoder whose head is an nn.Linear named 'fc'")
    d, dim = fc.weight.shape[1], fc.weight.shape[0]
    if head == "mlp":
        encoder.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), fc)
    else:
        encoder.fc = simclr_v2_head(d, dim)
    return encoder
