"""Cross-process shuffle and split BN compose (2 gloo processes, CPU): with 2 BN splits per process the
keys equal the slow reference (the gathered batch permuted by rank 0's permutation, each of the 4 key
groups encoded on its own with plain BN), and MoCo with split BN trains a step on 2 processes."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

B, SPLITS = 8, 2  # images per process, BN groups per process


def _tiny_encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from pretrain.moco import MoCo
    from pretrain.shuffle_bn import balanced_shuffle, convert_split_bn, shuffled_key_forward
    from pretrain.utils import dist

    torch.manual_seed(0)  # same weights on both ranks
    plain = _tiny_encoder().double().train()
    split = convert_split_bn(copy.deepcopy(plain), SPLITS)
    torch.manual_seed(100 + rank)  # different images per rank
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64) * 2 + rank

    torch.manual_seed(7)  # every rank draws; rank 0's permutation is used
    keys = shuffled_key_forward(split, x, SPLITS)

    # slow reference on every rank: all images, rank 0's permutation, one plain-BN copy per key group
    x_all = dist.all_gather_cat(x)
    torch.manual_seed(7)
    perm = balanced_shuffle(world * SPLITS, B // SPLITS)
    ref = torch.empty(world * B, 8, dtype=torch.float64)
    copies = []
    with torch.no_grad():
        for j, idx in enumerate(perm.chunk(world * SPLITS)):
            enc = copy.deepcopy(plain)
            ref[idx] = enc(x_all[idx])
            if j // SPLITS == rank:  # this rank's key groups feed its running stats
                copies.append(enc)
    ref = ref[rank * B:(rank + 1) * B]
    mean_var = torch.stack([c[1].running_var for c in copies]).mean(0)

    torch.manual_seed(0)
    moco = MoCo(_tiny_encoder, dim=8, queue_size=2 * B * world, bn_splits=SPLITS)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1)
    logits, labels = moco(torch.randn(B, 3, 8, 8) + rank, torch.randn(B, 3, 8, 8) + rank)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    opt.step()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "key_err": float((keys - ref).abs().max()),
        "running_var_err": float((split[1].running_var - mean_var).abs().max()),
        "logits_shape": list(logits.shape), "queue_ptr": int(moco.queue_ptr), "queue": moco.queue.tolist(),
    }))
    torch_dist.destroy_process_group()


def test_split_bn_keys_two_processes(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=world, join=True, start_method="fork")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in res:
        assert r["key_err"] < 1e-10, "split-BN keys differ from the per-group reference"
        assert r["running_var_err"] < 1e-10, "running stats are not the mean over this process's key groups"
        assert r["logits_shape"] == [B, 1 + 2 * B * world] and r["queue_ptr"] == world * B
    assert torch.allclose(torch.tensor(res[0]["queue"]), torch.tensor(res[1]["queue"]))
