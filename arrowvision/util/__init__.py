"""Small helpers every layer uses: atomic writes, bounded JSON, vector similarity."""
