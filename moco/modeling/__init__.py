"""Models: the encoder (ResNet + head), the contrastive mechanisms (registered by
``MODEL.MECHANISM`` in :data:`MECHANISM_REGISTRY`), losses, Shuffle BN and the Lab split.

Importing the package registers every mechanism module below.
"""

from moco.modeling import cmc, cpc, end_to_end, memory_bank, moco  # noqa: F401  (registration)
from moco.modeling.build import (
    MECHANISM_REGISTRY,
    Mechanism,
    build_contrastive_model,
    mechanism_class,
    mechanism_names,
    validate_mechanism,
    validate_model,
)
from moco.modeling.encoder import build_encoder, encode
from moco.modeling.end_to_end import EndToEnd
from moco.modeling.memory_bank import MemoryBank, MemoryBankModel
from moco.modeling.moco import MoCo
from moco.modeling.resnet import half_width, resnet_encoder

__all__ = [
    "MECHANISM_REGISTRY",
    "EndToEnd",
    "Mechanism",
    "MemoryBank",
    "MemoryBankModel",
    "MoCo",
    "build_contrastive_model",
    "build_encoder",
    "encode",
    "half_width",
    "mechanism_class",
    "mechanism_names",
    "resnet_encoder",
    "validate_mechanism",
    "validate_model",
]
