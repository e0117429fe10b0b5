"""Getting images in: paths, lists, URIs and URLs, decoding and preprocessing."""
