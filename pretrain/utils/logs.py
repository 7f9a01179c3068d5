"""Logging on rank 0 only (other ranks log warnings and errors), through tqdm so that log lines and
progress bars never overwrite each other; and the one-line summaries people read in a long run."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

from pretrain.utils import dist

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write``: an active progress bar is cleared and redrawn below the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level if dist.is_main() else logging.WARNING)
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    if log_file is not None and dist.is_main():
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(fh)


def print_error_line(text: str) -> None:
    """``text`` on its own line of stderr: the progress bars an interrupted loop left open are closed first
    (a bar leaves its line without a newline, and the text would otherwise continue it)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(text, file=sys.stderr)


def format_duration(seconds: float) -> str:
    """``3h12m``, ``4m05s``, ``12s``."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_epoch_summary(epoch: int, num_epochs: int, stats: dict, eta_s: float | None = None) -> str:
    """``epoch 12/200  loss 6.81  acc1 0.42  lr 0.029  1234 img/s  eta 3h12m`` (``epoch`` 1-based)."""
    parts = [f"epoch {epoch}/{num_epochs}"]
    for key, name, fmt in (("loss", "loss", "{:.3f}"), ("contrastive_top1", "acc1", "{:.3f}"), ("lr", "lr", "{:.3g}"),
                           ("images_per_s", "img/s", "{:.0f}")):
        if stats.get(key) is not None:
            value = fmt.format(stats[key])
            parts.append(f"{value} {name}" if name == "img/s" else f"{name} {value}")
    for key in sorted(k for k in stats if k.startswith("knn_")):
        parts.append(f"{key} {stats[key]:.2f}")
    if stats.get("skipped_images"):
        parts.append(f"skipped {stats['skipped_images']}")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return "  ".join(parts)
