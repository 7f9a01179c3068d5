"""Write report.html / tables.md / tables.csv / deltas.png for a results folder.

    python tools/make_tables.py RESULTS_DIR [--baseline NAME] [--no-reference] [--tasks voc0712_det,voc07_det]

Exit codes: 0 written, 1 no metrics.json found, 2 bad arguments (e.g. an unknown --baseline).
All logic lives in ``transfer/report/``.
"""
from __future__ import annotations

import sys

from transfer.report import main

if __name__ == "__main__":
    sys.exit(main())
