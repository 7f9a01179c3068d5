"""Exact resume of tar-shard pretraining (CPU): the stream continues where the consumed batches stopped,
and a run interrupted twice (in-process, as a kill: before a training step) resumes to the same weights, queue
and optimizer state, bit for bit; so do two ranks, each from its own stream positions."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from PIL import Image

import pretrain.engine as engine
from pretrain_helpers import tiny_config
from pretrain import checkpoint as ckpt_io
from pretrain.data.augment import TwoCropsTransform, build_augmentation
from pretrain.data.shards import ShardPairs, StreamTracker
from pretrain.data.synthetic import make_tar_shards, shard_pattern
from pretrain.main import main
from pretrain.utils.io import CheckpointError, safe_torch_load

PER_SHARD = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tar_shards(tmp_path_factory.mktemp("shards"), num_shards=4, per_shard=PER_SHARD, num_classes=4,
                           image_size=32, seed=0)


class RawPixels:
    """Both 'views' are the decoded pixels: identifies the sample."""

    def __call__(self, img):
        t = torch.as_tensor(bytearray(img.tobytes()), dtype=torch.uint8)
        return t, t


def _take(ds: ShardPairs, n: int) -> list:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_stream_resumes_at_any_position(shards):
    transform = TwoCropsTransform(build_augmentation("v2", 32))
    # 4 shards of 6 through a buffer of 4: positions cross the buffer's drain, shard ends and a pass end
    full = _take(ShardPairs(shard_pattern(shards), transform, seed=3, shuffle_buffer=4), 4 * PER_SHARD + 5)
    assert [tuple(s[3].tolist()) for s in full[:7]] == [(0, 0, 0, j) for j in range(1, 7)] + [(0, 0, 1, 1)]
    for cut in (1, 4, PER_SHARD, PER_SHARD + 3, 4 * PER_SHARD, 4 * PER_SHARD + 2):
        ds = ShardPairs(shard_pattern(shards), transform, seed=3, shuffle_buffer=4)
        ds.set_position(full[cut - 1][3][1:].unsqueeze(0))
        for a, b in zip(full[cut:], _take(ds, len(full) - cut)):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), cut


def test_each_pass_is_a_shuffle_of_every_sample(shards):
    files = []
    for path in shards:
        with tarfile.open(path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as img:
                        files.append(bytes(img.convert("RGB").tobytes()))
    ds = ShardPairs(shard_pattern(shards), RawPixels(), seed=0, shuffle_buffer=4)
    stream = [bytes(s[0].numpy()) for s in _take(ds, 2 * len(files))]
    for p in range(2):
        one_pass = stream[p * len(files):(p + 1) * len(files)]
        assert sorted(one_pass) == sorted(files)  # every sample once per pass
    assert stream[:len(files)] != files and stream[:len(files)] != stream[len(files):]  # shuffled, anew per pass


def test_checkpoint_of_other_stream_count_is_refused():
    tracker = StreamTracker(workers=2)
    with pytest.raises(CheckpointError, match="1 process\\(es\\) x 4 worker\\(s\\).*data.num_workers"):
        tracker.load({"positions": torch.zeros(1, 4, 3, dtype=torch.int64), "next_worker": 0}, "ckpt.pth")


def _overrides(shards, out) -> list[str]:
    # 2 workers, each stream 2 shards x 6 samples = 3 batches of 4 per pass; a checkpoint every 3 steps; 16 px crops
    # of the 32 px images: cheaper steps
    return [f"run.output_dir={out}", "data.image_size=16", "data.kind=shards", f"data.pattern={shard_pattern(shards)}",
            "data.num_workers=2", "solver.batch_size=4", "data.shuffle_buffer=4", "model.queue_size=8",
            "solver.iterations=10", "solver.schedule=exp_step", "solver.step_period=4", "solver.gamma=0.5",
            "solver.checkpoint_period=3", "run.resume=auto"]


class Interrupted(BaseException):
    """Stands for SIGKILL: raised before a training step, nothing after it runs (no ``except Exception``)."""


def _run_and_kill(shards, out, monkeypatch, kill_at_call: int) -> None:
    """One run of the pretraining, interrupted in-process before its ``kill_at_call``-th training step; the
    next run resumes from the files alone."""
    real, calls = engine.train_step, [0]

    def train_step(*a, **kw):
        calls[0] += 1
        if calls[0] == kill_at_call:
            raise Interrupted
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(engine, "train_step", train_step)
        with pytest.raises(Interrupted):
            main(tiny_config(out, out, *_overrides(shards, out)))


def test_killed_twice_resumes_bit_identically(tmp_path, shards, monkeypatch):
    main(tiny_config(tmp_path, tmp_path / "full", *_overrides(shards, tmp_path / "full")))
    full = safe_torch_load(tmp_path / "full" / ckpt_io.LAST)
    assert full["global_step"] == 10

    killed = tmp_path / "killed"
    # 1st kill before step 5 of the first run: back to step 3, mid-shard (worker 0 did 2 batches, worker 1 one)
    _run_and_kill(shards, killed, monkeypatch, kill_at_call=5)
    at3 = safe_torch_load(killed / ckpt_io.LAST)
    assert at3["global_step"] == 3
    assert at3["sampler"]["streams"]["positions"].tolist() == [[[0, 1, 2], [0, 0, 4]]]
    assert at3["sampler"]["streams"]["next_worker"] == 1
    # 2nd kill before step 9 (the 6th of the resumed run): back to step 6, where both streams end a pass
    _run_and_kill(shards, killed, monkeypatch, kill_at_call=6)
    at6 = safe_torch_load(killed / ckpt_io.LAST)
    assert at6["global_step"] == 6
    assert at6["sampler"]["streams"]["positions"].tolist() == [[[0, 1, PER_SHARD], [0, 1, PER_SHARD]]]
    assert at6["sampler"]["streams"]["next_worker"] == 0
    main(tiny_config(tmp_path, killed, *_overrides(shards, killed)))
    resumed = safe_torch_load(killed / ckpt_io.LAST)
    assert resumed["global_step"] == 10
    assert resumed["sampler"]["streams"]["positions"].tolist() == full["sampler"]["streams"]["positions"].tolist()
    assert resumed["state_dict"].keys() == full["state_dict"].keys()
    for k, v in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k  # weights, queue and queue_ptr bit-identical
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def _two_rank_worker(rank: int, world: int, init_file: str, tmp: str, pattern: str) -> None:
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # one stream per rank (no loader workers) on 3 shards: rank 0 reads shards 0 and 2 (3 batches of 4 per
    # pass), rank 1 shard 1 (1.5 batches per pass): the ranks' positions differ
    common = ["data.image_size=16", "data.kind=shards", f"data.pattern={pattern}", "data.num_workers=0",
              "solver.batch_size=8", "data.shuffle_buffer=4", "model.queue_size=8", "solver.iterations=5",
              "solver.schedule=exp_step", "solver.step_period=2", "solver.checkpoint_period=2", "run.resume=auto"]
    main(tiny_config(tmp, f"{tmp}/full", f"run.output_dir={tmp}/full", *common))
    real, calls = engine.train_step, [0]

    def dies_at_fourth_step(*a, **kw):
        calls[0] += 1
        if calls[0] == 4:  # every rank stops at the same step, as a killed job's ranks all go
            raise Interrupted
        return real(*a, **kw)

    engine.train_step = dies_at_fourth_step
    try:
        main(tiny_config(tmp, f"{tmp}/killed", f"run.output_dir={tmp}/killed", *common))
    except Interrupted:
        pass
    engine.train_step = real
    torch_dist.barrier()
    if rank == 0:
        torch.save(safe_torch_load(f"{tmp}/killed/{ckpt_io.LAST}")["sampler"], f"{tmp}/at2.pt")
    main(tiny_config(tmp, f"{tmp}/killed", f"run.output_dir={tmp}/killed", *common))
    torch_dist.destroy_process_group()


def test_two_ranks_resume_their_own_streams(tmp_path, shards):
    import torch.multiprocessing as mp

    mp.start_processes(_two_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path), shard_pattern(shards[:3])),
             nprocs=2, start_method="fork")
    at2 = torch.load(tmp_path / "at2.pt", weights_only=True)
    assert at2["streams"]["positions"].tolist() == [[[0, 1, 2]], [[1, 0, 2]]]  # 8 samples each: 6 + 2
    full, resumed = (safe_torch_load(tmp_path / d / ckpt_io.LAST) for d in ("full", "killed"))
    assert full["global_step"] == resumed["global_step"] == 5
    for k, v in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k
