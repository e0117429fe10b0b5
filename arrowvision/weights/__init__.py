"""The Parquet weights format (reader and writer) and the checkpoint converter."""
