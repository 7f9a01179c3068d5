"""IG-1B-style streams: webdataset tar shards (local paths or URLs) split across nodes and workers.

Shards are assigned round-robin to (rank, worker) streams when there are at least as many shards as
streams, otherwise every stream reads all shards in its own random order. Each stream cycles its shards
forever in a fresh order per pass (iteration-based schedule, no epochs). Corrupt samples are skipped and
counted like unreadable files in class folders. Resume reseeds the stream from the global step: the
stream continues with fresh samples but not bit-identically (shards have no random access).
"""
from __future__ import annotations

import io
import logging
import os
import random
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from pretrain.data.augment import sample_rng
from pretrain.utils import dist

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """``"a-{000..009}.tar"`` or ``"a.tar,b.tar"`` or a list -> list of shard paths/URLs."""
    items = pattern.split(",") if isinstance(pattern, str) else list(pattern)
    urls = [u for item in items if item.strip() for u in expand_urls(item.strip())]
    if not urls:
        raise FileNotFoundError(f"data.pattern={pattern!r} names no shards")
    return urls


def _log_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable shard content: %s", exn)
    return True


class ShardPairs(IterableDataset):
    """Endless stream of ``(im_q, im_k, skipped)`` from tar shards; see the module docstring."""

    def __init__(self, pattern: str | Sequence[str], transform: Callable, seed: int = 0,
                 shuffle_buffer: int = 1000) -> None:
        self.urls = expand_shards(pattern)
        local = [u for u in self.urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard file(s) not found, e.g. {missing[0]}")
        self.transform, self.seed, self.shuffle_buffer = transform, seed, shuffle_buffer
        self.start_step = 0

    def set_position(self, global_step: int) -> None:
        """Resume: reseed the streams from the global step (called before the loader is iterated)."""
        self.start_step = global_step

    def _stream_id(self) -> tuple[int, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return dist.rank() * nw + wid, dist.world_size() * nw, wid

    def _raw_samples(self, rng: random.Random, sid: int, nstreams: int) -> Iterator[dict]:
        mine = self.urls[sid::nstreams] if len(self.urls) >= nstreams else list(self.urls)
        while True:
            order = list(mine)
            rng.shuffle(order)
            n = 0
            for sample in tarfile_samples(({"url": u} for u in order), handler=_log_and_continue):
                n += 1
                yield sample
            if n == 0:
                raise RuntimeError(f"a full pass over {len(order)} shard(s) gave no samples, e.g. {order[0]}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        sid, nstreams, _ = self._stream_id()
        rng = random.Random(hash((self.seed, self.start_step, sid)))
        buffer: list[dict] = []
        skipped, count = 0, 0
        for sample in self._raw_samples(rng, sid, nstreams):
            buffer.append(sample)
            if len(buffer) < self.shuffle_buffer:
                continue
            sample = buffer.pop(rng.randrange(len(buffer)))
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            try:
                if key is None:
                    raise ValueError(f"sample {sample.get('__key__')} has no image member ({IMAGE_KEYS})")
                with Image.open(io.BytesIO(sample[key])) as img:
                    img = img.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                skipped += 1
                log.warning("skipping corrupt sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), e)
                continue
            with sample_rng(self.seed, self.start_step, sid, count):
                im_q, im_k = self.transform(img)
            count += 1
            yield im_q, im_k, torch.tensor(skipped)
            skipped = 0
