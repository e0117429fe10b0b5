"""Configs, tokenizers and the PyTorch towers (vision, text) built from Parquet weights."""
