"""A memory-mapped, sharded on-disk cache of frozen-backbone features.

One cache entry holds the features of one dataset split under one model and one preprocessing:
``<cache_dir>/features/<key>/{manifest.json, feats-00000.npy, labels-00000.npy, ...}``.
The key is the SHA-256 of the weights file, a digest of the backbone tensors actually loaded, the
architecture, the preprocessing and a fingerprint of the dataset's file list, so any change gives a
new entry and a second identical run reuses the old one.

Crash safety: every shard file is written to a temporary name and renamed (``atomic_path``), and
``manifest.json`` is written last; an entry without a manifest is never read as complete, but its
finished shards are reused when the extraction restarts. Under torchrun each rank extracts every
``world_size``-th shard (``cache_dir`` must be shared by the ranks) and rank 0 writes the manifest.

Unreadable images: a dataset with an ``unreadable`` tracker (``pretrain.data.folder.UnreadableImages``) skips
and counts them while its features are extracted; each shard records which of its rows were unreadable
(``unreadable-<i>.json``, written before the shard's features), and a reused shard marks them again, so a run
served from the cache reports (and is limited by) the same count as the run that filled it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pretrain.knn import extract_features
from pretrain.utils import dist
from pretrain.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-shard records of unreadable images
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor (sorted by name).

    Used both in the cache key (two random inits with different seeds differ) and by the linear
    probe's check that the backbone did not change.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(samples: Sequence[Tuple[str, int]], root: str | os.PathLike) -> str:
    """SHA-256 of the sorted ``(path relative to root, size in bytes, label)`` list of an ImageFolder.

    Relative paths keep the key valid when the dataset is moved; sizes catch re-encoded images.
    """
    root = Path(root)
    h = hashlib.sha256()
    for path, label in sorted(samples):
        rel = os.path.relpath(path, root)
        h.update(f"{rel}|{os.path.getsize(path)}|{label}\n".encode())
    return h.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``parts`` (weights, arch, preprocessing, dataset...)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class FeatureCache:
    """One cache entry: features (N, D) and labels (N,) split into shards of ``shard_size`` rows."""

    def __init__(self, cache_dir: str | os.PathLike, parts: Mapping[str, Any]):
        self.parts = dict(parts)
        self.key = cache_key(self.parts)
        self.dir = Path(cache_dir) / "features" / self.key[:24]

    def shard_paths(self, i: int) -> Tuple[Path, Path]:
        return self.dir / f"feats-{i:05d}.npy", self.dir / f"labels-{i:05d}.npy"

    def unreadable_path(self, i: int) -> Path:
        return self.dir / f"unreadable-{i:05d}.json"

    def manifest(self) -> Optional[dict]:
        """The manifest if the entry is complete and belongs to this key, else None."""
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        m = json.loads(path.read_text())
        if m.get("key") != self.key:
            return None
        for i in range(m["num_shards"]):
            if not all(p.is_file() for p in self.shard_paths(i)):
                return None
        return m

    def is_complete(self) -> bool:
        return self.manifest() is not None

    def _shard_done(self, i: int, rows: int) -> bool:
        fp, lp = self.shard_paths(i)
        if not (fp.is_file() and lp.is_file()):
            return False
        try:  # files only appear by rename, so a present file is whole; still check its header
            return np.load(fp, mmap_mode="r").shape[0] == rows and np.load(lp, mmap_mode="r").shape[0] == rows
        except (ValueError, OSError):
            return False

    def load(self, stream: bool = False) -> Tuple[torch.Tensor | List[torch.Tensor], torch.Tensor]:
        """Features (N, D) in the stored dtype and labels (N,) int64.

        ``stream=True``: the features stay a list of memory-mapped per-shard tensors (N_i, D), read
        from disk only when touched (bounded host memory for kNN over 1.28M images).
        """
        m = self.manifest()
        if m is None:
            raise FileNotFoundError(f"feature cache entry is not complete: {self.dir}")
        # mmap_mode="c" (copy-on-write): lazily read, and writable so torch.from_numpy does not warn
        feats = [torch.from_numpy(np.load(self.shard_paths(i)[0], mmap_mode="c")) for i in range(m["num_shards"])]
        labels = np.concatenate([np.load(self.shard_paths(i)[1]) for i in range(m["num_shards"])])
        return (feats if stream else torch.cat(feats)), torch.from_numpy(labels.astype(np.int64))


def _save_npy(path: Path, array: np.ndarray) -> None:
    # np.save appends ".npy" to names lacking it, so write through a file object to the temp name
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@torch.no_grad()
def extract_shard(model: nn.Module, loader: DataLoader, device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """Features of one shard: images (B, 3, H, W) -> (rows, D) float32 and labels (rows,) int64."""
    feats, labels = extract_features(model, loader, device, progress=False)
    return feats.numpy(), labels.numpy()


def _remark_unreadable(dataset: Dataset, cache: FeatureCache, shard: int) -> None:
    """Flag again, in ``dataset``'s tracker, the rows a reused shard recorded as unreadable."""
    tracker = getattr(dataset, "unreadable", None)
    path = cache.unreadable_path(shard)
    if tracker is None or not path.is_file():
        return
    for j in json.loads(path.read_text()):
        if not tracker.is_bad(j):
            tracker.mark(j, OSError("unreadable when its features were extracted into the cache"))


