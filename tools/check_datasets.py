"""The dataset doctor: is every task's dataset where and as the suite expects it?

    python tools/check_datasets.py --data-root DIR [--tasks voc07_det,imagenet_linear] [--full]

Prints one line per task (ok / partial / missing / malformed / no check) and each problem with its fix.
Exit status: 0 when every selected task can run, 1 when one cannot, 2 for bad arguments.
All logic lives in ``transfer/doctor.py``; each task's check lives with its spec (``TaskSpec.check_data``).
"""
from __future__ import annotations

import sys

from transfer.doctor import main

if __name__ == "__main__":
    sys.exit(main())
