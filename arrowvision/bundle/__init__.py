"""Model bundles: a model exported and validated once, in a folder that serves without torch.

``build`` (``arrowvision bundle``, needs the full install) exports the towers, checks them on the
held-out sets and writes the folder atomically; ``manifest`` says what a bundle holds and checks
every file's checksum; ``runtime`` opens one with the runtime install alone (OpenVINO or ONNX
Runtime, no torch), re-validating a lossy or ``auto`` artifact on a CPU other than the one it was
made on and falling back to the bundled fp32 artifact when it no longer holds.
"""
