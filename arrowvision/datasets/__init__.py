"""Embeddings datasets: the resumable embed pipeline, its writer and pair scoring."""
