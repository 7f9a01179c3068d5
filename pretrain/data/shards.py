"""IG-1B-style streams: webdataset tar shards (local paths or URLs) split across nodes and workers,
resumable exactly.

Streams. Shards are assigned round-robin to the ``world_size * workers`` (rank, worker) streams when
there are at least as many shards as streams, otherwise every stream reads all shards in its own order.
Each stream cycles its shards forever (iteration-based schedule, no epochs), pass ``p`` in the order
``shuffle(shards, seed, stream, p)``.

Shuffling and its statistics. Samples are shuffled by a buffer of ``shuffle_buffer`` samples that is
filled from the current shard only and drained at the shard's end, with a generator seeded by (seed,
stream, pass, shard position): samples never mix across shards, a buffer at least as large as a shard
gives a uniform permutation of that shard, and a smaller one a windowed shuffle (a sample leaves at
most ``shuffle_buffer - 1`` places before its place in the file, the tail of a shard less shuffled).
Mixing across the data comes from the per-pass shard order, so shards must hold images in random order
(as webdataset shards of a crawl usually do). Each pass yields every readable sample of the stream's
shards once.

Exact resume. A sample's place is ``(pass, shard position, index within the shuffled shard)`` and its
views depend only on that (and the seed), so a stream restarts anywhere by re-reading the current shard
from its start and dropping (undecoded) the samples already yielded: no state but three integers per
stream, and no replay beyond one shard. Every sample carries ``(worker, pass, shard position, index + 1)``
into the batch, the loop's :class:`StreamTracker` keeps the last consumed one per worker (workers read
ahead: the batches still in flight are dropped and made again), and which worker's batch is next: the
loader serves workers round-robin, so on resume worker ``w`` plays stream ``(w + next) % workers``.
Corrupt samples are skipped and counted like unreadable files in class folders.
"""
from __future__ import annotations

import io
import logging
import os
import random
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from pretrain.data.augment import sample_rng
from pretrain.utils import dist
from pretrain.utils.io import CheckpointError

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


def _rng(*keys: int) -> random.Random:
    return random.Random(hash(tuple(int(k) for k in keys)))  # hash of ints: the same in every process


def shuffled_shard(url: str, buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """The samples of one shard through a shuffle buffer of ``buffer_size`` that is drained at the end."""
    buf: list[dict] = []
    for sample in tarfile_samples([{"url": url}], handler=_log_and_continue):
        buf.append(sample)
        if len(buf) >= buffer_size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


class ShardPairs(IterableDataset):
    """Endless stream of ``(im_q, im_k, skipped, position)`` from tar shards; see the module docstring.

    ``position``: int64 ``(worker, pass, shard position, samples of that shard done)``.
    """

    def __init__(self, pattern: str | Sequence[str], transform: Callable, seed: int = 0,
                 shuffle_buffer: int = 1000) -> None:
        self.urls = expand_shards(pattern)
        local = [u for u in self.urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard file(s) not found, e.g. {missing[0]}")
        self.transform, self.seed, self.shuffle_buffer = transform, seed, max(1, shuffle_buffer)
        self.positions: torch.Tensor | None = None  # (workers, 3) start per stream of this rank
        self.next_worker = 0

    def set_position(self, positions: torch.Tensor | None, next_worker: int = 0) -> None:
        """Resume: this rank's streams start at ``positions`` ((workers, 3): pass, shard position,
        samples done) and the loader's worker 0 plays stream ``next_worker``. Call before ``iter(loader)``."""
        self.positions = None if positions is None else positions.clone()  # the tracker updates its own
        self.next_worker = next_worker

    def _stream(self) -> tuple[int, int, int]:
        """(this worker's stream among the rank's, global stream id, number of global streams)."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (wid + self.next_worker) % nw
        return w, dist.rank() * nw + w, dist.world_size() * nw

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        w, sid, nstreams = self._stream()
        mine = self.urls[sid::nstreams] if len(self.urls) >= nstreams else list(self.urls)
        p, s, done = (int(x) for x in self.positions[w]) if self.positions is not None else (0, 0, 0)
        skipped = 0
        while True:
            order = list(mine)
            _rng(self.seed, sid, p).shuffle(order)
            good, full_pass = 0, s == 0 and done == 0
            for si in range(s, len(order)):
                for j, sample in enumerate(shuffled_shard(order[si], self.shuffle_buffer, _rng(self.seed, sid, p, si))):
                    if j < done:
                        continue  # resume: yielded before the checkpoint (not decoded again)
                    img = self._decode(sample)
                    if img is None:
                        skipped += 1
                        continue
                    with sample_rng(self.seed, sid, p, si, j):
                        im_q, im_k = self.transform(img)
                    good += 1
                    yield im_q, im_k, torch.tensor(skipped), torch.tensor([w, p, si, j + 1])
                    skipped = 0
                done = 0
            if full_pass and good == 0:
                raise RuntimeError(f"a full pass over {len(order)} shard(s) gave no readable sample, e.g. {order[0]}")
            p, s, done = p + 1, 0, 0

    @staticmethod
    def _decode(sample: dict) -> Image.Image | None:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        try:
            if key is None:
                raise ValueError(f"sample {sample.get('__key__')} has no image member ({IMAGE_KEYS})")
            with Image.open(io.BytesIO(sample[key])) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("skipping corrupt sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), e)
            return None


class StreamTracker:
    """The stream position of the last batch the loop consumed, per worker of this rank, and which
    worker's batch comes next (the loader serves its workers round-robin)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.positions = torch.zeros(self.workers, 3, dtype=torch.int64)
        self.next_worker = 0

    def consume(self, batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(im_q, im_k, skipped, position (B, 4))`` batches -> ``(im_q, im_k, skipped)``, recording each
        batch's last position as it is handed to the loop (which has trained on it by the next save)."""
        for im_q, im_k, skipped, pos in batches:
            w = int(pos[-1, 0])
            self.positions[w] = pos[-1, 1:]
            self.next_worker = (w + 1) % self.workers
            yield im_q, im_k, skipped

    def state(self) -> dict:
        """Every rank's positions ``(world_size, workers, 3)`` (a collective: all ranks call it)."""
        gathered = dist.all_gather_cat(self.positions.unsqueeze(0).to(dist.backend_device()))  # NCCL: on the GPU
        return {"positions": gathered.cpu().clone(), "next_worker": self.next_worker}

    def load(self, state: dict, path: str) -> None:
        """Take this rank's part of a :meth:`state` saved in checkpoint ``path``; a checkpoint made with
        another number of processes or workers cannot continue the same streams: one clear error."""
        pos = state["positions"]
        want = (dist.world_size(), self.workers)
        if tuple(pos.shape[:2]) != want:
            raise CheckpointError(
                f"{path}: its shard streams are for {pos.shape[0]} process(es) x {pos.shape[1]} worker(s), this "
                f"run has {want[0]} x {want[1]}: resume with the same world size and data.num_workers to continue "
                "the streams exactly (shard assignment depends on both)")
        self.positions = pos[dist.rank()].clone()
        self.next_worker = int(state["next_worker"])
