"""Atomic writes and safe checkpoint loading.

Every file this project writes goes to a temporary name in the same folder and is renamed into
place, so an interrupted run never leaves a half-written checkpoint or result behind.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or not in a layout we can read."""


class WriteError(OSError):
    """A file could not be written (no space left on the device): its previous version, if any, is intact."""

    def __init__(self, message: str, code: int | None = errno.ENOSPC):
        super().__init__(message)
        self.errno = code


# what torch.save's C++ writer raises when a write fails (it drops the OSError's errno)
_TORCH_WRITE_FAILED = ("iostream error", "file write failed", "PytorchStreamWriter failed writing")
_NEARLY_FULL = 16 << 20  # bytes free below which a failed torch write is taken for a full disk


def _write_failure(path: Path, tmp: Path, e: BaseException, what: str, hint: str) -> WriteError | None:
    """The one clear error for a write of ``path`` (through ``tmp``) that failed with ``e``; None if ``e`` is not
    a failed write (no space left; torch's write errors)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        reason, code = "no space left on device", errno.ENOSPC
    elif isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILED):
        full = shutil.disk_usage(tmp.parent).free < _NEARLY_FULL
        text = str(e).strip().splitlines()[0]
        reason, code = ("no space left on device", errno.ENOSPC) if full else (f"write failed ({text})", None)
    else:
        return None
    previous = f"the previous {what} {path} is intact" if path.exists() else f"no {what} was written to {path}"
    return WriteError(f"{reason} while writing {path}; {previous}; {hint}", code)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file", hint: str = "free space and rerun") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A write that fails for lack of space raises :class:`WriteError` naming ``path``, whether the previous
    ``what`` there is intact, and ``hint``; the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the result the mode a plain open() would (0666 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:
        failure = None if isinstance(e, WriteError) else _write_failure(path, tmp_path, e, what, hint)
        if failure is None:
            raise
        raise failure from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], **kw: str) -> None:
    """``write(tmp)`` then rename onto ``path``; ``kw``: ``what`` and ``hint`` of :func:`atomic_path`."""
    with atomic_path(path, **kw) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike, **kw: str) -> None:
    atomic_write(path, lambda p: torch.save(obj, p), **kw)


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one clear message for each way a file can be bad.

    Checkpoints from others are untrusted: only tensors and plain containers are unpickled.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types here: pickle, zip, EOF, runtime errors
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refuses to load objects other than tensors and plain containers "
                f"(weights_only=True); the file holds: {text}"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {text}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
