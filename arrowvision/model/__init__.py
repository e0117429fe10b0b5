"""What a model is: configs, tokenizers, the PyTorch towers (``vision``, ``text``) built from Parquet
weights, and ``convert``, which turns a Hugging Face checkpoint into such weights."""