def get_or_extract(
    model: nn.Module,
    dataset: Dataset,
    cache_dir: str | os.PathLike,
    parts: Mapping[str, Any],
    device: torch.device,
    batch_size: int = 256,
    workers: int = 8,
    shard_size: int = 50000,
    dtype: str = "float16",
    desc: str = "features",
    stream: bool = False,
) -> Tuple[torch.Tensor | List[torch.Tensor], torch.Tensor, bool]:
    """Features (N, D) and labels (N,) of ``dataset`` under ``model``, from the cache when present.

    ``model`` maps images (B, 3, H, W) -> (B, D) and is run in eval mode; ``dataset`` yields
    ``(image, label)``. ``parts`` must describe everything the features depend on (see module doc);
    ``dtype`` is the storage dtype and is part of the key. Returns ``(feats, labels, extracted)``
    where ``extracted`` says whether any shard was computed in this call; ``stream``: see
    :meth:`FeatureCache.load`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cache = FeatureCache(cache_dir, {**parts, "dtype": dtype, "shard_size": shard_size, "num_samples": len(dataset)})
    if cache.is_complete():
        log.info("%s: reusing cached features %s", desc, cache.dir)
        for i in range(cache.manifest()["num_shards"]):
            _remark_unreadable(dataset, cache, i)
        return (*cache.load(stream), False)

    n = len(dataset)
    num_shards = (n + shard_size - 1) // shard_size
    mine = [i for i in range(num_shards) if i % dist.world_size() == dist.rank()]
    was_training = model.training
    model.eval()
    extracted = False
    try:
        for i in tqdm(mine, desc=desc, disable=not dist.is_main()):
            rows = range(i * shard_size, min(n, (i + 1) * shard_size))
            if cache._shard_done(i, len(rows)):
                _remark_unreadable(dataset, cache, i)
                continue  # finished before an interruption
            loader = DataLoader(Subset(dataset, list(rows)), batch_size=batch_size, shuffle=False,
                                num_workers=workers, pin_memory=device.type == "cuda")
            feats, labels = extract_shard(model, loader, device)
            fp, lp = cache.shard_paths(i)
            _save_npy(lp, labels.astype(np.int64))
            tracker = getattr(dataset, "unreadable", None)
            atomic_write_json(cache.unreadable_path(i), [j for j in rows if tracker is not None and tracker.is_bad(j)])
            _save_npy(fp, feats.astype(DTYPES[dtype]))  # the features file last: it marks the shard done
            extracted = True
    finally:
        model.train(was_training)
    dist.barrier()
    if dist.is_main():
        missing = [i for i in range(num_shards)
                   if not cache._shard_done(i, min(n, (i + 1) * shard_size) - i * shard_size)]
        if missing:
            raise RuntimeError(f"feature cache {cache.dir}: shards {missing[:5]} missing after extraction")
        atomic_write_json(cache.dir / MANIFEST, {
            "key": cache.key, "parts": cache.parts, "num_shards": num_shards, "num_samples": n,
        })
    dist.barrier()
    return (*cache.load(stream), extracted)


def list_entries(cache_dir: str | os.PathLike) -> List[Path]:
    """Complete entries under ``cache_dir`` (for inspection and tests)."""
    root = Path(cache_dir) / "features"
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []
