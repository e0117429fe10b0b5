"""Inference backends. Each takes preprocessed (N, 3, H, W) float32 pixels and returns the
pooled (N, D) float32 embeddings, and knows nothing of images: ``torch`` is the reference,
``openvino`` and ``onnxruntime`` run exported graphs without torch, ``auto`` picks the fastest
validated (backend, precision) for this CPU by measuring.

``base``: the ``Backend`` interface and its defaults; ``factory.create``: a backend by name;
``artifacts``: the export cache; ``validation``: held-out accuracy checks; ``cpu``: what this
CPU offers. Nothing here imports this package itself, so it imports nothing.
"""
