"""Shuffle BN across 2 gloo processes (CPU): eval-mode keys equal the plain computation; in train mode
a key is never normalised with the same batch as its query; the queue receives the gathered keys."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

B = 4  # images per process


def _tiny_encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 8))


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls: list[list[int]] = []

    def forward(self, x):
        self.calls.append(sorted(int(v) for v in x[:, 0, 0, 0]))
        return x[:, 0, 0, :2]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from pretrain.moco import MoCo
    from pretrain.shuffle_bn import shuffled_key_forward

    torch.manual_seed(0)  # same weights on both ranks
    enc = _tiny_encoder().eval()
    torch.manual_seed(100 + rank)  # different images per rank
    x = torch.randn(B, 3, 6, 6)
    eval_equal = bool(torch.allclose(shuffled_key_forward(enc, x, 1), enc(x), atol=1e-6))

    ids = (rank * B + torch.arange(B)).float().view(B, 1, 1, 1).expand(B, 3, 2, 2).contiguous()
    rec = _Recorder()
    keys = shuffled_key_forward(rec, ids, 1)
    unshuffled = keys[:, 0].tolist() == ids[:, 0, 0, 0].tolist()

    torch.manual_seed(0)
    moco = MoCo(_tiny_encoder, dim=8, queue_size=2 * B * world, bn_splits=1)
    moco(torch.randn(B, 3, 6, 6) + rank, torch.randn(B, 3, 6, 6) + rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "eval_equal": eval_equal, "unshuffled": unshuffled, "key_calls": rec.calls,
        "queue_ptr": int(moco.queue_ptr), "queue": moco.queue.tolist(),
    }))
    torch_dist.destroy_process_group()


def test_shuffle_bn_two_processes(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=world, join=True, start_method="fork")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["eval_equal"] for r in res), "eval-mode keys differ from the unshuffled computation"
    assert all(r["unshuffled"] for r in res), "keys did not come back in their original order"
    key_batches = [set(c) for r in res for c in r["key_calls"]]
    assert len(key_batches) == world and sorted(i for b in key_batches for i in b) == list(range(world * B))
    for i in range(world * B):
        query_batch = set(range(i // B * B, i // B * B + B))  # BN batch of query i: its own process's batch
        key_batch = next(b for b in key_batches if i in b)
        assert key_batch != query_batch
        assert len(key_batch & query_batch) <= B // world  # evenly mixed across processes
    # the queue holds the keys of both processes, identical on every rank
    assert res[0]["queue_ptr"] == res[1]["queue_ptr"] == world * B
    assert torch.allclose(torch.tensor(res[0]["queue"]), torch.tensor(res[1]["queue"]))
