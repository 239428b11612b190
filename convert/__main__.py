"""`python -m convert ...`: the checkpoint conversion CLI (see `python -m convert --help`)."""

import sys

from dlmjax.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
