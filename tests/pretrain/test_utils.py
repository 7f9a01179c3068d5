"""The shared helpers: typed config loading, atomic writes, safe checkpoint loading."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest
import torch

from pretrain.utils.config import ConfigError, config_hash, load_config
from pretrain.checkpoint import save_checkpoint
from pretrain.utils.io import CheckpointError, WriteError, atomic_torch_save, atomic_write_text, safe_torch_load


@dataclass(frozen=True)
class _Optim:
    base_lr: float = 0.03
    steps: List[int] = field(default_factory=lambda: [120, 160])


@dataclass(frozen=True)
class _Cfg:
    arch: str = "resnet50"
    seed: int = 0
    optim: _Optim = field(default_factory=_Optim)


def test_defaults_yaml_base_and_overrides_apply_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("arch: resnet18\noptim:\n  base_lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\noptim:\n  steps: [1, 2]\n")
    cfg = load_config(_Cfg, tmp_path / "child.yaml", ["optim.base_lr=0.5"])
    assert cfg == _Cfg(arch="resnet18", optim=_Optim(base_lr=0.5, steps=[1, 2]))
    with pytest.raises(Exception):
        cfg.arch = "x"  # frozen: derived values are functions, never edits


@pytest.mark.parametrize(
    "overrides, needle",
    [(["optim.lrr=1"], "lrr"), (["optim.base_lr=abc"], "abc"), (["arch"], "key=value")],
)
def test_bad_overrides_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(_Cfg, None, overrides)


def test_unknown_key_in_yaml_and_base_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("archh: resnet18\n")
    with pytest.raises(ConfigError, match="archh"):
        load_config(_Cfg, tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("_BASE_: c.yaml\n")
    (tmp_path / "c.yaml").write_text("_BASE_: b.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(_Cfg, tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Cfg, tmp_path / "missing.yaml")


def test_config_hash_ignores_excluded_keys_only():
    a, b = _Cfg(seed=1), _Cfg(seed=2)
    assert config_hash(a, exclude=["seed"]) == config_hash(b, exclude=["seed"])
    assert config_hash(a) != config_hash(b)
    assert config_hash(_Cfg(arch="resnet18"), exclude=["seed"]) != config_hash(a, exclude=["seed"])


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"w": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        atomic_torch_save({"w": Boom()}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]  # no temp file left behind
    atomic_write_text(tmp_path / "sub" / "a.txt", "hi")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hi"


def _disk_fills_up(monkeypatch, error: BaseException) -> None:
    """torch.save writes half the file, then the disk is full."""
    def save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(model=model, optimizer=opt, epoch=1, arch="resnet18", config={}, global_step=4, sampler={})
    last = tmp_path / "checkpoint_last.pth"
    save_checkpoint(last, **kw)
    before = last.read_bytes()
    _disk_fills_up(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(WriteError) as e:
        save_checkpoint(last, **kw)
    assert str(e.value) == (f"no space left on device while writing {last}; the previous checkpoint {last} is intact; "
                            f"free space and rerun with --resume auto")
    assert e.value.errno == errno.ENOSPC
    assert last.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["checkpoint_last.pth"]  # no temp file
    # torch's own writer drops the errno: a full disk is told by the free space left
    _disk_fills_up(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:595] . basic_ios::clear: iostream error"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 << 30, 100 << 30, 0))
    new = tmp_path / "checkpoint_0002.pth"
    with pytest.raises(WriteError, match=rf"^no space left on device while writing {new}; no checkpoint was written "
                                         rf"to {new}; free space and rerun with --resume auto$"):
        save_checkpoint(new, **kw)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pth"]
    with pytest.raises(RuntimeError, match="^unrelated$"):  # other errors pass through unchanged
        _disk_fills_up(monkeypatch, RuntimeError("unrelated"))
        save_checkpoint(last, **kw)
    assert last.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["checkpoint_last.pth"]


def test_safe_load_rejects_code_truncation_and_missing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(CheckpointError):
        safe_torch_load(evil)
    assert not marker.exists()

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        safe_torch_load(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        safe_torch_load(tmp_path / "empty.pth")
