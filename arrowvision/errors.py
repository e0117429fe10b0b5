"""Exception types. Every error we raise on bad input is one of these, with a message that
names the input (file, tensor, image) and the problem."""


class ArrowVisionError(Exception):
    """Base class for all arrowvision errors."""


class FormatError(ArrowVisionError):
    """A weights file is not a valid arrowvision Parquet file (corrupt, truncated, hostile)."""


class ConversionError(ArrowVisionError):
    """A checkpoint cannot be converted (missing config, unknown family, bad tensors...)."""


class ImageError(ArrowVisionError):
    """An image cannot be decoded or is unacceptable (corrupt, empty, too large...)."""


class ImageTooLarge(ImageError):
    """An image has more pixels than the configured limit (decompression-bomb guard)."""


class ColumnTypeError(ArrowVisionError, TypeError):
    """An Arrow column's type cannot hold images (or texts), or the value is not a column."""


class ModelError(ArrowVisionError):
    """Weights do not match the model they are loaded into."""


class BackendError(ArrowVisionError):
    """A backend is unavailable (missing package) or failed to export/compile."""


class TensorNotFound(ArrowVisionError, KeyError):
    """No tensor in a weights file has the requested name or matches the selection."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SearchIndexError(ArrowVisionError):
    """A vector index (``DATASET/_index``) is missing or cannot be used."""


class IndexMismatch(SearchIndexError):
    """An index was built from another model's (or preprocessing's) embeddings than the query's."""


class IndexCorrupt(SearchIndexError):
    """An index folder is unreadable or inconsistent with itself; rebuild it."""


class BundleError(ArrowVisionError):
    """A model bundle (``arrowvision bundle``) is missing, incomplete, tampered with or unusable here."""


class OutputBusy(ArrowVisionError):
    """Another run is writing the same dataset folder (one writer per folder)."""


class OptionError(ArrowVisionError):
    """A call option is out of its allowed range (e.g. a NaFlex ``max_num_patches`` budget)."""
