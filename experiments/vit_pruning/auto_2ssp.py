"""The seed's entry point: python experiments/vit_pruning/auto_2ssp.py --target 0.25 ... (see --help)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from vit_pruning.cli import console_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(console_main())
