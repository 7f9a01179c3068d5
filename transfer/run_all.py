"""The transfer suite's entry point: ``python transfer/run_all.py --weights W [...]`` (see ``transfer/cli.py``)."""
import sys

from transfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
