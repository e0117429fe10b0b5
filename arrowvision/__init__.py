"""arrowvision: Arrow-native SigLIP/CLIP vision encoder for fast CPU embeddings.

Importing the package is cheap and never imports torch: the encoder and its backends load
lazily, so the OpenVINO fast path stays torch-free.
"""

from .config import VisionConfig
from .errors import (
    ArrowVisionError,
    BackendError,
    ConversionError,
    FormatError,
    ImageError,
    ImageTooLarge,
    ModelError,
    TensorNotFound,
)
from .format import WeightLoader

__version__ = "0.1.0"
__all__ = [
    "ArrowVisionError",
    "BackendError",
    "ConversionError",
    "FormatError",
    "ImageError",
    "ImageTooLarge",
    "ModelError",
    "TensorNotFound",
    "VisionConfig",
    "VisionEncoder",
    "WeightLoader",
]


def __getattr__(name: str):
    if name == "VisionEncoder":
        from .encoder import VisionEncoder

        return VisionEncoder
    raise AttributeError(f"module 'arrowvision' has no attribute {name!r}")
