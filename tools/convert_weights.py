#!/usr/bin/env python3
"""Convert a Hugging Face SigLIP/CLIP checkpoint to a Parquet weights file.

Same as ``arrowvision convert``; kept as a standalone tool for scripts and docs.
Example: python tools/convert_weights.py google/siglip-base-patch16-224 weights/siglip-b16.parquet
"""

import sys

from arrowvision.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
