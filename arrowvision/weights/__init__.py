"""The Parquet weights format: ``format`` (constants, checksums, the zero-copy reader) and ``writer``."""
