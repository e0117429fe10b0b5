"""Nearest-neighbour search over an embeddings dataset: exact scan and the FAISS index."""
