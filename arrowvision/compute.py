"""pyarrow compute: the encoder as a registered scalar function.

>>> import pyarrow.compute as pc, arrowvision.compute
>>> arrowvision.compute.register("siglip.parquet", name="embed_image")
>>> pc.call_function("embed_image", [table["image"]])   # FixedSizeList<float32, D>

Arrow's function registry is process-wide and holds one signature per name, with no implicit
casts for user functions: ``input_type`` is the column type the name accepts (``binary`` by
default; ``large_binary``, ``binary_view``, ``string`` for paths, or the Hugging Face
``struct<bytes, path>``). A name cannot be unregistered, so registering it again (same types)
points it at the new weights and options instead.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pyarrow as pa

from .arrow.columns import embedding_type
from .engine_models import SharedModel, check_on_error, shared_model
from .errors import ArrowVisionError

_lock = threading.Lock()
_targets: dict[str, tuple[SharedModel, str, pa.DataType, pa.DataType]] = {}  # name -> model, on_error, in, out


def register(weights: str | os.PathLike, name: str = "embed_image", *, input_type: pa.DataType | None = None,
             tower: str = "vision", on_error: str = "null", backend: str = "default", **options: Any) -> str:
    """Register (or re-point) the function ``name``; ``pc.call_function(name, [column])`` then
    embeds a column of ``input_type`` (default binary; string for ``tower="text"``). Returns ``name``."""
    import pyarrow.compute as pc

    check_on_error(on_error)
    input_type = input_type or (pa.string() if tower == "text" else pa.binary())
    model = shared_model(weights, tower=tower, backend=backend, **options)
    output_type = embedding_type(model.dim)
    with _lock:
        if name in _targets:
            _, _, known_in, known_out = _targets[name]
            if (known_in, known_out) != (input_type, output_type):
                raise ArrowVisionError(f"compute function {name!r} is registered for {known_in} -> {known_out}; "
                                       f"Arrow cannot re-register it for {input_type} -> {output_type}: use another name")
            _targets[name] = (model, on_error, input_type, output_type)
            return name
        if name in pc.list_functions():
            raise ArrowVisionError(f"a compute function named {name!r} already exists (not ours); choose another name")

        def embed(context: Any, column: Any) -> Any:
            target, policy = _targets[name][:2]
            return target.embed_arrow(column, policy)

        summary = f"Embed {'texts' if tower == 'text' else 'images'} with arrowvision"
        doc = {"summary": summary, "description": f"{summary}: FixedSizeList<float32, {model.dim}>, null where a row fails."}
        pc.register_scalar_function(embed, name, doc, {"column": input_type}, output_type)
        _targets[name] = (model, on_error, input_type, output_type)
    return name
