"""Feature cache: reuse, invalidation, crash safety (an interrupted extraction is never read as complete)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from transfer.engines.torchvision.classification import feature_cache
from transfer.engines.torchvision.classification.feature_cache import FeatureCache, dataset_fingerprint, get_or_extract, list_entries, state_digest

CPU = torch.device("cpu")


def _data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 6))


@pytest.fixture
def shard_calls(monkeypatch):
    """Counts calls of the per-shard extraction (the only place features are computed)."""
    calls = []
    real = feature_cache.extract_shard

    def counting(model, loader, device):
        calls.append(len(loader.dataset))
        return real(model, loader, device)

    monkeypatch.setattr(feature_cache, "extract_shard", counting)
    return calls


def _parts(model, **extra):
    return {"state_digest": state_digest(model.state_dict()), "preprocessing": {"crop": 4}, **extra}


def test_second_run_reuses_cache(tmp_path, shard_calls):
    model, data = _model(), _data()
    kw = dict(device=CPU, batch_size=5, workers=0, shard_size=10, dtype="float32")
    f1, y1, extracted1 = get_or_extract(model, data, tmp_path, _parts(model), **kw)
    assert extracted1 and shard_calls == [10, 10, 3]
    f2, y2, extracted2 = get_or_extract(model, data, tmp_path, _parts(model), **kw)
    assert not extracted2 and shard_calls == [10, 10, 3]  # nothing computed the second time
    with torch.no_grad():
        expected = model(data.tensors[0])
    torch.testing.assert_close(f1, expected)
    assert torch.equal(f1, f2) and torch.equal(y1, data.tensors[1]) and torch.equal(y2, y1)
    assert len(list_entries(tmp_path)) == 1
    shards, _, _ = get_or_extract(model, data, tmp_path, _parts(model), stream=True, **kw)
    assert [len(s) for s in shards] == [10, 10, 3] and torch.equal(torch.cat(shards), f1)


@pytest.mark.parametrize("change", ["weights", "preprocessing", "dataset", "dtype"])
def test_any_change_invalidates(tmp_path, shard_calls, change):
    model, data = _model(), _data()
    kw = dict(device=CPU, batch_size=8, workers=0, shard_size=100, dtype="float32")
    get_or_extract(model, data, tmp_path, _parts(model), **kw)
    parts = _parts(model)
    if change == "weights":
        model = _model(seed=1)
        parts = _parts(model)
    elif change == "preprocessing":
        parts["preprocessing"] = {"crop": 3}
    elif change == "dataset":
        data = _data(seed=1)
        parts["dataset"] = "another fingerprint"
    else:
        kw["dtype"] = "float16"
    feats, _, extracted = get_or_extract(model, data, tmp_path, parts, **kw)
    assert extracted and len(shard_calls) == 2 and len(list_entries(tmp_path)) == 2
    with torch.no_grad():
        torch.testing.assert_close(feats.float(), model(data.tensors[0]), atol=2e-3, rtol=2e-3)
    if change == "dtype":
        assert feats.dtype == torch.float16


def test_interrupted_extraction_is_not_complete_and_resumes(tmp_path, monkeypatch):
    model, data = _model(), _data()
    kw = dict(device=CPU, batch_size=4, workers=0, shard_size=10, dtype="float32")
    real, calls, die = feature_cache.extract_shard, [], [True]

    def dies_on_second_shard(m, loader, device):
        calls.append(len(loader.dataset))
        if len(calls) == 2 and die[0]:
            raise RuntimeError("killed")  # the job dies mid-extraction
        return real(m, loader, device)

    monkeypatch.setattr(feature_cache, "extract_shard", dies_on_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        get_or_extract(model, data, tmp_path, _parts(model), **kw)
    entry = FeatureCache(tmp_path, {**_parts(model), "dtype": "float32", "shard_size": 10, "num_samples": 23})
    assert not entry.is_complete() and list_entries(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        entry.load()
    assert not list(entry.dir.glob("*.tmp"))  # no temporary leftovers either

    calls.clear()
    die[0] = False
    feats, _, extracted = get_or_extract(model, data, tmp_path, _parts(model), **kw)
    assert extracted and calls == [10, 3]  # shard 0 survived the crash and is reused
    with torch.no_grad():
        torch.testing.assert_close(feats, model(data.tensors[0]))


def test_dataset_fingerprint_sees_renames_and_edits(tmp_path):
    for name in ("a.JPEG", "b.JPEG"):
        (tmp_path / name).write_bytes(b"12345")
    samples = [(str(tmp_path / "a.JPEG"), 0), (str(tmp_path / "b.JPEG"), 1)]
    fp = dataset_fingerprint(samples, tmp_path)
    assert fp == dataset_fingerprint(list(reversed(samples)), tmp_path)  # order-free
    assert fp != dataset_fingerprint([samples[0], (samples[1][0], 0)], tmp_path)  # relabelled
    (tmp_path / "b.JPEG").write_bytes(b"123456")
    assert fp != dataset_fingerprint(samples, tmp_path)  # re-encoded image


def test_state_digest():
    a = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    assert state_digest(a) == state_digest({"b": torch.zeros(2), "w": torch.ones(2, 2)})
    assert state_digest(a) != state_digest({**a, "b": torch.tensor([0.0, 1e-7])})
    assert state_digest(a) != state_digest({**a, "w": torch.ones(4)})  # shape is part of it
