"""arrowvision: Arrow-native SigLIP/CLIP vision encoder for fast CPU embeddings.

Importing the package is cheap and never imports torch: the encoder and its backends load
lazily, so the OpenVINO fast path stays torch-free.
"""

from .model.config import VisionConfig
from .errors import (
    ArrowVisionError,
    BackendError,
    BundleError,
    ConversionError,
    FormatError,
    ImageError,
    ImageTooLarge,
    ModelError,
    OptionError,
    TensorNotFound,
)
from .model.text_config import TextConfig
from .weights.format import WeightLoader

__version__ = "0.1.0"
__all__ = [
    "ArrowVisionError",
    "BackendError",
    "BundleError",
    "ConversionError",
    "FormatError",
    "ImageError",
    "ImageTextModel",
    "ImageTooLarge",
    "ModelError",
    "OptionError",
    "TensorNotFound",
    "TextConfig",
    "TextEncoder",
    "VisionConfig",
    "VisionEncoder",
    "WeightLoader",
]


def __getattr__(name: str):
    if name == "VisionEncoder":
        from .encoder import VisionEncoder

        return VisionEncoder
    if name == "TextEncoder":
        from .text_encoder import TextEncoder

        return TextEncoder
    if name == "ImageTextModel":
        from .image_text import ImageTextModel

        return ImageTextModel
    raise AttributeError(f"module 'arrowvision' has no attribute {name!r}")
