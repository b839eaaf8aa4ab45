"""`mft-merge` in a checkout, installed or not: mft_trainer/cli/merge_lora.py, whose docstring (--help) says more."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mft_trainer

from mft_trainer.cli.merge_lora import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
